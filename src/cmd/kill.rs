//! `vkmigrate kill`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill as send, Signal};
use nix::unistd::Pid;

use super::init_is_ours;
use crate::cli::KillArgs;
use crate::state::StateDir;

pub fn kill(state: &StateDir, args: KillArgs) -> Result<()> {
    let rec = state.alive(&args.name)?;
    if init_is_ours(&rec) {
        // Init is pid 1 of the vkernel's namespace: its death kills every process in it. The
        // shim sees it exit, cleans up and exits.
        send(Pid::from_raw(rec.init_pid), Signal::SIGKILL).with_context(|| {
            format!(
                "Cannot kill init (pid {}) of vkernel {}",
                rec.init_pid, rec.name
            )
        })?;
    } else {
        // Init is gone or its pid belongs to someone else now: never signal it. The shim (alive:
        // it holds the lock) kills what is left on SIGTERM.
        tracing::info!(
            init_pid = rec.init_pid,
            shim_pid = rec.shim_pid,
            "init is not the shim's child; asking the shim"
        );
        send(Pid::from_raw(rec.shim_pid), Signal::SIGTERM).with_context(|| {
            format!(
                "Cannot signal the shim (pid {}) of vkernel {}",
                rec.shim_pid, rec.name
            )
        })?;
    }
    if !state.wait_gone(&rec, Duration::from_secs(5)) {
        bail!(
            "vkernel {} was killed but its shim (pid {}) has not cleaned up within 5 s",
            rec.name,
            rec.shim_pid
        );
    }
    Ok(())
}
