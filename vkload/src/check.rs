//! Failure reporting and the liveness watchdog.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::sys;

static FAILED: AtomicBool = AtomicBool::new(false);
/// Process group of our children, killed on the way out so that a failing vkload leaves
/// nothing behind even if PR_SET_PDEATHSIG was not restored.
static CHILD_PGID: AtomicI32 = AtomicI32::new(0);
/// -1 in the parent, the child's index in a child.
static CHILD_INDEX: AtomicI32 = AtomicI32::new(-1);

pub fn set_child_pgid(pgid: libc::pid_t) {
    CHILD_PGID.store(pgid, Ordering::Relaxed);
}

pub fn become_child(index: usize) {
    CHILD_PGID.store(0, Ordering::Relaxed);
    CHILD_INDEX.store(index as i32, Ordering::Relaxed);
}

/// Kills and reaps our children (if any); used on every way out of the parent.
pub fn kill_children(pids: &[libc::pid_t]) {
    let pgid = CHILD_PGID.swap(0, Ordering::Relaxed);
    if pgid > 0 {
        let _ = sys::kill(-pgid, libc::SIGKILL);
    }
    for &pid in pids {
        let _ = sys::kill(pid, libc::SIGKILL);
        sys::wait(pid);
    }
}

/// Reports a failed self-check on stderr and stdout and exits with status 1. Only the first
/// failing thread reports; any other one just waits for the exit.
pub fn fail(msg: impl Display) -> ! {
    if FAILED.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    let idx = CHILD_INDEX.load(Ordering::Relaxed);
    let line = if idx >= 0 {
        format!(
            "vkload FAIL: child {idx} (pid {}): {msg}\n",
            std::process::id()
        )
    } else {
        format!("vkload FAIL: {msg}\n")
    };
    let _ = sys::write_all_fd(2, line.as_bytes());
    let _ = sys::write_all_fd(1, line.as_bytes());
    let pgid = CHILD_PGID.load(Ordering::Relaxed);
    if pgid > 0 {
        let _ = sys::kill(-pgid, libc::SIGKILL);
    }
    sys::exit_now(1)
}

/// Unwraps a result, failing otherwise.
pub trait OrFail<T> {
    /// For errors that need context (setup steps, raw I/O errors).
    fn or_fail(self, what: &str) -> T;
    /// For self-check errors, whose messages already say what failed.
    fn or_fail_as_is(self) -> T;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => fail(format_args!("{what}: {e}")),
        }
    }

    fn or_fail_as_is(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => fail(e),
        }
    }
}

/// How long a counter may stay still before it counts as stalled.
pub const STALL_MS: u64 = 3000;

/// Detects a counter that stopped growing. A counter is stalled only if it did not grow for
/// STALL_MS of CLOCK_MONOTONIC time *and* for enough ticks to cover that time: a process that
/// was stopped (SIGSTOP, or frozen for a checkpoint) sees a long gap between two ticks without
/// having had a chance to make progress, and that must not count as a stall.
pub struct Stall {
    what: String,
    last: u64,
    since_ms: u64,
    ticks: u64,
    min_ticks: u64,
}

impl Stall {
    pub fn new(what: impl Into<String>, now_ms: u64, tick_ms: u64) -> Stall {
        Stall {
            what: what.into(),
            last: 0,
            since_ms: now_ms,
            ticks: 0,
            min_ticks: (STALL_MS / tick_ms).max(3),
        }
    }

    /// Returns an error message if `value` has been stuck for too long.
    pub fn observe(&mut self, value: u64, now_ms: u64) -> Result<(), String> {
        if value != self.last {
            self.last = value;
            self.since_ms = now_ms;
            self.ticks = 0;
            return Ok(());
        }
        self.ticks += 1;
        let still_ms = now_ms.saturating_sub(self.since_ms);
        if self.ticks >= self.min_ticks && still_ms >= STALL_MS {
            return Err(format!(
                "{} stalled at {value} for {still_ms} ms ({} ticks)",
                self.what, self.ticks
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_needs_time_and_ticks() {
        let mut s = Stall::new("x", 0, 100);
        assert!(s.observe(1, 100).is_ok());
        // A long pause: one tick 10 s later without growth is not a stall.
        assert!(s.observe(1, 10_100).is_ok());
        for i in 0..28 {
            assert!(s.observe(1, 10_200 + i * 100).is_ok());
        }
        // 30 ticks and > 3 s without growth.
        assert!(s.observe(1, 13_100).is_err());
        assert!(s.observe(2, 13_200).is_ok());
    }
}
