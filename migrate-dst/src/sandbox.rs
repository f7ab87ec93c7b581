//! The sandbox a vkernel lives in: a fresh time namespace, a fresh IPC namespace (SysV IPC,
//! POSIX message queues) and a fresh PID namespace whose pid 1 is our own small reaper
//! ("init"), not part of the vkernel. `vkmigrate run` has init start the command; a restore has
//! init spawn parked skeleton processes at chosen PIDs, which the restorer then turns into the
//! saved processes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};

use vkm_common::model::Clocks;
use vkm_sys::{calls, proc};

use crate::DstError;

/// The fd number at which init and every skeleton process hold a pidfd of the agent (the
/// shim), so that a skeleton can pull any file the agent prepared with `pidfd_getfd`. High, so
/// that it survives init's fd clean-up and rarely collides with a saved fd (the restorer moves
/// it when it does).
pub const AGENT_PIDFD: RawFd = 1000;
/// Fds of init's command and reply pipes.
const CTL_FD: RawFd = 3;
const ACK_FD: RawFd = 4;
const CONSOLE_FD: RawFd = 5;

pub enum InitMode {
    /// Start `argv` as pid 2, in its own session, with `console` (a pty slave) as its
    /// controlling terminal and stdin/stdout/stderr.
    Run { argv: Vec<String>, console: OwnedFd },
    /// Spawn parked processes on request (see [`Sandbox::spawn_parked`]).
    Restore,
}

/// A running sandbox: init's host pid and the pipes to talk to it.
pub struct Sandbox {
    pub init_pid: i32,
    ctl: Option<File>,
    ack: Option<File>,
    /// Init has been reaped: its pid may belong to someone else now.
    reaped: bool,
}

impl Sandbox {
    /// Create the namespaces and init. `clocks`: CLOCK_MONOTONIC/BOOTTIME the vkernel must
    /// see now (restore); `None` keeps the host's clocks (a new vkernel).
    ///
    /// # Safety
    /// The calling process must be single-threaded: init is forked from it and runs Rust code
    /// in the child, which is only sound when no other thread can hold a lock.
    pub unsafe fn create(mode: InitMode, clocks: Option<Clocks>) -> Result<Sandbox, DstError> {
        calls::unshare(libc::CLONE_NEWTIME)?;
        if let Some(c) = clocks {
            let mono = c.monotonic_ns - calls::clock_ns(libc::CLOCK_MONOTONIC);
            let boot = c.boottime_ns - calls::clock_ns(libc::CLOCK_BOOTTIME);
            calls::set_timens_offsets(mono, boot)?;
        }
        let (ctl_r, ctl_w) = pipe()?;
        let (ack_r, ack_w) = pipe()?;
        let pidfd = match mode {
            InitMode::Restore => Some(calls::pidfd_open(std::process::id() as i32)?),
            InitMode::Run { .. } => None,
        };
        // A fresh IPC namespace too: restored SysV segments get their old keys and ids without
        // clashing with the host's or with those of a source left running on this host.
        let flags = (libc::CLONE_NEWPID | libc::CLONE_NEWIPC) as u64;
        // SAFETY: the caller guarantees we are single-threaded (see above).
        let pid = unsafe { calls::clone3_fork(flags, Some(1)) }?;
        if pid == 0 {
            // Child: init. Nothing here may return into the caller's code.
            let (console, argv) = match mode {
                InitMode::Run { console, argv } => (Some(console.into_raw_fd()), argv),
                InitMode::Restore => (None, Vec::new()),
            };
            init_main(
                ctl_r.into_raw_fd(),
                ack_w.into_raw_fd(),
                console,
                pidfd.map(IntoRawFd::into_raw_fd),
                argv,
            );
        }
        drop(ctl_r);
        drop(ack_w);
        drop(pidfd);
        Ok(Sandbox {
            init_pid: pid,
            ctl: Some(File::from(ctl_w)),
            ack: Some(File::from(ack_r)),
            reaped: false,
        })
    }

    /// Ask init to create a process at namespace pid `ns_pid` that parks in `pause()`; returns
    /// its host pid once it is parked.
    pub fn spawn_parked(&mut self, ns_pid: i32) -> Result<i32, DstError> {
        let (Some(ctl), Some(ack)) = (self.ctl.as_mut(), self.ack.as_mut()) else {
            return Err(DstError::Init("init no longer takes commands".into()));
        };
        let mut msg = [0u8; 5];
        msg[0] = b'S';
        msg[1..].copy_from_slice(&ns_pid.to_le_bytes());
        ctl.write_all(&msg)
            .map_err(|e| DstError::Init(format!("cannot send a command: {e}")))?;
        let mut reply = [0u8; 4];
        ack.read_exact(&mut reply)
            .map_err(|e| DstError::Init(format!("no reply: {e}")))?;
        let r = i32::from_le_bytes(reply);
        if r < 0 {
            return Err(DstError::Sys(calls::errno("clone3(set_tid)", ns_pid, -r)));
        }
        // Find the host pid among init's children, then wait until it sits in pause(): seizing
        // it earlier could stop it before its own set-up ran.
        for _ in 0..2000 {
            for c in proc::children(self.init_pid)? {
                if proc::ns_pid(c).ok() == Some(ns_pid) {
                    let sc = proc::read(proc::pid_path(c, "syscall")).unwrap_or_default();
                    if sc.starts_with("34 ") {
                        return Ok(c);
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Err(DstError::Init(format!("process {ns_pid} did not park")))
    }

    /// Ask init to reap the skeletons that were killed (they are its children, or became so).
    pub fn reap(&mut self) -> Result<(), DstError> {
        self.command(b'R').map(drop)
    }

    /// Send init a one-letter command and wait for its 4-byte reply.
    fn command(&mut self, letter: u8) -> Result<[u8; 4], DstError> {
        let (Some(ctl), Some(ack)) = (self.ctl.as_mut(), self.ack.as_mut()) else {
            return Err(DstError::Init("init no longer takes commands".into()));
        };
        ctl.write_all(&[letter, 0, 0, 0, 0])
            .map_err(|e| DstError::Init(format!("cannot send a command: {e}")))?;
        let mut reply = [0u8; 4];
        ack.read_exact(&mut reply)
            .map_err(|e| DstError::Init(format!("no reply: {e}")))?;
        Ok(reply)
    }

    /// The commit point of a restore: until now init dies with us (and its death kills every
    /// process of the namespace), so that a restorer that crashes leaves nothing half-built
    /// behind and no vkernel that runs without anyone knowing. From now on the vkernel lives on
    /// whatever happens to us. Call it just before letting the vkernel run.
    pub fn commit(&mut self) -> Result<(), DstError> {
        self.command(b'K').map(drop)
    }

    /// Tell init that no more processes will be requested: it becomes a plain reaper that exits
    /// when the namespace is empty.
    pub fn done(&mut self) {
        if let Some(mut ctl) = self.ctl.take() {
            let _ = ctl.write_all(b"D\0\0\0\0");
        }
        self.ack = None;
    }

    /// Kill everything in the sandbox (init's death kills the namespace) and reap init. Safe to
    /// call more than once.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        self.reaped = true;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.init_pid),
            nix::sys::signal::SIGKILL,
        );
        // A dying init waits until every task of its namespace is reaped, and the tasks we
        // trace (a restore in progress) can only be reaped once we, their tracer, have
        // collected them: wait for any of our tracees and children until init is gone.
        loop {
            match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::__WALL)) {
                Ok(ws) if ws.pid() == Some(nix::unistd::Pid::from_raw(self.init_pid)) => {
                    if matches!(
                        ws,
                        nix::sys::wait::WaitStatus::Exited(..)
                            | nix::sys::wait::WaitStatus::Signaled(..)
                    ) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), DstError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| DstError::Sys(calls::errno("pipe2", 0, e as i32)))
}

/// pid 1 of the sandbox. Runs in a fork of the single-threaded shim; never returns.
fn init_main(
    ctl: RawFd,
    ack: RawFd,
    console: Option<RawFd>,
    pidfd: Option<RawFd>,
    argv: Vec<String>,
) -> ! {
    use vkm_sys::calls::raw;
    // Put what we keep at known numbers and drop everything else the shim had open.
    let keep = [(ctl, CTL_FD), (ack, ACK_FD)]
        .into_iter()
        .chain(console.map(|c| (c, CONSOLE_FD)))
        .chain(pidfd.map(|p| (p, AGENT_PIDFD)));
    let mut moved = Vec::new();
    for (fd, to) in keep {
        // First to a high temporary number, so that no later dup2 overwrites a source.
        let tmp = raw::dup_above(fd, 2000);
        moved.push((tmp, to));
    }
    for (tmp, to) in moved {
        raw::dup2(tmp, to);
        raw::close(tmp);
    }
    raw::close_range_except(&[CTL_FD, ACK_FD, CONSOLE_FD, AGENT_PIDFD]);
    // The shim's dispositions (Rust ignores SIGPIPE) and mask must not leak into the vkernel:
    // exec keeps ignored signals ignored, and skeletons would pass them on otherwise.
    raw::reset_signals();
    raw::set_cloexec(CTL_FD, true);
    raw::set_cloexec(ACK_FD, true);
    if console.is_some() {
        raw::set_cloexec(CONSOLE_FD, true);
        let main = raw::fork();
        if main == 0 {
            raw::setsid();
            raw::make_ctty(CONSOLE_FD);
            for fd in 0..3 {
                raw::dup2(CONSOLE_FD, fd);
            }
            raw::close_from(3);
            let err = raw::execvp(&argv);
            let msg = format!(
                "vkmigrate: cannot execute {}: {err}\n",
                argv.first().map_or("", String::as_str)
            );
            raw::write_all(2, msg.as_bytes());
            raw::exit(127);
        }
        raw::close(CONSOLE_FD);
        raw::close(CTL_FD);
        raw::close(ACK_FD);
        reap_forever(main);
    }
    // Restore mode: we die with the restorer until it commits ('K'). Had it died before we
    // got here, the signal would never come: then we go at once.
    raw::set_pdeathsig(libc::SIGKILL);
    if !raw::pidfd_alive(AGENT_PIDFD) {
        raw::exit(1);
    }
    // Serve spawn requests until 'D'.
    loop {
        let mut msg = [0u8; 5];
        if !raw::read_exact(CTL_FD, &mut msg) {
            break;
        }
        if msg[0] == b'K' {
            raw::set_pdeathsig(0);
            raw::write_all(ACK_FD, &0i32.to_le_bytes());
            continue;
        }
        if msg[0] == b'R' {
            // The restorer killed a skeleton to build another: free its pids.
            let n = raw::reap_exited();
            raw::write_all(ACK_FD, &i32::try_from(n).unwrap_or(i32::MAX).to_le_bytes());
            continue;
        }
        if msg[0] != b'S' {
            break;
        }
        let ns_pid = i32::from_le_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let r = raw::fork_with_pid(ns_pid);
        if r == 0 {
            // The skeleton: parked until the restorer seizes it.
            loop {
                raw::pause();
            }
        }
        raw::write_all(ACK_FD, &r.min(0).to_le_bytes());
    }
    raw::close(CTL_FD);
    raw::close(ACK_FD);
    raw::close(AGENT_PIDFD);
    reap_forever(0);
}

/// Reap every child until none is left, then exit with the status of `main` (0 if none).
fn reap_forever(main: i32) -> ! {
    use vkm_sys::calls::raw;
    let mut code = 0;
    loop {
        match raw::wait_any() {
            Some((pid, status)) => {
                if pid == main {
                    code = status;
                }
            }
            None => raw::exit(code),
        }
    }
}
