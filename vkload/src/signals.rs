//! Signal handlers, the alternate signal stack, the interval timer and the POSIX timer.
//!
//! Handlers only touch atomics. Problems they detect are parked in SIG_FAIL_* and reported by
//! the main thread, since formatting and writing from a handler is not async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::args::{Config, Feature};
use crate::sys;

pub static ALRM: AtomicU64 = AtomicU64::new(0);
pub static PTIMER: AtomicU64 = AtomicU64::new(0);
pub static USR2: AtomicU64 = AtomicU64::new(0);
pub static TERM: AtomicBool = AtomicBool::new(false);

const FAIL_NONE: u64 = 0;
const FAIL_ALTSTACK: u64 = 1;
const FAIL_PTIMER_INFO: u64 = 2;
static SIG_FAIL_CODE: AtomicU64 = AtomicU64::new(FAIL_NONE);
static SIG_FAIL_ARG: AtomicU64 = AtomicU64::new(0);
static SIG_FAIL_ARG2: AtomicU64 = AtomicU64::new(0);

static ALT_BASE: AtomicUsize = AtomicUsize::new(0);
static ALT_LEN: AtomicUsize = AtomicUsize::new(0);
const ALT_SIZE: usize = 64 * 1024;

/// si_value of the POSIX timer's signal; a restored timer must deliver the same.
pub const PTIMER_COOKIE: usize = 0x766b_6c6f_6164;
const ITIMER_MS: u64 = 20;
const PTIMER_MS: u64 = 25;

pub fn ptimer_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

/// Signals only the main thread may take: with them blocked in every other thread, the
/// process-directed ones (SIGALRM, kill(getpid()), the POSIX timer) all land on the main
/// thread, whose alternate stack the SIGUSR2 handler checks.
pub fn main_thread_signals() -> [libc::c_int; 4] {
    [libc::SIGALRM, libc::SIGUSR2, ptimer_signal(), libc::SIGTERM]
}

fn record_fail(code: u64, arg: u64, arg2: u64) {
    // Arguments first, code last: the main thread reads the code, then the arguments.
    if SIG_FAIL_CODE.load(Ordering::Relaxed) == FAIL_NONE {
        SIG_FAIL_ARG.store(arg, Ordering::Relaxed);
        SIG_FAIL_ARG2.store(arg2, Ordering::Relaxed);
        SIG_FAIL_CODE.store(code, Ordering::Release);
    }
}

extern "C" fn on_alrm(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    ALRM.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_usr2(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let local = 0u8;
    let sp = std::hint::black_box(&local) as *const u8 as usize;
    let base = ALT_BASE.load(Ordering::Relaxed);
    if !(base..base + ALT_LEN.load(Ordering::Relaxed)).contains(&sp) {
        record_fail(FAIL_ALTSTACK, sp as u64, 0);
    }
    USR2.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_ptimer(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let (code, value) = sys::siginfo_code_value(info);
    if code != libc::SI_TIMER || value != PTIMER_COOKIE {
        record_fail(FAIL_PTIMER_INFO, value as u64, code as i64 as u64);
    }
    PTIMER.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_term(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERM.store(true, Ordering::Relaxed);
}

/// Installs handlers and timers. Must run on the main thread, which owns the alternate stack.
pub fn install(cfg: &Config) -> std::io::Result<()> {
    sys::sigaction(libc::SIGTERM, on_term, 0)?;
    if cfg.has(Feature::Signals) {
        let stack = sys::map_private(ALT_SIZE)?;
        ALT_BASE.store(stack.as_ptr() as usize, Ordering::Relaxed);
        ALT_LEN.store(ALT_SIZE, Ordering::Relaxed);
        sys::sigaltstack(stack)?;
        sys::sigaction(libc::SIGUSR2, on_usr2, libc::SA_RESTART | libc::SA_ONSTACK)?;
    }
    if cfg.has(Feature::Itimer) {
        sys::sigaction(libc::SIGALRM, on_alrm, libc::SA_RESTART)?;
        sys::setitimer_real(ITIMER_MS)?;
    }
    if cfg.has(Feature::PosixTimer) {
        sys::sigaction(ptimer_signal(), on_ptimer, libc::SA_RESTART)?;
        sys::posix_timer(ptimer_signal(), PTIMER_COOKIE, PTIMER_MS)?;
    }
    Ok(())
}

/// A problem a handler detected, if any.
pub fn handler_failure() -> Option<String> {
    let code = SIG_FAIL_CODE.load(Ordering::Acquire);
    let arg = SIG_FAIL_ARG.load(Ordering::Relaxed);
    match code {
        FAIL_NONE => None,
        FAIL_ALTSTACK => Some(format!(
            "SIGUSR2 handler ran outside the alternate signal stack (local at {arg:#x}, \
             altstack {:#x}+{:#x})",
            ALT_BASE.load(Ordering::Relaxed),
            ALT_LEN.load(Ordering::Relaxed)
        )),
        _ => Some(format!(
            "POSIX timer signal with si_code {} si_value {arg:#x} (expected SI_TIMER and {:#x})",
            SIG_FAIL_ARG2.load(Ordering::Relaxed) as i64,
            PTIMER_COOKIE
        )),
    }
}
