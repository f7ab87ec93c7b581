//! Direct system-call wrappers that libc or nix do not offer (or offer in a shape that loses
//! information we need).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{Result, SysError};

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2 = 88 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

impl CloneArgs {
    /// The struct as the kernel reads it, for writing into another process's memory.
    pub fn to_bytes(&self) -> [u8; 88] {
        let f = [
            self.flags,
            self.pidfd,
            self.child_tid,
            self.parent_tid,
            self.exit_signal,
            self.stack,
            self.stack_size,
            self.tls,
            self.set_tid,
            self.set_tid_size,
            self.cgroup,
        ];
        let mut out = [0u8; 88];
        for (i, v) in f.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// Fork-like `clone3` (no new stack: the child continues on a copy of ours) with an optional
/// chosen PID in the innermost PID namespace. Returns 0 in the child.
///
/// # Safety
/// The caller must be single-threaded, as for `fork()`: the child gets a copy of only this
/// thread, and locks held by other threads would stay locked forever in it.
pub unsafe fn clone3_fork(flags: u64, set_tid: Option<i32>) -> Result<i32> {
    let tid_arr: [libc::pid_t; 1] = [set_tid.unwrap_or(0)];
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if set_tid.is_some() {
            tid_arr.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(set_tid.is_some()),
        ..Default::default()
    };
    // SAFETY: `args` and `tid_arr` outlive the call; without CLONE_VM and with stack = 0 the
    // child runs on its own copy of our stack, like fork(); the caller guarantees there are no
    // other threads whose locks the child could inherit.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::addr_of!(args),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == -1 {
        return Err(SysError::last("clone3", set_tid.unwrap_or(0)));
    }
    Ok(i32::try_from(r).unwrap_or(-1))
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: plain integer arguments; on success the kernel returns a new fd that we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(SysError::last("pidfd_open", pid));
    }
    // SAFETY: `r` is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of another process's file descriptor.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32, pid: i32) -> Result<OwnedFd> {
    // SAFETY: plain integer arguments; on success the kernel returns a new fd that we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(SysError::last("pidfd_getfd", pid));
    }
    // SAFETY: `r` is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

pub const KCMP_FILE: i32 = 0;
pub const KCMP_VM: i32 = 1;
pub const KCMP_FILES: i32 = 2;
pub const KCMP_SIGHAND: i32 = 4;

/// `kcmp(pid1, pid2, kind, a, b) == 0`: do two tasks share the kernel object?
pub fn kcmp_same(pid1: i32, pid2: i32, kind: i32, a: u64, b: u64) -> Result<bool> {
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, a, b) };
    if r < 0 {
        return Err(SysError::last("kcmp", pid1));
    }
    Ok(r == 0)
}

/// `get_robust_list(tid)`: (head, len).
pub fn get_robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: both out pointers are valid for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            std::ptr::addr_of_mut!(head),
            std::ptr::addr_of_mut!(len),
        )
    };
    if r < 0 {
        return Err(SysError::last("get_robust_list", tid));
    }
    Ok((head, len as u64))
}

/// `tee(in, out, len, SPLICE_F_NONBLOCK)`: copy pipe contents without consuming them.
pub fn tee(fd_in: &impl AsRawFd, fd_out: &impl AsRawFd, len: usize) -> Result<usize> {
    // SAFETY: plain fd and integer arguments.
    let r = unsafe {
        libc::tee(
            fd_in.as_raw_fd(),
            fd_out.as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if r < 0 {
        return Err(SysError::last("tee", 0));
    }
    Ok(r as usize)
}

/// `unshare(flags)` for the calling thread.
pub fn unshare(flags: i32) -> Result<()> {
    // SAFETY: plain integer argument.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(SysError::last("unshare", 0));
    }
    Ok(())
}

/// `clock_gettime(clock)` in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; clock_gettime cannot fail for the clocks we pass
    // (MONOTONIC, BOOTTIME, REALTIME exist on every Linux).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `ioctl(fd, TCGETS)`: the kernel `struct termios` (60 bytes... glibc's is larger; we use
/// glibc's `termios` through nix elsewhere). Window size through `TIOCGWINSZ`.
pub fn get_winsize(fd: &impl AsRawFd) -> Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into `ws`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } != 0 {
        return Err(SysError::last("ioctl(TIOCGWINSZ)", 0));
    }
    Ok((ws.ws_row, ws.ws_col))
}

pub fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from `ws`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(SysError::last("ioctl(TIOCSWINSZ)", 0));
    }
    Ok(())
}

/// The kernel's `struct termios` as used by `TCGETS`/`TCSETS` (36 bytes on x86_64), so that a
/// console's settings travel independently of glibc's larger struct.
pub fn tcgets(fd: &impl AsRawFd) -> Result<Vec<u8>> {
    let mut buf = [0u8; 64];
    // SAFETY: TCGETS writes a kernel `struct termios` (36 bytes) into the 64-byte buffer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCGETS, buf.as_mut_ptr()) } != 0 {
        return Err(SysError::last("ioctl(TCGETS)", 0));
    }
    Ok(buf[..KERNEL_TERMIOS_SIZE].to_vec())
}

pub const KERNEL_TERMIOS_SIZE: usize = 36;

pub fn tcsets(fd: &impl AsRawFd, termios: &[u8]) -> Result<()> {
    if termios.len() != KERNEL_TERMIOS_SIZE {
        return Err(SysError::Unexpected {
            pid: 0,
            what: "termios blob has a wrong size".into(),
        });
    }
    let mut buf = [0u8; 64];
    buf[..KERNEL_TERMIOS_SIZE].copy_from_slice(termios);
    // SAFETY: TCSETS reads a kernel `struct termios` (36 bytes) from the buffer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TCSETS, buf.as_ptr()) } != 0 {
        return Err(SysError::last("ioctl(TCSETS)", 0));
    }
    Ok(())
}

/// Write `/proc/self/timens_offsets` for the time namespace our children will enter.
pub fn set_timens_offsets(monotonic_ns: i128, boottime_ns: i128) -> Result<()> {
    fn split(ns: i128) -> (i128, i128) {
        (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
    }
    let (ms, mn) = split(monotonic_ns);
    let (bs, bn) = split(boottime_ns);
    let text = format!("monotonic {ms} {mn}\nboottime {bs} {bn}\n");
    std::fs::write("/proc/self/timens_offsets", text)
        .map_err(|e| SysError::path("/proc/self/timens_offsets", e))
}

/// Errno of a failed call that returned -1, for callers outside this crate.
pub fn errno(op: &'static str, pid: i32, e: i32) -> SysError {
    SysError::errno(op, pid, e)
}

std::arch::global_asm!(
    ".pushsection .text.vkm_gadget,\"ax\",@progbits",
    ".globl vkm_syscall_gadget",
    "vkm_syscall_gadget:",
    "syscall",
    "int3",
    ".popsection"
);

extern "C" {
    fn vkm_syscall_gadget();
}

/// Address of a `syscall; int3` sequence in our own text. A process forked from us has it at the
/// same address, which gives the first injection into a fresh skeleton process a gadget before
/// anything else is mapped there.
pub fn own_syscall_gadget() -> u64 {
    vkm_syscall_gadget as *const () as usize as u64
}

/// `fcntl(F_GETOWN)`: the pid (negative: process group) that receives SIGIO for a description.
pub fn get_owner(fd: &impl AsRawFd) -> i32 {
    // SAFETY: F_GETOWN takes no argument and returns an int.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETOWN) }
}

/// `fcntl(F_GETSIG)`: the signal sent instead of SIGIO (0 = SIGIO).
pub fn get_sig(fd: &impl AsRawFd) -> i32 {
    // SAFETY: F_GETSIG takes no argument and returns an int.
    unsafe { libc::fcntl(fd.as_raw_fd(), F_GETSIG) }.max(0)
}

/// `fcntl(F_SETOWN)` and `fcntl(F_SETSIG)`.
pub fn set_owner_sig(fd: &impl AsRawFd, owner: i32, sig: i32) -> Result<()> {
    // SAFETY: F_SETOWN takes an int argument.
    if owner != 0 && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, owner) } != 0 {
        return Err(SysError::last("fcntl(F_SETOWN)", owner));
    }
    // SAFETY: F_SETSIG takes an int argument.
    if sig != 0 && unsafe { libc::fcntl(fd.as_raw_fd(), F_SETSIG, sig) } != 0 {
        return Err(SysError::last("fcntl(F_SETSIG)", 0));
    }
    Ok(())
}

/// Make the allocator keep freed memory for reuse instead of handing it back to the kernel:
/// buffers of up to 32 MiB (glibc's ceiling) come from the heap, and the heap is trimmed only
/// past 1 GiB free. A migration allocates and frees page buffers of a megabyte or so all the
/// time; returned to the kernel, each one is faulted in and zeroed again (18 % of the CPU in
/// a 4 GiB migration's profile here, where the hypervisor also takes freed memory back).
pub fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator tunables; both values are within glibc's limits.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// `tgkill(tgid, tid, sig)`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<()> {
    // SAFETY: plain integer arguments.
    if unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) } != 0 {
        return Err(SysError::last("tgkill", tid));
    }
    Ok(())
}

/// Make `sig` pending again for thread `tid` of `tgid` with the siginfo it came with (as read
/// by `PTRACE_GETSIGINFO`), so that its handler sees what it would have seen. The kernel lets
/// another process queue only siginfos that user space could have made (a negative `si_code`
/// such as a POSIX timer's `SI_TIMER`); any other (a kernel-made `SI_KERNEL`, `kill`'s
/// `SI_USER`) is sent with `tgkill` instead: the signal itself is never lost.
///
/// A fault that comes again by itself ([`crate::ptrace::comes_again`]) is not queued.
pub fn requeue_signal(tgid: i32, tid: i32, sig: i32, siginfo: &[u8]) -> Result<()> {
    if crate::ptrace::comes_again(sig, siginfo) {
        return Ok(());
    }
    if siginfo.len() == crate::ptrace::SIGINFO_SIZE {
        // SAFETY: `siginfo` is a readable buffer of the kernel's siginfo size, which is all
        // the kernel reads.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_tgsigqueueinfo,
                tgid,
                tid,
                sig,
                siginfo.as_ptr(),
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(SysError::Syscall {
                op: "rt_tgsigqueueinfo",
                pid: tid,
                source: e,
            });
        }
    }
    tgkill(tgid, tid, sig)
}

/// `getsockopt(fd, level, name)` for an `int` option.
pub fn getsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, op: &'static str) -> Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid out pointers; the kernel writes at most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(v)
}

/// `setsockopt(fd, level, name)` for an `int` option.
pub fn setsockopt_int(
    fd: &impl AsRawFd,
    level: i32,
    name: i32,
    value: i32,
    op: &'static str,
) -> Result<()> {
    // SAFETY: the kernel reads one `int` from `value`.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(())
}

pub const KCMP_EPOLL_TFD: i32 = 7;

/// `kcmp(pid1, pid2, KCMP_EPOLL_TFD, fd, {epfd, tfd, toff})`: is the file at `fd` of `pid1`
/// the target registered as (`tfd`, `toff`-th such item) in epoll `epfd` of `pid2`?
pub fn kcmp_epoll_tfd(
    pid1: i32,
    fd: i32,
    pid2: i32,
    epfd: i32,
    tfd: i32,
    toff: u32,
) -> Result<bool> {
    let slot: [u32; 3] = [epfd as u32, tfd as u32, toff];
    // SAFETY: `slot` is a `struct kcmp_epoll_slot` that outlives the call; the rest are integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1,
            pid2,
            KCMP_EPOLL_TFD,
            fd as libc::c_ulong,
            slot.as_ptr(),
        )
    };
    if r < 0 {
        return Err(SysError::last("kcmp(KCMP_EPOLL_TFD)", pid2));
    }
    Ok(r == 0)
}

/// `epoll_ctl(epfd, EPOLL_CTL_ADD, fd, {events, data})` with `fd` a plain number, because an
/// epoll item is keyed by its fd number, which restore must reproduce.
pub fn epoll_add_raw(epfd: &impl AsRawFd, fd: RawFd, events: u32, data: u64) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    // SAFETY: `ev` is a valid `struct epoll_event` for the duration of the call; a bad `fd`
    // only makes the call fail.
    let r = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    if r != 0 {
        return Err(SysError::last("epoll_ctl(ADD)", 0));
    }
    Ok(())
}

/// `signalfd4(-1, mask, flags)` with the kernel's 64-bit signal set (bit `n-1` = signal `n`),
/// which covers the real-time signals too.
pub fn signalfd(mask: u64, flags: i32) -> Result<OwnedFd> {
    // SAFETY: the kernel reads an 8-byte sigset from `mask`; the result is a new fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_signalfd4,
            -1,
            std::ptr::addr_of!(mask),
            std::mem::size_of::<u64>(),
            flags,
        )
    };
    if r < 0 {
        return Err(SysError::last("signalfd4", 0));
    }
    // SAFETY: `r` is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `timerfd_create(clockid, flags)`.
pub fn timerfd_create(clockid: i32, flags: i32) -> Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is a new fd.
    let r = unsafe { libc::timerfd_create(clockid, flags) };
    if r < 0 {
        return Err(SysError::last("timerfd_create", 0));
    }
    // SAFETY: `r` is a freshly created fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn timespec_ns(ns: i128) -> libc::timespec {
    libc::timespec {
        tv_sec: i64::try_from(ns.div_euclid(1_000_000_000)).unwrap_or(i64::MAX),
        tv_nsec: ns.rem_euclid(1_000_000_000) as i64,
    }
}

/// `timerfd_settime(fd, flags, {interval, value})`, times in nanoseconds.
pub fn timerfd_settime(
    fd: &impl AsRawFd,
    flags: i32,
    value_ns: i128,
    interval_ns: i128,
) -> Result<()> {
    let its = libc::itimerspec {
        it_interval: timespec_ns(interval_ns),
        it_value: timespec_ns(value_ns),
    };
    // SAFETY: `its` is a valid itimerspec; no old value is asked for.
    let r = unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &its, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SysError::last("timerfd_settime", 0));
    }
    Ok(())
}

/// `timerfd_gettime(fd)`: (time to the next expiry, interval) in nanoseconds. For a periodic
/// timer that has expired this also moves the timer to its next period and adds the missed
/// periods to the unread expiration count, as a read would, without consuming anything.
pub fn timerfd_gettime(fd: &impl AsRawFd) -> Result<(u64, u64)> {
    // SAFETY: `struct itimerspec` is plain data; all-zero is valid.
    let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one itimerspec into `its`.
    if unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut its) } != 0 {
        return Err(SysError::last("timerfd_gettime", 0));
    }
    let ns = |t: libc::timespec| {
        u64::try_from(t.tv_sec)
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
    };
    Ok((ns(its.it_value), ns(its.it_interval)))
}

/// `ioctl(TFD_IOC_SET_TICKS)`: expirations that a timerfd reports as not yet read.
pub fn timerfd_set_ticks(fd: &impl AsRawFd, ticks: u64) -> Result<()> {
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400; // _IOW('T', 0, __u64)
                                                          // SAFETY: the ioctl reads one u64 from the pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, std::ptr::addr_of!(ticks)) };
    if r != 0 {
        return Err(SysError::last("ioctl(TFD_IOC_SET_TICKS)", 0));
    }
    Ok(())
}

/// `flock(fd, op)` (`LOCK_SH`/`LOCK_EX`, with `LOCK_NB`).
pub fn flock(fd: &impl AsRawFd, op: i32) -> Result<()> {
    // SAFETY: plain integer arguments.
    if unsafe { libc::flock(fd.as_raw_fd(), op) } != 0 {
        return Err(SysError::last("flock", 0));
    }
    Ok(())
}

/// `fcntl(fd, F_OFD_SETLK, {type, SEEK_SET, start, len})`: an open-file-description lock.
pub fn ofd_setlk(fd: &impl AsRawFd, write: bool, start: i64, len: i64) -> Result<()> {
    // SAFETY: `struct flock` is plain data; all-zero is valid before the fields are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: F_OFD_SETLK reads one `struct flock`.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(SysError::last("fcntl(F_OFD_SETLK)", 0));
    }
    Ok(())
}

// ---- System V shared memory ------------------------------------------------------------------
//
// SysV IPC objects live in an IPC namespace, and every call below acts in the namespace of the
// *calling thread*. Callers that work on a vkernel's segments run them through
// [`in_ipc_namespace`], on a short-lived thread that has joined the vkernel's namespace.

/// `shmctl` commands and mode bits the libc crate does not export.
pub const SHM_STAT_ANY: i32 = 15;
const SHM_INFO: i32 = 14;
/// `shm_perm.mode`: marked with IPC_RMID while still attached.
pub const SHM_DEST: u32 = 0o1000;
/// `shm_perm.mode`: `SHM_LOCK`ed.
pub const SHM_LOCKED: u32 = 0o2000;
/// `shmat` flag: map the segment executable.
pub const SHM_EXEC: i32 = 0o100000;
const SEM_INFO: i32 = 19;
const MSG_INFO: i32 = 12;

/// What `shmctl(IPC_STAT)` / `SHM_STAT_ANY` reports about a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShmStat {
    pub shmid: i32,
    /// `IPC_PRIVATE` (0) for a private segment and for one marked with IPC_RMID.
    pub key: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits plus [`SHM_DEST`] and [`SHM_LOCKED`].
    pub mode: u32,
    pub size: u64,
    pub nattch: u64,
}

fn shmctl_raw(shmid: i32, cmd: i32, buf: Option<&mut libc::shmid_ds>) -> i64 {
    let buf = buf.map_or(std::ptr::null_mut(), std::ptr::from_mut);
    // SAFETY: `buf` is null (for commands that take no buffer) or an exclusive borrow of a
    // `struct shmid_ds` (the kernel's `shmid64_ds` on x86_64), which the kernel writes for
    // IPC_STAT/SHM_STAT_ANY, reads for IPC_SET, and partly writes for SHM_INFO (`struct
    // shm_info` is smaller).
    unsafe { libc::syscall(libc::SYS_shmctl, shmid, cmd, buf) }
}

fn shm_stat_cmd(id: i32, cmd: i32, op: &'static str) -> Result<ShmStat> {
    // SAFETY: `struct shmid_ds` is plain data; all-zero is valid.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    let r = shmctl_raw(id, cmd, Some(&mut ds));
    if r < 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(ShmStat {
        shmid: if cmd == SHM_STAT_ANY {
            i32::try_from(r).unwrap_or(-1)
        } else {
            id
        },
        key: ds.shm_perm.__key,
        uid: ds.shm_perm.uid,
        gid: ds.shm_perm.gid,
        cuid: ds.shm_perm.cuid,
        cgid: ds.shm_perm.cgid,
        mode: u32::from(ds.shm_perm.mode),
        size: ds.shm_segsz as u64,
        nattch: ds.shm_nattch,
    })
}

/// `shmctl(shmid, IPC_STAT)`.
pub fn shm_stat(shmid: i32) -> Result<ShmStat> {
    shm_stat_cmd(shmid, libc::IPC_STAT, "shmctl(IPC_STAT)")
}

/// Every segment of the calling thread's IPC namespace (`SHM_INFO` for the highest index in
/// use, then `SHM_STAT_ANY` on each index, which needs no permission on the segment).
pub fn shm_list() -> Result<Vec<ShmStat>> {
    // SAFETY: `struct shmid_ds` is plain data; all-zero is valid.
    let mut info: libc::shmid_ds = unsafe { std::mem::zeroed() };
    let max = shmctl_raw(0, SHM_INFO, Some(&mut info));
    if max < 0 {
        return Err(SysError::last("shmctl(SHM_INFO)", 0));
    }
    let mut out = Vec::new();
    for idx in 0..=max {
        match shm_stat_cmd(
            i32::try_from(idx).unwrap_or(i32::MAX),
            SHM_STAT_ANY,
            "shmctl(SHM_STAT_ANY)",
        ) {
            Ok(s) => out.push(s),
            // A free slot below the highest one in use.
            Err(SysError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Number of SysV semaphore sets and message queues in the calling thread's IPC namespace
/// (`SEM_INFO`'s `semusz`, `MSG_INFO`'s `msgpool`).
pub fn sem_msg_counts() -> Result<(u32, u32)> {
    let mut seminfo = [0i32; 10];
    // SAFETY: SEM_INFO writes one `struct seminfo` (ten ints) through the fourth argument.
    let r = unsafe { libc::syscall(libc::SYS_semctl, 0, 0, SEM_INFO, seminfo.as_mut_ptr()) };
    if r < 0 {
        return Err(SysError::last("semctl(SEM_INFO)", 0));
    }
    let mut msginfo = [0i32; 8];
    // SAFETY: MSG_INFO writes one `struct msginfo` (seven ints and a short) into the buffer.
    let r = unsafe { libc::syscall(libc::SYS_msgctl, 0, MSG_INFO, msginfo.as_mut_ptr()) };
    if r < 0 {
        return Err(SysError::last("msgctl(MSG_INFO)", 0));
    }
    Ok((
        u32::try_from(seminfo[7]).unwrap_or(0),
        u32::try_from(msginfo[0]).unwrap_or(0),
    ))
}

/// `shmget(key, size, flags)`: the segment's id.
pub fn shmget(key: i32, size: u64, flags: i32) -> Result<i32> {
    let size = usize::try_from(size).map_err(|_| SysError::errno("shmget", 0, libc::EINVAL))?;
    // SAFETY: plain integer arguments.
    let r = unsafe { libc::shmget(key, size, flags) };
    if r < 0 {
        return Err(SysError::last("shmget", 0));
    }
    Ok(r)
}

/// `shmctl(shmid, IPC_SET)`: owner, group and permission bits.
pub fn shm_set(shmid: i32, uid: u32, gid: u32, mode: u32) -> Result<()> {
    // SAFETY: `struct shmid_ds` is plain data; all-zero is valid.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = u16::try_from(mode & 0o777).unwrap_or(0);
    if shmctl_raw(shmid, libc::IPC_SET, Some(&mut ds)) < 0 {
        return Err(SysError::last("shmctl(IPC_SET)", 0));
    }
    Ok(())
}

/// `shmctl(shmid, IPC_RMID)`: destroyed once the last attachment goes.
pub fn shm_rmid(shmid: i32) -> Result<()> {
    if shmctl_raw(shmid, libc::IPC_RMID, None) < 0 {
        return Err(SysError::last("shmctl(IPC_RMID)", 0));
    }
    Ok(())
}

/// `shmctl(shmid, SHM_LOCK)`.
pub fn shm_lock(shmid: i32) -> Result<()> {
    if shmctl_raw(shmid, libc::SHM_LOCK, None) < 0 {
        return Err(SysError::last("shmctl(SHM_LOCK)", 0));
    }
    Ok(())
}

/// A segment attached to our own address space at an address the kernel chose. Rust code
/// never gets a reference into it: it is only seen as an address range (for
/// `/proc/self/map_files/...`), and it is detached on drop.
#[derive(Debug)]
pub struct ShmAttachment {
    addr: u64,
    len: u64,
}

impl ShmAttachment {
    /// `shmat(shmid, NULL, SHM_RDONLY or 0)` of a segment of `size` bytes.
    pub fn new(shmid: i32, size: u64, rdonly: bool) -> Result<ShmAttachment> {
        let flags = if rdonly { libc::SHM_RDONLY } else { 0 };
        // SAFETY: with a null address the kernel picks an unused range, so no existing
        // mapping (and no Rust object) is replaced.
        let p = unsafe { libc::shmat(shmid, std::ptr::null(), flags) };
        if p as isize == -1 {
            return Err(SysError::last("shmat", 0));
        }
        Ok(ShmAttachment {
            addr: p as u64,
            len: size.div_ceil(4096) * 4096,
        })
    }

    /// `/proc/self/map_files/` name of the attachment: opening it gives the segment's
    /// shmem file, which can be read (with SEEK_DATA/SEEK_HOLE) and written like a memfd.
    pub fn map_files_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!(
            "/proc/self/map_files/{:x}-{:x}",
            self.addr,
            self.addr + self.len
        ))
    }
}

impl Drop for ShmAttachment {
    fn drop(&mut self) {
        // SAFETY: `addr` is an attachment made by `new` that nothing references (the struct
        // hands out only its address as a number), so detaching it invalidates no Rust value.
        unsafe { libc::shmdt(self.addr as *const libc::c_void) };
    }
}

/// Run `f` on a short-lived thread that has joined the IPC namespace of `pid` (`setns`): SysV
/// IPC calls and `/proc/sys/kernel/shm_next_id` then act in that namespace, while every other
/// thread of this process stays where it was. Joining an IPC namespace is allowed for one
/// thread of a multi-threaded process (unlike a mount or user namespace).
pub fn in_ipc_namespace<T, E>(
    pid: i32,
    f: impl FnOnce() -> std::result::Result<T, E> + Send,
) -> std::result::Result<T, E>
where
    T: Send,
    E: From<SysError> + Send,
{
    let path = format!("/proc/{pid}/ns/ipc");
    let ns = std::fs::File::open(&path).map_err(|e| SysError::path(&path, e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWIPC)
                .map_err(|e| SysError::errno("setns(CLONE_NEWIPC)", pid, e as i32))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(SysError::Unexpected {
                pid,
                what: "its IPC namespace helper thread panicked".into(),
            }
            .into())
        })
    })
}

/// Write `/proc/sys/kernel/shm_next_id`: the id the next `shmget` that creates a segment gets,
/// in the calling thread's IPC namespace (needs CAP_CHECKPOINT_RESTORE over it).
pub fn set_shm_next_id(id: i32) -> Result<()> {
    let path = "/proc/sys/kernel/shm_next_id";
    std::fs::write(path, id.to_string()).map_err(|e| SysError::path(path, e))
}

/// Effective uid and gid of the calling *thread* only (raw `setresuid`/`setresgid`, not glibc's,
/// which changes every thread of the process); real and saved ids stay, so that a thread that
/// was root can become root again. Order: the gid is set first when leaving root and last when
/// returning to it, because changing it needs CAP_SETGID, which a non-zero euid has not.
pub fn set_thread_effective_ids(uid: u32, gid: u32) -> Result<()> {
    let keep = u64::from(u32::MAX); // -1: unchanged
    let set = |nr: libc::c_long, id: u32, op: &'static str| -> Result<()> {
        // SAFETY: plain integer arguments; the call changes only this thread's credentials.
        if unsafe { libc::syscall(nr, keep, u64::from(id), keep) } != 0 {
            return Err(SysError::last(op, 0));
        }
        Ok(())
    };
    // SAFETY: geteuid takes no arguments and cannot fail; it reports this thread's euid.
    let leaving_root = unsafe { libc::geteuid() } == 0 && uid != 0;
    if leaving_root {
        set(libc::SYS_setresgid, gid, "setresgid")?;
        set(libc::SYS_setresuid, uid, "setresuid")
    } else {
        set(libc::SYS_setresuid, uid, "setresuid")?;
        set(libc::SYS_setresgid, gid, "setresgid")
    }
}

/// Linux's `F_SETSIG`/`F_GETSIG` (not exported by the libc crate).
const F_SETSIG: i32 = 10;
const F_GETSIG: i32 = 11;

/// Thin raw wrappers for the sandbox's init and for skeleton processes: code that runs in a
/// fork of the shim, where only plain system calls are wanted. Errors end in `-errno` returns
/// or are ignored where nothing sensible could be done about them in init.
pub mod raw {
    use std::ffi::CString;

    /// `fcntl(fd, F_DUPFD, min)`.
    pub fn dup_above(fd: i32, min: i32) -> i32 {
        // SAFETY: plain integer arguments.
        unsafe { libc::fcntl(fd, libc::F_DUPFD, min) }
    }

    pub fn dup2(from: i32, to: i32) {
        // SAFETY: plain integer arguments; replacing `to` is the intent.
        unsafe { libc::dup2(from, to) };
    }

    pub fn close(fd: i32) {
        // SAFETY: plain integer argument; the caller no longer uses `fd`.
        unsafe { libc::close(fd) };
    }

    /// Close every fd from `first` up.
    pub fn close_from(first: u32) {
        // SAFETY: plain integer arguments; the caller keeps nothing above `first`.
        unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
    }

    /// Close every fd not in `keep`.
    pub fn close_range_except(keep: &[i32]) {
        let mut keep: Vec<u32> = keep.iter().filter_map(|&k| u32::try_from(k).ok()).collect();
        keep.sort_unstable();
        let mut next = 0u32;
        for k in keep {
            if k > next {
                // SAFETY: plain integer arguments; only fds outside `keep` are closed.
                unsafe { libc::syscall(libc::SYS_close_range, next, k - 1, 0) };
            }
            next = k + 1;
        }
        close_from(next);
    }

    pub fn set_cloexec(fd: i32, on: bool) {
        // SAFETY: plain integer arguments.
        unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    }

    /// Plain `fork()`: returns 0 in the child, the child's pid (or -errno) in the parent.
    pub fn fork() -> i32 {
        // SAFETY: callers are single-threaded (init), so the child inherits no held locks.
        let r = unsafe { libc::fork() };
        if r < 0 {
            -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            r
        }
    }

    /// Fork a child with the given pid in our (innermost) namespace; 0 in the child, the pid or
    /// -errno in the parent.
    pub fn fork_with_pid(pid: i32) -> i32 {
        // SAFETY: callers are single-threaded (init), like `fork`.
        match unsafe { super::clone3_fork(0, Some(pid)) } {
            Ok(p) => p,
            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    pub fn setsid() {
        // SAFETY: no arguments.
        unsafe { libc::setsid() };
    }

    /// Make `fd` (a terminal) the controlling terminal of our new session.
    pub fn make_ctty(fd: i32) {
        // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
        unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) };
    }

    /// `execvp`; returns only on failure, with the error.
    pub fn execvp(argv: &[String]) -> std::io::Error {
        let Ok(args) = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
        else {
            return std::io::Error::from_raw_os_error(libc::EINVAL);
        };
        let Some(file) = args.first() else {
            return std::io::Error::from_raw_os_error(libc::EINVAL);
        };
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        // SAFETY: `ptrs` is a NULL-terminated array of pointers to NUL-terminated strings that
        // outlive the call.
        unsafe { libc::execvp(file.as_ptr(), ptrs.as_ptr()) };
        std::io::Error::last_os_error()
    }

    pub fn write_all(fd: i32, mut buf: &[u8]) {
        while !buf.is_empty() {
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            if n <= 0 {
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
            buf = &buf[usize::try_from(n).unwrap_or(buf.len())..];
        }
    }

    /// Read exactly `buf.len()` bytes; false on EOF or error.
    pub fn read_exact(fd: i32, buf: &mut [u8]) -> bool {
        let mut off = 0;
        while off < buf.len() {
            // SAFETY: the destination range lies inside `buf`.
            let n = unsafe { libc::read(fd, buf[off..].as_mut_ptr().cast(), buf.len() - off) };
            if n <= 0 {
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return false;
            }
            off += usize::try_from(n).unwrap_or(0);
        }
        true
    }

    pub fn pause() {
        // SAFETY: raw pause(2) has no arguments; the skeleton parks in it (syscall 34), which the
        // restorer watches for.
        unsafe { libc::syscall(libc::SYS_pause) };
    }

    /// `waitpid(-1, __WALL)`: Some((pid, exit code or 128+signal)), None when no child is left.
    /// Reap every child that has already exited, without blocking; returns how many.
    pub fn reap_exited() -> usize {
        let mut n = 0;
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::WNOHANG) };
            if r > 0 {
                n += 1;
                continue;
            }
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return n;
        }
    }

    pub fn wait_any() -> Option<(i32, i32)> {
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
            if r > 0 {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    continue;
                };
                return Some((r, code));
            }
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
    }

    /// Every signal back to its default action, none blocked.
    pub fn reset_signals() {
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: SIG_DFL installs no handler; the caller (init) is single-threaded.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        // SAFETY: sigset_t is a plain bit array; all-zero is the empty set.
        let set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid set and no old-set pointer is asked for.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    }

    /// `prctl(PR_SET_PDEATHSIG, sig)`: `sig` when the thread that created us ends (0: none).
    pub fn set_pdeathsig(sig: i32) {
        // SAFETY: plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) };
    }

    /// Whether the process behind `pidfd` is still alive: a pidfd polls readable once its
    /// process has ended (unlike `pidfd_send_signal`, this works from a child PID namespace).
    pub fn pidfd_alive(pidfd: i32) -> bool {
        let mut p = libc::pollfd {
            fd: pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd, and the count says one.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r == 0
    }

    pub fn exit(code: i32) -> ! {
        // SAFETY: ends the process without running the parent's atexit handlers or destructors,
        // which belong to the shim, not to init.
        unsafe { libc::_exit(code) }
    }
}
