//! Moving a tracee between its own tracer (a process of the vkernel, e.g. UML's kernel process)
//! and us.
//!
//! A task has one tracer at a time, and the guest processes of a UML are traced by the UML
//! kernel process, so we cannot seize them. We borrow them instead: the (stopped) tracer is
//! made to detach the tracee into a group stop (`PTRACE_DETACH` with SIGSTOP), we seize it and
//! end that group stop (SIGCONT, consumed while it is ours), then read or build its state. To
//! hand it back it is parked in `pause()` with nothing pending, detached, and the tracer seizes
//! and interrupts it and collects that stop: it is again a stopped tracee with nothing to
//! report, which is all UML expects of a guest process it is not running, since UML loads every
//! register before it resumes one (`research/uml-inventory.md` §1.3, §6.3).
//!
//! Why not simply a group stop on the way back: a group stop stays in effect after the tracer
//! resumes the task (only SIGCONT ends it), and the tracer then sees a second SIGSTOP stop on
//! the task later (measured: UML logs "child stopped with signal 19" and kills the process).

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use crate::inject::{self, Remote};
use crate::ptrace::{self, Stop};
use crate::{proc, Result, SysError};

/// The options a tracer gets back its tracees with: UML's own (`PTRACE_O_TRACESYSGOOD`, the
/// only one it sets), plus `EXITKILL`, so that a guest process can never outlive its tracer and
/// run on the host on its own (measured: it does, without it).
pub const GIVE_OPTIONS: u64 = ptrace::PTRACE_O_TRACESYSGOOD | ptrace::PTRACE_O_EXITKILL;

/// How long a detached tracee may take to reach its stop or its `pause()`.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// The task `tracer` traces is detached from it and seized by us, stopped, with no group stop
/// in effect. `tracer` (host tid) must be stopped under our ptrace; `tracee` is the host tid,
/// `tracee_ns` the same task's tid in the tracer's PID namespace. Returns signals that were
/// pending for the tracee and had to be taken on the way (send them again after [`give`]).
pub fn take(tracer: i32, tracee: i32, tracee_ns: i32) -> Result<Vec<i32>> {
    in_tracer(tracer, |r| {
        r.call(
            "ptrace(PTRACE_DETACH)",
            libc::SYS_ptrace,
            &[
                libc::PTRACE_DETACH as u64,
                tracee_ns as u64,
                0,
                libc::SIGSTOP as u64,
            ],
        )
        .map(drop)
    })?;
    wait_state(tracee, "T")?;
    ptrace::seize(tracee, ptrace::PTRACE_O_TRACESYSGOOD)?;
    // Seizing a task in a group stop makes it trap at once and report that stop.
    expect_stop(tracee, "seized")?;
    // End the group stop; the SIGCONT itself is reported to us (a tracer sees every signal)
    // and suppressed. Nothing of the task's own code runs: both stops are inside the kernel's
    // signal handling on its way back to user space.
    crate::calls::tgkill(tracee, tracee, libc::SIGCONT)?;
    ptrace::cont(tracee, 0)?;
    let mut taken = Vec::new();
    loop {
        match expect_stop(tracee, "continued")? {
            Stop::Signal(libc::SIGCONT) => return Ok(taken),
            Stop::Signal(sig) => {
                taken.push(sig);
                ptrace::cont(tracee, 0)?;
            }
            _ => ptrace::cont(tracee, 0)?,
        }
    }
}

/// The reverse of [`take`]: our stopped tracee `tracee` goes to `tracer` (stopped under our
/// ptrace), which seizes it with [`GIVE_OPTIONS`], interrupts it and consumes that stop. The
/// tracee's registers are not kept (its tracer sets them before it runs it); its signal mask
/// is. Signals that were pending for it are taken on the way and returned.
pub fn give(tracer: i32, tracee: i32, tracee_ns: i32) -> Result<Vec<i32>> {
    let gadget = vdso_gadget(tracee)?;
    // A pending signal it does not block would run its handler natively once detached: take
    // every one first (an injected getpid sees them as stops) and let the caller resend them.
    let mem = open_mem(tracee)?;
    let mut r = Remote::new(tracee, gadget, 0, 0, mem)?;
    r.stack = r.saved.rsp;
    r.call("getpid", libc::SYS_getpid, &[])?;
    let taken: Vec<i32> = r
        .swallowed
        .iter()
        .filter_map(|si| si.get(0..4))
        .filter_map(|b| <[u8; 4]>::try_from(b).ok())
        .map(i32::from_ne_bytes)
        .collect();
    let mut regs = r.saved;
    regs.rip = gadget;
    regs.rax = libc::SYS_pause as u64;
    regs.orig_rax = u64::MAX;
    ptrace::setregs(tracee, &regs)?;
    ptrace::detach(tracee, 0)?;
    wait_state(tracee, "S")?;
    in_tracer(tracer, |r| {
        let ptrace_call = |r: &mut Remote, op, req: u64, data: u64| {
            r.call(op, libc::SYS_ptrace, &[req, tracee_ns as u64, 0, data])
        };
        ptrace_call(
            r,
            "ptrace(PTRACE_SEIZE)",
            u64::from(ptrace::PTRACE_SEIZE),
            GIVE_OPTIONS,
        )?;
        ptrace_call(
            r,
            "ptrace(PTRACE_INTERRUPT)",
            u64::from(ptrace::PTRACE_INTERRUPT),
            0,
        )?;
        let t0 = Instant::now();
        loop {
            let got = r.call(
                "wait4",
                libc::SYS_wait4,
                &[
                    tracee_ns as u64,
                    0,
                    (libc::__WALL | libc::WNOHANG) as u64,
                    0,
                ],
            )?;
            if got == tracee_ns as u64 {
                return Ok(());
            }
            if t0.elapsed() > STOP_TIMEOUT {
                return Err(SysError::Unexpected {
                    pid: tracee,
                    what: "never reported its stop to its tracer".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    })?;
    Ok(taken)
}

fn expect_stop(tid: i32, what: &str) -> Result<Stop> {
    match ptrace::wait_timeout(tid, STOP_TIMEOUT)? {
        Some(s @ (Stop::Event(_) | Stop::Signal(_) | Stop::Syscall)) => Ok(s),
        Some(other) => Err(SysError::Unexpected {
            pid: tid,
            what: format!("reported {other:?} instead of a stop when {what}"),
        }),
        None => Err(SysError::Unexpected {
            pid: tid,
            what: format!("did not stop when {what}"),
        }),
    }
}

fn open_mem(tid: i32) -> Result<std::fs::File> {
    let mem_path = proc::pid_path(tid, "mem");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mem_path)
        .map_err(|source| SysError::Path {
            path: mem_path,
            source,
        })
}

/// Run injected calls in the stopped thread `tid` with its signals blocked, through a `syscall`
/// instruction of its vDSO; its registers and signal mask are put back whatever happens.
fn in_tracer<T>(tid: i32, f: impl FnOnce(&mut Remote) -> Result<T>) -> Result<T> {
    let gadget = vdso_gadget(tid)?;
    let mem = open_mem(tid)?;
    let mask = ptrace::get_sigmask(tid)?;
    // Signals that arrive meanwhile (UML's timer) stay pending instead of being swallowed by
    // the injection, which would lose a timer tick for good.
    ptrace::set_sigmask(tid, u64::MAX)?;
    let mut r = Remote::new(tid, gadget, 0, 0, mem)?;
    r.stack = r.saved.rsp;
    let out = f(&mut r);
    let regs = r.restore_regs();
    let masked = ptrace::set_sigmask(tid, mask);
    let out = out?;
    regs?;
    masked?;
    Ok(out)
}

/// A `syscall` instruction in the vDSO of `tid`'s process.
pub fn vdso_gadget(tid: i32) -> Result<u64> {
    let maps = proc::read(proc::pid_path(tid, "maps"))?;
    let (start, end) = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|range| range.split_once('-'))
        .and_then(|(s, e)| {
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .ok_or_else(|| SysError::Unexpected {
            pid: tid,
            what: "has no [vdso] to borrow a syscall instruction from".into(),
        })?;
    let mut code = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
    proc::read_vm(tid, start, &mut code).map_err(|source| SysError::Syscall {
        op: "read the vDSO of",
        pid: tid,
        source,
    })?;
    inject::find_syscall_insn(&code, start).ok_or_else(|| SysError::Unexpected {
        pid: tid,
        what: "has no syscall instruction in its [vdso]".into(),
    })
}

/// Wait until `tid` is in `state` (`T`: stopped, `S`: asleep) in /proc/TID/stat.
fn wait_state(tid: i32, state: &str) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let stat = proc::read(proc::pid_path(tid, "stat"))?;
        let now = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if now == Some(state) {
            return Ok(());
        }
        if t0.elapsed() > STOP_TIMEOUT {
            return Err(SysError::Unexpected {
                pid: tid,
                what: format!("did not reach state {state} after being detached (state {now:?})"),
            });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
