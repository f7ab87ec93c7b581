//! One module per subcommand.

mod checkpoint;
mod console;
mod evacuate;
mod inspect;
mod kill;
mod listen;
mod pki;
mod ps;
mod restore;
mod run;
mod send;

use anyhow::Result;

use crate::cli::{Command, LogFormat};
use crate::state::StateDir;

pub fn dispatch(state: &StateDir, log_format: LogFormat, command: Command) -> Result<()> {
    match command {
        Command::Run(a) => run::run(state, log_format, a),
        Command::Ps(a) => ps::ps(state, a),
        Command::Console(a) => console::console(state, a),
        Command::Checkpoint(a) => checkpoint::checkpoint(state, a),
        Command::Restore(a) => restore::restore(state, log_format, a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Kill(a) => kill::kill(state, a),
        Command::Pki(a) => pki::pki(a),
        Command::Listen(a) => listen::listen(state, log_format, a),
        Command::Send(a) => send::send(state, a),
        Command::Evacuate(a) => evacuate::evacuate(state, a),
        Command::Undrain(a) => evacuate::undrain(state, a),
        Command::Shim(_) => {
            anyhow::bail!("the shim is started by `run` and `restore`, not from the command line")
        }
    }
}

/// The record of vkernel `name`, which must be running (its init alive and ours).
fn running(state: &StateDir, name: &str) -> Result<crate::state::Record> {
    let rec = state.alive(name)?;
    if !init_is_ours(&rec) {
        anyhow::bail!(
            "vkernel {} is not running (its init {} is gone)",
            rec.name,
            rec.init_pid
        );
    }
    Ok(rec)
}

/// What a capture of the vkernel of `rec` records besides its processes.
fn capture_options(rec: &crate::state::Record) -> vkm_migrate_src::CaptureOptions {
    vkm_migrate_src::CaptureOptions {
        name: rec.name.clone(),
        argv: rec.argv.clone(),
        console_tty: Some(rec.console_tty.clone()),
        skip_page_runs: false,
        owned_net: rec.owned_net.clone(),
        known_net: Vec::new(),
        known_smaps: Default::default(),
    }
}

/// A field of `/proc/PID/status` (the text after `Key:`), trimmed.
fn status_field(pid: i32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// True if `rec.init_pid` is alive and still the child of the shim `rec.shim_pid` (and so
/// not a recycled pid).
fn init_is_ours(rec: &crate::state::Record) -> bool {
    status_field(rec.init_pid, "PPid").and_then(|p| p.parse::<i32>().ok()) == Some(rec.shim_pid)
        && status_field(rec.init_pid, "State").is_some_and(|s| !s.starts_with('Z'))
}
