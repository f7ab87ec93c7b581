//! Small wrappers around the system calls vkload needs. Every `unsafe` of the crate is here,
//! one wrapper per call, so that the rest of vkload is safe Rust.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::AtomicU64;

use libc::c_int;

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of a descriptor the kernel has just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass a descriptor freshly returned by a successful system call, which
    // nothing else in the process owns yet.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn map(len: usize, flags: c_int, fd: RawFd) -> io::Result<&'static [AtomicU64]> {
    // SAFETY: with a null hint and no MAP_FIXED the kernel picks a fresh range, so no existing
    // Rust object is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping is page-aligned (hence aligned for AtomicU64, which has the layout of
    // u64), `len` bytes long, readable, writable and initialised (zeroes or file content). It
    // is never unmapped and its file never shrinks, so it lives for 'static. All access goes
    // through atomics, which allow shared mutation, also across the aliasing views of a
    // MAP_SHARED object.
    Ok(unsafe { std::slice::from_raw_parts(p as *const AtomicU64, len / 8) })
}

pub fn map_private(len: usize) -> io::Result<&'static [AtomicU64]> {
    map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
}

pub fn map_shared_anon(len: usize) -> io::Result<&'static [AtomicU64]> {
    map(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1)
}

pub fn map_shared_file(file: &File, len: usize) -> io::Result<&'static [AtomicU64]> {
    use std::os::fd::AsRawFd;
    map(len, libc::MAP_SHARED, file.as_raw_fd())
}

/// One page of address space that shows one page of a file at a time, mapped anew (MAP_FIXED,
/// MAP_SHARED) over itself for each: as User-Mode Linux maps parts of its RAM file in and out
/// of its address spaces.
pub struct Window {
    addr: usize,
}

/// One page (the window shows one page of the file at a time).
const WINDOW_LEN: usize = crate::pattern::PAGE_SIZE;

impl Window {
    pub fn new() -> io::Result<Window> {
        // SAFETY: with a null hint and no MAP_FIXED the kernel picks a fresh range, so no
        // existing Rust object is affected; nothing is accessible there yet (PROT_NONE).
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                WINDOW_LEN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window { addr: p as usize })
    }

    /// Page `page` of `file` in the window, for `f`.
    pub fn with_page<R>(
        &mut self,
        file: &File,
        page: u64,
        f: impl FnOnce(&[AtomicU64]) -> R,
    ) -> io::Result<R> {
        use std::os::fd::AsRawFd;
        let offset = libc::off_t::try_from(page * WINDOW_LEN as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: MAP_FIXED replaces only the window's own page, which this Window owns and
        // to which no reference lives (`with_page` takes `&mut self`, and the slice given to
        // the last `f` did not outlive it).
        let p = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                WINDOW_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: one page, page-aligned (aligned for AtomicU64), readable and writable, of a
        // file that never shrinks; the slice lives only for the call of `f`, during which the
        // mapping stays (it is replaced only by a later call, which needs `&mut self`). Access
        // goes through atomics, which allow the aliasing with the file's other mappings.
        let page = unsafe { std::slice::from_raw_parts(p as *const AtomicU64, WINDOW_LEN / 8) };
        Ok(f(page))
    }
}

pub fn memfd_create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the call only creates a descriptor.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), 0) })?;
    Ok(File::from(owned(fd)))
}

/// Returns (read end, write end).
pub fn pipe(nonblock: bool) -> io::Result<(File, File)> {
    let mut fds = [-1 as c_int; 2];
    let flags = if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) })?;
    Ok((File::from(owned(fds[0])), File::from(owned(fds[1]))))
}

pub fn eventfd(nonblock: bool) -> io::Result<File> {
    let flags = if nonblock { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: plain system call without pointer arguments.
    let fd = cvt(unsafe { libc::eventfd(0, flags) })?;
    Ok(File::from(owned(fd)))
}

/// write(2) all of `buf` to a raw descriptor (stdout/stderr), retrying on EINTR. One call
/// per line keeps lines whole when several threads print.
pub fn write_all_fd(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable slice of the given length.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until CLOCK_MONOTONIC reaches `deadline_ns`. Returns false if a signal handler
/// interrupted the sleep (the caller re-checks its flags and sleeps again).
pub fn sleep_until(deadline_ns: u64) -> bool {
    let ts = libc::timespec {
        tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec; no remaining-time buffer is needed with TIMER_ABSTIME.
    let r = unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            ptr::null_mut(),
        )
    };
    r == 0
}

/// The calling thread's fs_base, i.e. its TLS base.
pub fn fs_base() -> u64 {
    const ARCH_GET_FS: libc::c_long = 0x1003;
    let mut base: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to the pointer, which points to `base`.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut base as *mut u64) };
    base
}

/// Sleeps `ns` (< 1 s) with `pattern` held in vector register 8 across the nanosleep system
/// call and returns what the register holds afterwards. A thread frozen by a checkpoint sits
/// in exactly such a call, so a restore that loses the xsave state shows up as a difference.
/// With `avx` the whole ymm8 is used, otherwise only xmm8 (pattern[0..2]).
pub fn nanosleep_holding_vector(ns: u64, pattern: [u64; 4], avx: bool) -> [u64; 4] {
    use std::arch::asm;
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: ns as libc::c_long,
    };
    let mut out = [0u64; 4];
    if avx {
        // SAFETY: loads 32 bytes from `pattern`, calls nanosleep (reads `ts`, no remainder
        // pointer), stores 32 bytes into `out`. The syscall clobbers rax/rcx/r11, declared as
        // outputs; xmm8 is declared clobbered (its upper ymm half is not used by non-AVX
        // code, and vzeroupper leaves the lower halves intact). The caller checked for AVX.
        unsafe {
            asm!(
                "vmovdqu ymm8, [{pat}]",
                "syscall",
                "vmovdqu [{out}], ymm8",
                "vzeroupper",
                pat = in(reg) pattern.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                inlateout("rax") libc::SYS_nanosleep => _,
                in("rdi") &ts,
                in("rsi") 0usize,
                out("rcx") _,
                out("r11") _,
                out("xmm8") _,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above with 16 bytes and xmm8 only (SSE2 is baseline on x86_64).
        unsafe {
            asm!(
                "movdqu xmm8, [{pat}]",
                "syscall",
                "movdqu [{out}], xmm8",
                pat = in(reg) pattern.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                inlateout("rax") libc::SYS_nanosleep => _,
                in("rdi") &ts,
                in("rsi") 0usize,
                out("rcx") _,
                out("r11") _,
                out("xmm8") _,
                options(nostack),
            );
        }
        out[2] = pattern[2];
        out[3] = pattern[3];
    }
    out
}

pub type Handler = extern "C" fn(c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` with SA_SIGINFO plus `flags`. Handlers must be async-signal-safe
/// (vkload's only touch atomics).
pub fn sigaction(sig: c_int, handler: Handler, flags: c_int) -> io::Result<()> {
    // SAFETY: `struct sigaction` is plain data for which all-zero is a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = flags | libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialised and its handler has the SA_SIGINFO signature.
    cvt(unsafe { libc::sigaction(sig, &sa, ptr::null_mut()) })?;
    Ok(())
}

/// Makes `stack` the calling thread's alternate signal stack.
pub fn sigaltstack(stack: &'static [AtomicU64]) -> io::Result<()> {
    let ss = libc::stack_t {
        ss_sp: stack.as_ptr() as *mut libc::c_void,
        ss_flags: 0,
        ss_size: std::mem::size_of_val(stack),
    };
    // SAFETY: the stack is a 'static mapping that is never used for anything else, so the
    // kernel may build signal frames on it at any time.
    cvt(unsafe { libc::sigaltstack(&ss, ptr::null_mut()) })?;
    Ok(())
}

/// (si_code, si_value as usize) of a signal delivered with SA_SIGINFO.
pub fn siginfo_code_value(info: *const libc::siginfo_t) -> (c_int, usize) {
    // SAFETY: the kernel passes SA_SIGINFO handlers a valid siginfo_t; si_value is meaningful
    // for the timer and queued signals we check, and merely garbage (still initialised
    // memory) for others, which we then reject by si_code.
    unsafe { ((*info).si_code, (*info).si_value().sival_ptr as usize) }
}

fn sigset(sigs: &[c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset then initialises it properly.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; invalid signal numbers are rejected by the call, not UB.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Changes the calling thread's signal mask (SIG_BLOCK / SIG_UNBLOCK).
pub fn sigmask(how: c_int, sigs: &[c_int]) {
    let set = sigset(sigs);
    // SAFETY: `set` is an initialised sigset_t; the old mask is not requested.
    unsafe { libc::pthread_sigmask(how, &set, ptr::null_mut()) };
}

pub fn setitimer_real(interval_ms: u64) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: (interval_ms / 1000) as libc::time_t,
        tv_usec: ((interval_ms % 1000) * 1000) as libc::suseconds_t,
    };
    let it = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: `it` is a valid itimerval; the old value is not requested.
    cvt(unsafe { libc::setitimer(libc::ITIMER_REAL, &it, ptr::null_mut()) })?;
    Ok(())
}

/// A periodic POSIX timer on CLOCK_MONOTONIC that sends `signo` with `cookie` as si_value.
pub fn posix_timer(signo: c_int, cookie: usize, interval_ms: u64) -> io::Result<()> {
    // SAFETY: sigevent is plain data for which all-zero is a valid value.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_SIGNAL;
    sev.sigev_signo = signo;
    sev.sigev_value = libc::sigval {
        sival_ptr: cookie as *mut libc::c_void,
    };
    let mut id: libc::timer_t = ptr::null_mut();
    // SAFETY: `sev` is initialised and `id` is a valid place for the new timer id.
    cvt(unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) })?;
    let ts = libc::timespec {
        tv_sec: (interval_ms / 1000) as libc::time_t,
        tv_nsec: ((interval_ms % 1000) * 1_000_000) as libc::c_long,
    };
    let its = libc::itimerspec {
        it_interval: ts,
        it_value: ts,
    };
    // SAFETY: `id` is the timer just created (never deleted); `its` is a valid itimerspec.
    cvt(unsafe { libc::timer_settime(id, 0, &its, ptr::null_mut()) })?;
    Ok(())
}

pub fn kill(pid: libc::pid_t, sig: c_int) -> io::Result<()> {
    // SAFETY: plain system call without pointer arguments.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

pub fn getppid() -> libc::pid_t {
    // SAFETY: plain system call that cannot fail.
    unsafe { libc::getppid() }
}

pub fn set_pdeathsig(sig: c_int) -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) })?;
    Ok(())
}

pub fn setpgid(pid: libc::pid_t, pgid: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain system call without pointer arguments.
    cvt(unsafe { libc::setpgid(pid, pgid) })?;
    Ok(())
}

pub enum Forked {
    Child,
    Parent(libc::pid_t),
}

/// fork(2), refused unless the process is single-threaded: then the child cannot inherit a
/// lock held by a thread that does not exist in it, so it may keep using std (allocator,
/// stdio) freely.
pub fn fork() -> io::Result<Forked> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    if !status
        .lines()
        .any(|l| l.split_whitespace().eq(["Threads:", "1"]))
    {
        return Err(io::Error::other("fork refused: process is multi-threaded"));
    }
    // SAFETY: the process has a single thread (checked above, and only this thread could
    // create another), so fork's restrictions on multi-threaded programs do not apply.
    let pid = cvt(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Forked::Child
    } else {
        Forked::Parent(pid)
    })
}

/// waitpid(pid, WNOHANG): Some(wait status) if the child has terminated.
pub fn try_wait(pid: libc::pid_t) -> io::Result<Option<c_int>> {
    let mut status: c_int = 0;
    // SAFETY: `status` is a valid place for the wait status.
    let r = cvt(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok(if r == 0 { None } else { Some(status) })
}

/// Blocking waitpid, for reaping killed children on the way out.
pub fn wait(pid: libc::pid_t) {
    let mut status: c_int = 0;
    // SAFETY: `status` is a valid place for the wait status.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Exits the process at once, without running atexit handlers or destructors while other
/// threads may still be using what they would tear down.
pub fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit has no preconditions; nothing after it runs.
    unsafe { libc::_exit(code) }
}

/// Whether a network interface `name` exists in the calling thread's network namespace.
pub fn interface_exists(name: &str) -> io::Result<bool> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index != 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENODEV) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Attaches a new tun descriptor to the tap `name` as a tap without packet information,
/// non-blocking and close-on-exec, the way UML opens its tap. TUNSETIFF would create a
/// missing device, so callers check that it exists first.
pub fn open_tap(name: &str) -> io::Result<File> {
    // SAFETY: the path is a valid NUL-terminated string; the call only creates a descriptor.
    let fd = cvt(unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    })?;
    let file = File::from(owned(fd));
    // SAFETY: ifreq is plain data for which all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() || name.as_bytes().contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // The array is zeroed, so the name stays NUL-terminated.
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes back one struct ifreq, which `ifr` is; `fd` is the
    // tun descriptor just opened and still owned by `file`.
    cvt(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr) })?;
    Ok(file)
}

/// poll(2) one descriptor for input; returns its revents, 0 on timeout.
pub fn poll_in(fd: RawFd, timeout_ms: c_int) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd, matching the count passed.
    cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })?;
    Ok(pfd.revents)
}

/// The calling thread's errno.
pub fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Set the calling thread's errno.
pub fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

/// Sleep `us` microseconds with select(2) (see `helper`).
pub fn select_sleep_us(us: i64) {
    let mut tv = libc::timeval {
        tv_sec: us / 1_000_000,
        tv_usec: us % 1_000_000,
    };
    // SAFETY: no descriptor sets, and `tv` is a valid timeval select may update.
    unsafe {
        libc::select(
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut tv,
        )
    };
}

/// Start `f(fd)` in a new process that shares our memory and descriptors and, having no TLS
/// of its own, the calling thread's TLS (as UML's helpers do): `clone(CLONE_VM | CLONE_FILES)`
/// on `stack`, with no exit signal.
pub fn clone_helper(
    f: extern "C" fn(*mut libc::c_void) -> c_int,
    stack: &'static mut [u8],
    fd: RawFd,
) -> io::Result<libc::pid_t> {
    // The stack grows down from its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: `stack` is leaked memory no one else uses, large enough for `f`, which only
    // makes raw system calls (it must not allocate: it shares our thread's malloc cache);
    // `fd` is passed by value.
    cvt(unsafe {
        libc::clone(
            f,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_FILES,
            fd as usize as *mut libc::c_void,
        )
    })
}
