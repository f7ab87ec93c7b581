//! The per-vkernel shim (like conmon or containerd-shim) and how the CLI starts it.
//!
//! `vkmigrate run` and `vkmigrate restore` claim `DIR/NAME` (taking its lock) and re-exec this
//! binary as `vkmigrate --state-dir DIR --log-format F __shim run|restore ...` with
//!
//! - stdin:  the state lock, the very open file description the CLI locked, so the lock passes
//!   to the shim without a gap; the shim keeps a dup of it until it exits;
//! - stdout: the write end of the status pipe;
//! - stderr: `DIR/NAME/shim.log` (so even a panic lands there).
//!
//! The shim calls `setsid`, moves stdin/stdout aside (replacing them with /dev/null), creates
//! the sandbox (and restores the image), writes `vkernel.json`, then writes exactly one
//! JSON line [`Reply`] to the status pipe and closes it. The CLI reads that line: `ready` →
//! print and exit 0; `failed` → print the shim's error chain and exit 1; end of file without
//! a line → the shim died (the tail of its log is shown) and its stale state is removed.
//!
//! The shim then serves the console (see [`console`]) until init exits or SIGTERM, and
//! removes `DIR/NAME` before it exits.

mod console;
mod receive;
mod serve;

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cli::LogFormat;
use crate::state::{Claim, StateDir, SHIM_LOG};

pub use serve::{main, read_meta};

/// The shim's one status line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ready {
        init_pid: i32,
        console_tty: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore: Option<RestoreStats>,
    },
    /// The error and its causes, outermost first.
    Failed { chain: Vec<String> },
    /// A receiving shim waits for the sender on this UDP port (before `ready`).
    Receiving { port: u16 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RestoreStats {
    pub processes: usize,
    pub threads: usize,
    pub pages: u64,
    pub elapsed_us: u64,
}

/// What the shim reported once the vkernel runs.
#[derive(Debug)]
pub struct Started {
    pub init_pid: i32,
    pub console_tty: String,
    pub restore: Option<RestoreStats>,
}

/// An error that happened in the shim, rebuilt from its text so that the CLI prints the same
/// numbered chain.
#[derive(Debug)]
pub struct RemoteError {
    msg: String,
    source: Option<Box<RemoteError>>,
}

impl RemoteError {
    pub fn from_chain(chain: &[String]) -> RemoteError {
        let mut err: Option<RemoteError> = None;
        for msg in chain.iter().rev() {
            err = Some(RemoteError {
                msg: msg.clone(),
                source: err.map(Box::new),
            });
        }
        err.unwrap_or_else(|| RemoteError {
            msg: "The shim failed without saying why".into(),
            source: None,
        })
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for RemoteError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Start the shim for `name` in the claimed directory with `mode` (the arguments after
/// `__shim`) and wait until it reports.
pub fn start(
    state: &StateDir,
    claim: Claim,
    name: &str,
    mode: Vec<OsString>,
    log_format: LogFormat,
) -> Result<Started> {
    let mut shim = Shim::spawn(state, claim, name, mode, log_format)?;
    match shim.next_reply()? {
        Reply::Ready {
            init_pid,
            console_tty,
            restore,
        } => Ok(Started {
            init_pid,
            console_tty,
            restore,
        }),
        Reply::Failed { chain } => {
            let _ = wait_briefly(&mut shim.child);
            Err(RemoteError::from_chain(&chain).into())
        }
        Reply::Receiving { .. } => Err(anyhow!("The shim reported an unexpected status")),
    }
}

/// A shim we started, whose status lines we read.
pub struct Shim {
    child: std::process::Child,
    status: BufReader<File>,
    log_path: std::path::PathBuf,
    state: StateDir,
    name: String,
}

impl Shim {
    pub fn spawn(
        state: &StateDir,
        claim: Claim,
        name: &str,
        mode: Vec<OsString>,
        log_format: LogFormat,
    ) -> Result<Shim> {
        let exe = std::env::current_exe()
            .context("Cannot find the vkmigrate executable to start the shim")?;
        let log_path = claim.dir.join(SHIM_LOG);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("Cannot create {}", log_path.display()))?;
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .context("Cannot create the shim's status pipe")?;
        let child = {
            // The Command keeps its Stdio (and so our copy of the pipe's write end) until
            // dropped: drop it right after the spawn, or reads would never see end of file.
            let mut cmd = Command::new(&exe);
            cmd.arg("--state-dir")
                .arg(state.root())
                .arg("--log-format")
                .arg(log_format.as_str())
                .arg("__shim")
                .args(mode)
                .stdin(Stdio::from(claim.lock))
                .stdout(Stdio::from(status_w))
                .stderr(Stdio::from(log));
            cmd.spawn()
                .with_context(|| format!("Cannot start the shim {}", exe.display()))?
        };
        Ok(Shim {
            child,
            status: BufReader::new(File::from(status_r)),
            log_path,
            state: StateDir::new(state.root()),
            name: name.to_owned(),
        })
    }

    /// The shim's next status line. End of file means it died: its log's tail says why, and
    /// what it left is removed.
    pub fn next_reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        if let Err(e) = self.status.read_line(&mut line) {
            tracing::warn!(error = %e, "cannot read the shim's status pipe");
        }
        if line.trim().is_empty() {
            let status = wait_briefly(&mut self.child);
            let tail = log_tail(&self.log_path);
            let _ = self.state.probe(&self.name);
            let mut err = anyhow!("The shim exited without reporting ({status})");
            if !tail.is_empty() {
                err = anyhow!("{tail}").context(format!(
                    "The shim exited without reporting ({status}); the end of its log"
                ));
            }
            return Err(err);
        }
        serde_json::from_str(line.trim())
            .with_context(|| format!("Cannot parse the shim's status line {:?}", line.trim()))
    }

    /// Reap the shim if it has exited (it is our child).
    pub fn reap(&mut self) {
        let _ = wait_briefly(&mut self.child);
    }

    /// Wait until the shim exits (when its vkernel ends), and reap it.
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }
}

fn wait_briefly(child: &mut std::process::Child) -> String {
    for _ in 0..100 {
        match child.try_wait() {
            Ok(Some(s)) => return s.to_string(),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return format!("cannot wait for it: {e}"),
        }
    }
    "still running".into()
}

/// The last few lines of the shim's log, for an error message.
fn log_tail(path: &std::path::Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trip() {
        let r = Reply::Ready {
            init_pid: 42,
            console_tty: "/dev/pts/3".into(),
            restore: None,
        };
        let s = serde_json::to_string(&r).expect("encodes");
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Reply>(&s).expect("decodes"), r);
    }

    #[test]
    fn remote_chain_keeps_order() {
        let e = anyhow::Error::from(RemoteError::from_chain(&[
            "a".into(),
            "b".into(),
            "c".into(),
        ]));
        let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
        assert_eq!(chain, ["a", "b", "c"]);
    }
}
