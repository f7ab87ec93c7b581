//! `--helper`: a helper process made the way User-Mode Linux makes its own: `clone` with
//! `CLONE_VM | CLONE_FILES` and no TLS of its own, so that it shares the errno of the thread
//! that made it. It blocks in `poll` on a pipe that no one writes, for good. A `poll` that
//! fails with EINTR (which a restore hands a thread blocked in `poll`: the syscall's restart
//! state stays with the old process) is retried; any other failure is a FAIL. The thread that
//! made it keeps setting errno to EAGAIN meanwhile, and the helper takes a millisecond between
//! its `poll` and reading errno: had it handled an EINTR while that thread ran, it would read
//! EAGAIN, as UML's helpers did (and then printed from a stack with no guest kernel task
//! behind it: the guest panicked).
//!
//! The helper shares the making thread's TLS, and with it glibc's per-thread malloc cache:
//! it must not allocate, so it formats its one message into a stack buffer.

use std::io::Write;
use std::os::fd::IntoRawFd;

use crate::check::OrFail;
use crate::sys;

/// Stack of the helper (it runs a few small functions).
const STACK_BYTES: usize = 64 << 10;
/// How long the helper waits between its `poll`'s failure and reading errno.
const HELPER_DELAY_NS: u64 = 1_000_000;
/// How often the making thread sets errno.
const SPAM_INTERVAL_US: i64 = 50;

/// Start the errno thread, which makes the helper and then keeps setting its own errno.
pub fn spawn() {
    std::thread::Builder::new()
        .name("errno".into())
        .spawn(|| {
            let (r, w) = sys::pipe(false).or_fail("helper pipe");
            // The helper keeps the read end; the write end stays open (unused) so that the
            // pipe never reports a hang-up.
            let fd = r.into_raw_fd();
            std::mem::forget(w);
            let stack: &'static mut [u8] = Vec::leak(vec![0u8; STACK_BYTES]);
            sys::clone_helper(helper_main, stack, fd).or_fail("cloning the helper");
            loop {
                sys::set_errno(libc::EAGAIN);
                // select, not nanosleep: a restore re-executes a select it interrupted, while
                // an interrupted nanosleep would end in EINTR and run beside the helper.
                sys::select_sleep_us(SPAM_INTERVAL_US);
            }
        })
        .or_fail("starting the errno thread");
}

/// The helper's body: `arg` is the pipe's read end.
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    let fd = arg as usize as i32;
    // Dies with the thread that made it. (No `or_fail` here: that allocates.)
    let _ = sys::set_pdeathsig(libc::SIGKILL);
    loop {
        if sys::poll_in(fd, -1).is_ok() {
            continue;
        }
        let t0 = sys::mono_ns();
        while sys::mono_ns() - t0 < HELPER_DELAY_NS {
            std::hint::spin_loop();
        }
        let e = sys::errno();
        if e == libc::EINTR {
            continue;
        }
        // Into a stack buffer: writing to a byte slice does not allocate.
        let mut buf = [0u8; 64];
        let mut cur = std::io::Cursor::new(&mut buf[..]);
        let _ = writeln!(cur, "vkload FAIL: helper: poll failed with errno {e}");
        let len = usize::try_from(cur.position()).unwrap_or(0);
        let line = &buf[..len];
        let _ = sys::write_all_fd(2, line);
        let _ = sys::write_all_fd(1, line);
        loop {
            sys::select_sleep_us(1_000_000);
        }
    }
}
