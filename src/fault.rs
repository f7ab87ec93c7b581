//! Fault injection: a test hook modelled on CRIU's (`criu/include/fault-injection.h`, selected
//! by `CRIU_FAULT`). `VKMIGRATE_FAULT=<point>` in the environment of `vkmigrate listen` reaches
//! the receiving shims it starts (they inherit its environment) and makes each of them fail at
//! that point of the commit protocol, so that tests can check what the sender makes of it.
//! Unset, nothing changes; an unknown value is logged and ignored.
//!
//! Points (all in the receiving shim, `shim::receive`):
//! - `receiver-dies-after-final`: exits abruptly right after the final state arrived, before
//!   it answers (a crash, or a cut link, as the sender sees it).
//! - `receiver-dies-before-ready`: exits abruptly once the commit's pages and all other state
//!   are applied, before it reports ready.
//! - `receiver-silent-after-go`: resumes and publishes the vkernel as usual after `go`, but
//!   never reports it running and closes the connection (a link lost after `go`): the sender
//!   must learn the outcome from this host's `listen` daemon.
//! - `receiver-dies-after-go`: exits abruptly right after it resumed the vkernel, before it
//!   is published or reported running.
//! - `receiver-uml-exits-at-go`: a UML, let go, is told `halt` instead of `go` on its mconsole:
//!   it exits as it would after a crash on arrival, removing its umid directory on the way
//!   (which, on a filesystem both hosts share, is also the source's), and the receiver fails
//!   for want of an answer to `go`.

/// The environment variable that selects a fault.
pub const VAR: &str = "VKMIGRATE_FAULT";

/// The exit status of a process that dies at an injected fault (not one of the statuses a
/// shim uses otherwise, so that logs tell the two apart).
const EXIT_STATUS: i32 = 86;

/// A point where the receiving shim fails (named `receiver-...` in [`VAR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    DieAfterFinal,
    DieBeforeReady,
    SilentAfterGo,
    DieAfterGo,
    UmlExitsAtGo,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::DieAfterFinal,
        Fault::DieBeforeReady,
        Fault::SilentAfterGo,
        Fault::DieAfterGo,
        Fault::UmlExitsAtGo,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::DieAfterFinal => "receiver-dies-after-final",
            Fault::DieBeforeReady => "receiver-dies-before-ready",
            Fault::SilentAfterGo => "receiver-silent-after-go",
            Fault::DieAfterGo => "receiver-dies-after-go",
            Fault::UmlExitsAtGo => "receiver-uml-exits-at-go",
        }
    }

    fn parse(value: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == value)
    }
}

/// Whether `fault` is the one selected for this process.
pub fn armed(fault: Fault) -> bool {
    let Some(value) = std::env::var_os(VAR) else {
        return false;
    };
    let selected = value.to_str().and_then(Fault::parse);
    if selected.is_none() {
        tracing::warn!(value = ?value, "unknown {VAR}, ignored");
    }
    selected == Some(fault)
}

/// Exit at once if `fault` is selected: no destructors run and the peer is not told, as when
/// the process crashes.
pub fn die_at(fault: Fault) {
    if armed(fault) {
        tracing::error!(fault = fault.name(), "injected fault: exiting");
        std::process::exit(EXIT_STATUS);
    }
}

/// A UML let go at the destination, about to be told `go` on its mconsole `socket`: if
/// [`Fault::UmlExitsAtGo`] is selected, tell it `halt` instead and wait until its socket
/// answers no more (it has exited).
pub fn uml_released(socket: &std::path::Path) {
    if !armed(Fault::UmlExitsAtGo) {
        return;
    }
    tracing::error!(
        fault = Fault::UmlExitsAtGo.name(),
        "injected fault: halting the UML"
    );
    if let Err(e) = vkm_common::mconsole::request(socket, "halt") {
        tracing::warn!(error = %e, "halt");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while vkm_common::mconsole::request(socket, "version").is_ok()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_is_found_by_its_name() {
        for f in Fault::ALL {
            assert_eq!(Fault::parse(f.name()), Some(f));
        }
        assert_eq!(Fault::parse(""), None);
        assert_eq!(Fault::parse("receiver-dies"), None);
    }
}
