//! `vkmigrate run`.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use vkm_common::net::{tun_flags, Bridge, NetDev};

use crate::cli::{LogFormat, RunArgs};
use crate::shim;
use crate::state::StateDir;

pub fn run(state: &StateDir, log_format: LogFormat, args: RunArgs) -> Result<()> {
    let Some(program) = args.command.first() else {
        bail!("No command given");
    };
    // Init would only report this later, on the console; say it now.
    find_program(program)?;
    let devs = tap_devices(&args)?;
    let claim = state.claim(&args.name)?;
    // The taps exist before the vkernel starts (it opens them itself); if it cannot start,
    // they go again when `created` is dropped.
    let mut created = Vec::new();
    let mut mode: Vec<OsString> = vec!["run".into(), "--name".into(), args.name.clone().into()];
    for d in &devs {
        match vkm_netconf::check(d) {
            Err(vkm_netconf::NetconfError::BridgeMissing { bridge, tap }) => bail!(
                "Cannot create tap {tap}: bridge {bridge} does not exist; create it \
                 (ip link add {bridge} type bridge) or pass --bridge-create"
            ),
            r => r.with_context(|| format!("Cannot create tap {}", d.name))?,
        }
        let c = vkm_netconf::create(d).with_context(|| format!("Cannot create tap {}", d.name))?;
        let owned = match c.created_bridge() {
            Some(b) => format!("{}@{b}", d.name),
            None => d.name.clone(),
        };
        mode.extend(["--owned-tap".into(), owned.into()]);
        created.push(c);
    }
    mode.push("--".into());
    mode.extend(args.command.iter().map(OsString::from));
    let started = shim::start(state, claim, &args.name, mode, log_format)
        .with_context(|| format!("Cannot start vkernel {}", args.name))?;
    // The shim owns them now (it removes them when the vkernel ends); our fds go, the
    // persistent taps stay.
    for c in created {
        drop(c.into_fd());
    }
    println!(
        "started {}: init pid {}, console {}",
        args.name, started.init_pid, started.console_tty
    );
    Ok(())
}

/// The taps `--tap`/`--tap-addr` ask for: persistent, owned by the vkernel, up.
fn tap_devices(args: &RunArgs) -> Result<Vec<NetDev>> {
    let mut devs: Vec<NetDev> = Vec::new();
    for (tap, bridge) in &args.taps {
        if devs.iter().any(|d| &d.name == tap) {
            bail!("--tap {tap} is given twice");
        }
        devs.push(NetDev {
            name: tap.clone(),
            // What UML and most vkernels attach with; a vkernel that attaches with other
            // flags (e.g. IFF_VNET_HDR) sets them on the persistent device as it attaches.
            tun_flags: tun_flags::IFF_TAP | tun_flags::IFF_NO_PI,
            persist: true,
            owner: None,
            group: None,
            mac: None,
            mtu: 0,
            up: true,
            addrs: Vec::new(),
            routes: Vec::new(),
            bridge: bridge.as_ref().map(|b| Bridge {
                name: b.clone(),
                mtu: 1500,
                addrs: Vec::new(),
                // Only created if absent; `Created::created_bridge` then says it is ours.
                owned: args.bridge_create,
            }),
            guest_macs: Vec::new(),
            guest_ips: Vec::new(),
            owned: true,
        });
    }
    for (tap, addr) in &args.tap_addrs {
        let dev = match tap {
            Some(t) => devs.iter_mut().find(|d| &d.name == t),
            None if devs.len() == 1 => devs.first_mut(),
            None if devs.is_empty() => bail!("--tap-addr {addr} needs a --tap"),
            None => bail!("--tap-addr {addr}: say which tap, as TAP={addr}"),
        };
        let Some(dev) = dev else {
            bail!(
                "--tap-addr {addr}: there is no --tap {}",
                tap.as_deref().unwrap_or("")
            );
        };
        dev.addrs.push(*addr);
    }
    Ok(devs)
}

/// Where `execvp` would find `program`, or an error saying it would not.
fn find_program(program: &str) -> Result<PathBuf> {
    if program.is_empty() {
        bail!("The command is empty");
    }
    if program.contains('/') {
        let p = Path::new(program);
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        bail!("Cannot execute {program}: not an executable file");
    }
    // execvp's default search path when PATH is unset.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("Command {program} not found in PATH")
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs() {
        assert!(find_program("sh").is_ok());
        assert!(find_program("/bin/sh").is_ok());
        assert!(find_program("no-such-program-vkm").is_err());
        assert!(find_program("/etc/passwd").is_err());
    }
}
