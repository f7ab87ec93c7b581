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

use std::time::{Duration, Instant};

use crate::inject::Remote;
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
///
/// The tracee must not run a single instruction of its own between its tracer's detach and
/// our seize, whatever ptrace stop it was in. `PTRACE_DETACH` with SIGSTOP would not do: the
/// signal is dropped when the tracee sits in an interrupt stop (as [`give`] leaves it, until
/// its tracer next runs it), which then resumes natively. So SIGSTOP is queued first and every
/// other signal blocked (a pending SIGALRM would otherwise be dequeued first and run a handler
/// natively), then the tracee is detached without a signal and its first act is to stop.
pub fn take(tracer: i32, tracee: i32, tracee_ns: i32) -> Result<Vec<i32>> {
    let mask = blocked_mask(tracee)?;
    in_tracer(tracer, |r| {
        // PTRACE_SETSIGMASK reads the new mask from the tracer's memory: a page of its own,
        // so that nothing of the tracer's memory changes.
        let page = r.map_anon(PAGE)?;
        let detached = detach_stopped(r, page, tracee, tracee_ns);
        let unmapped = r.unmap(page, PAGE);
        detached?;
        unmapped
    })?;
    wait_state(tracee, "T")?;
    ptrace::seize(tracee, ptrace::PTRACE_O_TRACESYSGOOD)?;
    // Seizing a task in a group stop makes it trap at once and report that stop.
    expect_stop(tracee, "seized")?;
    ptrace::set_sigmask(tracee, mask)?;
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

const PAGE: u64 = 4096;

/// In the tracer `r`: block every signal of its tracee, queue SIGSTOP and detach it, so that
/// it group-stops before it returns to user space. `page` is a writable page of the tracer.
fn detach_stopped(r: &mut Remote, page: u64, tracee: i32, tracee_ns: i32) -> Result<()> {
    r.write(page, &u64::MAX.to_ne_bytes())?;
    r.call(
        "ptrace(PTRACE_SETSIGMASK)",
        libc::SYS_ptrace,
        &[
            u64::from(ptrace::PTRACE_SETSIGMASK),
            tracee_ns as u64,
            8,
            page,
        ],
    )?;
    // A ptrace-stopped task keeps a signal sent to it pending until it resumes.
    crate::calls::tgkill(tracee, tracee, libc::SIGSTOP)?;
    r.call(
        "ptrace(PTRACE_DETACH)",
        libc::SYS_ptrace,
        &[libc::PTRACE_DETACH as u64, tracee_ns as u64, 0, 0],
    )
    .map(drop)
}

/// The signals `tid` blocks, from /proc/TID/status.
fn blocked_mask(tid: i32) -> Result<u64> {
    let path = proc::pid_path(tid, "status");
    let status = vkm_common::procfs::parse_status(&proc::read(&path)?)
        .map_err(|e| proc::parse_error(path, e))?;
    Ok(status.sig_blk)
}

/// The reverse of [`take`]: our stopped tracee `tracee` goes to `tracer` (stopped under our
/// ptrace), which seizes it with [`GIVE_OPTIONS`], interrupts it and consumes that stop. The
/// tracee's registers are not kept (its tracer sets them before it runs it); its signal mask
/// is. Signals that were pending for it are taken on the way and returned.
pub fn give(tracer: i32, tracee: i32, tracee_ns: i32) -> Result<Vec<i32>> {
    // A pending signal it does not block would run its handler natively once detached: take
    // every one first (an injected getpid sees them as stops) and let the caller resend them.
    let mut r = Remote::through_vdso(tracee)?;
    let gadget = r.gadget;
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

/// Run injected calls in the stopped thread `tid` with its signals blocked, through a `syscall`
/// instruction of its vDSO; its registers and signal mask are put back whatever happens.
fn in_tracer<T>(tid: i32, f: impl FnOnce(&mut Remote) -> Result<T>) -> Result<T> {
    let mask = ptrace::get_sigmask(tid)?;
    // Signals that arrive meanwhile (UML's timer) stay pending instead of being swallowed by
    // the injection, which would lose a timer tick for good.
    ptrace::set_sigmask(tid, u64::MAX)?;
    let mut r = Remote::through_vdso(tid)?;
    let out = f(&mut r);
    let regs = r.restore_regs();
    let masked = ptrace::set_sigmask(tid, mask);
    let out = out?;
    regs?;
    masked?;
    Ok(out)
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
