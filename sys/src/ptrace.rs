//! ptrace(2) wrappers. Raw rather than `nix::sys::ptrace` because nix cannot represent
//! real-time signals in wait statuses and resume requests, and vkernels use them (POSIX timers).
//!
//! All requests must come from the one thread that attached: ptrace from any other thread of the
//! tracer fails with ESRCH. Callers keep all tracing on one OS thread.

use crate::{Result, SysError};
use vkm_common::model::USER_REGS_SIZE;

pub const PTRACE_O_TRACESYSGOOD: u64 = 1;
pub const PTRACE_O_TRACEFORK: u64 = 1 << 1;
pub const PTRACE_O_TRACEVFORK: u64 = 1 << 2;
pub const PTRACE_O_TRACECLONE: u64 = 1 << 3;
pub const PTRACE_O_EXITKILL: u64 = 1 << 20;

pub const PTRACE_EVENT_FORK: i32 = 1;
pub const PTRACE_EVENT_VFORK: i32 = 2;
pub const PTRACE_EVENT_CLONE: i32 = 3;
pub const PTRACE_EVENT_STOP: i32 = 128;

const PTRACE_GETREGSET: u32 = 0x4204;
const PTRACE_SETREGSET: u32 = 0x4205;
pub(crate) const PTRACE_SEIZE: u32 = 0x4206;
pub(crate) const PTRACE_INTERRUPT: u32 = 0x4207;
const PTRACE_PEEKSIGINFO: u32 = 0x4209;
const PTRACE_GETSIGMASK: u32 = 0x420a;
pub(crate) const PTRACE_SETSIGMASK: u32 = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
const NT_X86_XSTATE: usize = 0x202;
/// The kernel's xsave area is at most a few KiB (2432 bytes with AVX-512 + PKU here); AMX
/// brings it to about 11 KiB. 16 KiB leaves room without trusting a length from anywhere.
const XSTATE_MAX: usize = 16 * 1024;

/// General-purpose registers of a stopped thread.
pub type Regs = libc::user_regs_struct;

fn ptrace(req: u32, pid: i32, addr: usize, data: usize, op: &'static str) -> Result<i64> {
    // SAFETY: every caller passes, for `addr`/`data`, either plain integers or pointers to
    // buffers that live across the call and are as large as the request writes (documented at
    // each call site). ptrace never retains the pointers.
    let r = unsafe { libc::ptrace(req, pid, addr, data) };
    if r == -1 {
        Err(SysError::last(op, pid))
    } else {
        Ok(r)
    }
}

/// `PTRACE_SEIZE` with `options` (`PTRACE_O_*`).
pub fn seize(pid: i32, options: u64) -> Result<()> {
    ptrace(PTRACE_SEIZE, pid, 0, options as usize, "PTRACE_SEIZE").map(drop)
}

/// `PTRACE_INTERRUPT`: stop a seized thread; it reports `PTRACE_EVENT_STOP`.
pub fn interrupt(pid: i32) -> Result<()> {
    ptrace(PTRACE_INTERRUPT, pid, 0, 0, "PTRACE_INTERRUPT").map(drop)
}

/// `PTRACE_CONT`, delivering `sig` (0 = none).
pub fn cont(pid: i32, sig: i32) -> Result<()> {
    ptrace(libc::PTRACE_CONT, pid, 0, sig as usize, "PTRACE_CONT").map(drop)
}

/// `PTRACE_SETOPTIONS`: the stopped tracee's options become `options` (`PTRACE_O_*`).
pub fn set_options(pid: i32, options: u64) -> Result<()> {
    ptrace(
        libc::PTRACE_SETOPTIONS,
        pid,
        0,
        options as usize,
        "PTRACE_SETOPTIONS",
    )
    .map(drop)
}

/// `PTRACE_SYSCALL`: resume until the next syscall entry or exit.
pub fn syscall(pid: i32, sig: i32) -> Result<()> {
    ptrace(libc::PTRACE_SYSCALL, pid, 0, sig as usize, "PTRACE_SYSCALL").map(drop)
}

/// `PTRACE_DETACH`, delivering `sig` (0 = none).
pub fn detach(pid: i32, sig: i32) -> Result<()> {
    ptrace(libc::PTRACE_DETACH, pid, 0, sig as usize, "PTRACE_DETACH").map(drop)
}

/// `PTRACE_GETEVENTMSG`: the new task's pid (in the tracer's namespace) at a fork/clone stop.
pub fn geteventmsg(pid: i32) -> Result<u64> {
    let mut msg: libc::c_ulong = 0;
    ptrace(
        libc::PTRACE_GETEVENTMSG,
        pid,
        0,
        std::ptr::addr_of_mut!(msg) as usize,
        "PTRACE_GETEVENTMSG",
    )?;
    Ok(msg)
}

pub fn getregs(pid: i32) -> Result<Regs> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETREGS,
        pid,
        0,
        std::ptr::addr_of_mut!(regs) as usize,
        "PTRACE_GETREGS",
    )?;
    Ok(regs)
}

pub fn setregs(pid: i32, regs: &Regs) -> Result<()> {
    ptrace(
        libc::PTRACE_SETREGS,
        pid,
        0,
        std::ptr::from_ref(regs) as usize,
        "PTRACE_SETREGS",
    )
    .map(drop)
}

/// The thread's `NT_X86_XSTATE` area, as long as the kernel says it is.
pub fn get_xstate(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // `iov` points at `buf`, which outlives the call; the kernel shrinks iov_len to what it wrote.
    ptrace(
        PTRACE_GETREGSET,
        pid,
        NT_X86_XSTATE,
        std::ptr::addr_of_mut!(iov) as usize,
        "PTRACE_GETREGSET(NT_X86_XSTATE)",
    )?;
    let len = iov.iov_len;
    buf.truncate(len);
    Ok(buf)
}

pub fn set_xstate(pid: i32, xstate: &[u8]) -> Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    ptrace(
        PTRACE_SETREGSET,
        pid,
        NT_X86_XSTATE,
        std::ptr::addr_of_mut!(iov) as usize,
        "PTRACE_SETREGSET(NT_X86_XSTATE)",
    )
    .map(drop)
}

pub fn get_sigmask(pid: i32) -> Result<u64> {
    let mut mask: u64 = 0;
    ptrace(
        PTRACE_GETSIGMASK,
        pid,
        8,
        std::ptr::addr_of_mut!(mask) as usize,
        "PTRACE_GETSIGMASK",
    )?;
    Ok(mask)
}

pub fn set_sigmask(pid: i32, mask: u64) -> Result<()> {
    ptrace(
        PTRACE_SETSIGMASK,
        pid,
        8,
        std::ptr::addr_of!(mask) as usize,
        "PTRACE_SETSIGMASK",
    )
    .map(drop)
}

/// `struct ptrace_rseq_configuration`.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct RseqConfig {
    pub rseq_abi_pointer: u64,
    pub rseq_abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

pub fn rseq_config(pid: i32) -> Result<RseqConfig> {
    let mut c = RseqConfig::default();
    ptrace(
        PTRACE_GET_RSEQ_CONFIGURATION,
        pid,
        std::mem::size_of::<RseqConfig>(),
        std::ptr::addr_of_mut!(c) as usize,
        "PTRACE_GET_RSEQ_CONFIGURATION",
    )?;
    Ok(c)
}

/// `struct ptrace_peeksiginfo_args`.
#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
pub const SIGINFO_SIZE: usize = 128;

/// Whether a signal taken from a thread at its signal-delivery stop comes again by itself:
/// a fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE raised by an instruction, `si_code` > 0) leaves
/// the thread at the faulting instruction, which faults again when it runs. Queued again
/// as well, its handler would run twice, once with a siginfo that names no fault address.
pub fn comes_again(sig: i32, siginfo: &[u8]) -> bool {
    let code = siginfo
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, i32::from_ne_bytes);
    matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE
    ) && code > 0
        && code != libc::SI_KERNEL
}

/// The siginfo a `tgkill(sig)` of an unknown sender would have queued (`SI_TKILL`): for a
/// signal that was pending but whose own siginfo we did not get to read.
pub fn tkill_siginfo(sig: i32) -> Vec<u8> {
    let mut si = vec![0u8; SIGINFO_SIZE];
    si[0..4].copy_from_slice(&sig.to_ne_bytes());
    si[8..12].copy_from_slice(&libc::SI_TKILL.to_ne_bytes());
    si
}

/// A signal taken from a thread at the signal-delivery stop it made as we stopped it: its
/// number and siginfo (see [`wait_interrupted`]).
pub type Taken = (i32, Vec<u8>);

/// How waiting for an interrupted thread ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupted {
    /// In the interrupt's stop.
    Stopped,
    /// It exited meanwhile.
    Exited,
    /// It did not stop in time.
    Timeout,
}

/// Wait at most `timeout` (per stop) for a thread we interrupted (`PTRACE_INTERRUPT`). A
/// thread that was being delivered a signal stops for that signal first: the signal is taken
/// (pushed onto `taken`) and the thread sent on to the interrupt's own stop. Such a signal
/// must be made pending again before the thread runs ([`release`]): a detach "with" it would
/// drop it, since a detach delivers a signal only from the stop that signal caused.
pub fn wait_interrupted(
    tid: i32,
    timeout: std::time::Duration,
    taken: &mut Vec<Taken>,
) -> Result<Interrupted> {
    loop {
        match wait_timeout(tid, timeout)? {
            None => return Ok(Interrupted::Timeout),
            Some(Stop::Event(_) | Stop::Syscall) => return Ok(Interrupted::Stopped),
            Some(Stop::Exited(_) | Stop::Killed(_)) => return Ok(Interrupted::Exited),
            Some(Stop::Signal(sig)) => {
                taken.push((sig, getsiginfo(tid)?));
                cont(tid, 0)?;
                interrupt(tid)?;
            }
        }
    }
}

/// Let the stopped thread `tid` of process `tgid` go, the signals [`wait_interrupted`] took
/// from it pending again first ([`crate::calls::requeue_signal`]). A signal that cannot be
/// queued again is logged; the detach's own failure is returned.
pub fn release(tgid: i32, tid: i32, taken: &[Taken]) -> Result<()> {
    for (sig, si) in taken {
        if let Err(e) = crate::calls::requeue_signal(tgid, tid, *sig, si) {
            tracing::error!(tid, sig, error = %e, "a signal taken while the thread was stopped is lost");
        }
    }
    detach(tid, 0)
}

/// Pending signals of a stopped thread (`shared`: the process-wide queue), as raw siginfos,
/// without dequeuing them.
pub fn peek_siginfo(pid: i32, shared: bool) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    loop {
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: 32,
        };
        let mut buf = vec![0u8; SIGINFO_SIZE * 32];
        // `buf` holds `nr` siginfos of 128 bytes.
        let n = ptrace(
            PTRACE_PEEKSIGINFO,
            pid,
            std::ptr::addr_of!(args) as usize,
            buf.as_mut_ptr() as usize,
            "PTRACE_PEEKSIGINFO",
        )?;
        let n = usize::try_from(n).unwrap_or(0);
        out.extend(buf.chunks(SIGINFO_SIZE).take(n).map(<[u8]>::to_vec));
        if n < 32 {
            return Ok(out);
        }
    }
}

/// `PTRACE_GETSIGINFO`: the siginfo of the signal a thread is stopped for.
pub fn getsiginfo(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; SIGINFO_SIZE];
    ptrace(
        libc::PTRACE_GETSIGINFO,
        pid,
        0,
        buf.as_mut_ptr() as usize,
        "PTRACE_GETSIGINFO",
    )?;
    Ok(buf)
}

/// What `waitpid` reported for a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `PTRACE_EVENT_*` stop (fork, clone, stop...).
    Event(i32),
    /// Syscall entry or exit stop (with `PTRACE_O_TRACESYSGOOD`).
    Syscall,
    /// Signal-delivery stop (or group stop) for this signal.
    Signal(i32),
    Exited(i32),
    Killed(i32),
}

/// `waitpid(pid, __WALL | extra)`, retried on EINTR: the raw status, None with WNOHANG when
/// nothing changed.
fn waitpid(pid: i32, extra: i32) -> Result<Option<i32>> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid out pointer for the duration of the call.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | extra) };
        if r == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SysError::Syscall {
                op: "waitpid",
                pid,
                source: e,
            });
        }
        return Ok((r > 0).then_some(status));
    }
}

/// `waitpid(pid, __WALL)`: the next state change of a traced task.
pub fn wait(pid: i32) -> Result<Stop> {
    loop {
        if let Some(status) = waitpid(pid, 0)? {
            return Ok(decode_status(status));
        }
    }
}

/// `waitpid(pid, __WALL|WNOHANG)` polled until `timeout`: None when the task did not change
/// state in time (e.g. it waits uninterruptibly for a vfork child).
pub fn wait_timeout(pid: i32, timeout: std::time::Duration) -> Result<Option<Stop>> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = waitpid(pid, libc::WNOHANG)? {
            return Ok(Some(decode_status(status)));
        }
        if t0.elapsed() >= timeout {
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

fn decode_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        Stop::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if event != 0 {
            Stop::Event(event)
        } else if sig == (libc::SIGTRAP | 0x80) {
            Stop::Syscall
        } else {
            Stop::Signal(sig)
        }
    }
}

/// Registers as the fixed byte layout of `struct user_regs_struct` (27 little-endian u64s in
/// kernel order), so that images do not depend on a Rust struct layout.
pub fn regs_to_bytes(r: &Regs) -> Vec<u8> {
    regs_fields(r)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

pub fn regs_from_bytes(b: &[u8]) -> Option<Regs> {
    if b.len() != USER_REGS_SIZE {
        return None;
    }
    let mut v = [0u64; 27];
    for (i, c) in b.chunks_exact(8).enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        v[i] = u64::from_le_bytes(a);
    }
    Some(Regs {
        r15: v[0],
        r14: v[1],
        r13: v[2],
        r12: v[3],
        rbp: v[4],
        rbx: v[5],
        r11: v[6],
        r10: v[7],
        r9: v[8],
        r8: v[9],
        rax: v[10],
        rcx: v[11],
        rdx: v[12],
        rsi: v[13],
        rdi: v[14],
        orig_rax: v[15],
        rip: v[16],
        cs: v[17],
        eflags: v[18],
        rsp: v[19],
        ss: v[20],
        fs_base: v[21],
        gs_base: v[22],
        ds: v[23],
        es: v[24],
        fs: v[25],
        gs: v[26],
    })
}

fn regs_fields(r: &Regs) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Errno values the kernel uses internally for syscall restart.
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// Turn a thread interrupted inside a syscall into one that re-executes (or fails) it when it
/// resumes in a new process, where the kernel's own restart state is gone. CRIU does the same;
/// a `restart_block` (nanosleep's remaining time, poll's descriptors) cannot move, so that
/// case returns EINTR: true then, when the thread meets an EINTR it would not have met.
pub fn fixup_restart(r: &mut Regs) -> bool {
    let mut interrupted = false;
    if (r.orig_rax as i64) >= 0 {
        let ax = -(r.rax as i64);
        if ax == ERESTARTSYS || ax == ERESTARTNOINTR || ax == ERESTARTNOHAND {
            r.rax = r.orig_rax;
            r.rip -= 2;
        } else if ax == ERESTART_RESTARTBLOCK {
            r.rax = (-(libc::EINTR as i64)) as u64;
            interrupted = true;
        }
    }
    r.orig_rax = u64::MAX;
    interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn siginfo(sig: i32, code: i32) -> Vec<u8> {
        let mut si = tkill_siginfo(sig);
        si[8..12].copy_from_slice(&code.to_ne_bytes());
        si
    }

    #[test]
    fn only_faults_raised_by_an_instruction_come_again() {
        // SEGV_MAPERR, BUS_ADRERR, ILL_ILLOPC, FPE_INTDIV: the instruction faults again.
        assert!(comes_again(libc::SIGSEGV, &siginfo(libc::SIGSEGV, 1)));
        assert!(comes_again(libc::SIGBUS, &siginfo(libc::SIGBUS, 2)));
        assert!(comes_again(libc::SIGILL, &siginfo(libc::SIGILL, 1)));
        assert!(comes_again(libc::SIGFPE, &siginfo(libc::SIGFPE, 1)));
        // Sent, not raised: lost unless queued again.
        assert!(!comes_again(libc::SIGSEGV, &tkill_siginfo(libc::SIGSEGV)));
        assert!(!comes_again(
            libc::SIGSEGV,
            &siginfo(libc::SIGSEGV, libc::SI_KERNEL)
        ));
        assert!(!comes_again(libc::SIGSEGV, &siginfo(libc::SIGSEGV, 0)));
        // A timer's signal, and a breakpoint's (the thread is past the int3).
        assert!(!comes_again(
            libc::SIGALRM,
            &siginfo(libc::SIGALRM, libc::SI_TIMER)
        ));
        assert!(!comes_again(libc::SIGTRAP, &siginfo(libc::SIGTRAP, 1)));
    }

    #[test]
    fn regs_bytes_round_trip() {
        // SAFETY: plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rip = 0x1234;
        r.fs_base = 0x7fff_0000;
        r.gs = 9;
        let b = regs_to_bytes(&r);
        assert_eq!(b.len(), USER_REGS_SIZE);
        let back = regs_from_bytes(&b).expect("decodes");
        assert_eq!(back.rip, 0x1234);
        assert_eq!(back.fs_base, 0x7fff_0000);
        assert_eq!(back.gs, 9);
        assert!(regs_from_bytes(&b[1..]).is_none());
    }

    #[test]
    fn restart_fixup_reexecutes_or_fails() {
        // SAFETY: plain integers.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.orig_rax = 0;
        r.rax = (-ERESTARTSYS) as u64;
        r.rip = 100;
        assert!(!fixup_restart(&mut r));
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 98, u64::MAX));
        r.orig_rax = 35;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rip = 100;
        assert!(fixup_restart(&mut r));
        assert_eq!(r.rax as i64, -(libc::EINTR as i64));
        assert_eq!(r.rip, 100);
    }
}
