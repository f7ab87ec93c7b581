//! Worker threads with thread-local counters, plus the helper threads of the threads mode.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::check::{fail, OrFail};
use crate::mem;
use crate::pattern::splitmix64;
use crate::sys;

thread_local! {
    // A `const` initialiser without Drop makes this a plain ELF TLS variable addressed
    // relative to fs_base, which is what a restore must get right for every thread.
    static TLS_COUNTER: Cell<u64> = const { Cell::new(0) };
}

pub fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .or_fail(&format!("spawning thread {name}"));
}

/// Starts `n` TLS workers; returns the counters they publish.
pub fn spawn_tls_workers(n: usize) -> &'static [AtomicU64] {
    let published: &'static [AtomicU64] = Box::leak(
        (0..n)
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let avx = std::is_x86_feature_detected!("avx");
    for (i, slot) in published.iter().enumerate() {
        spawn(&format!("vkl-tls{i}"), move || tls_worker(i, slot, avx));
    }
    published
}

fn tls_worker(i: usize, published: &AtomicU64, avx: bool) {
    let fs0 = sys::fs_base();
    let addr0 = TLS_COUNTER.with(|c| c as *const Cell<u64> as u64);
    loop {
        let v = TLS_COUNTER.get();
        let p = published.load(Ordering::Relaxed);
        if v != p {
            fail(format_args!(
                "tls mismatch: worker {i} TLS counter {v}, last published {p}"
            ));
        }
        TLS_COUNTER.set(v + 1);
        published.store(v + 1, Ordering::Relaxed);
        if v % 64 == 0 {
            let fs = sys::fs_base();
            let addr = TLS_COUNTER.with(|c| c as *const Cell<u64> as u64);
            if fs != fs0 || addr != addr0 {
                fail(format_args!(
                    "tls mismatch: worker {i} fs_base {fs:#x} (was {fs0:#x}), \
                     counter at {addr:#x} (was {addr0:#x})"
                ));
            }
        }
        let pat = [
            splitmix64(v ^ (i as u64) << 48),
            splitmix64(v + 1),
            splitmix64(v + 2),
            splitmix64(v + 3),
        ];
        let got = sys::nanosleep_holding_vector(1_000_000, pat, avx);
        if got != pat {
            let hex = |w: [u64; 4]| w.map(|x| format!("{x:016x}")).join(":");
            fail(format_args!(
                "vector register changed across a system call in worker {i}: {} instead of {} \
                 (xsave state not restored?)",
                hex(got),
                hex(pat)
            ));
        }
    }
}

/// Sends SIGUSR2 to the whole process every ~50 ms; only the main thread takes it.
pub fn spawn_usr2_sender() {
    spawn("vkl-usr2", || loop {
        sys::kill(std::process::id() as libc::pid_t, libc::SIGUSR2).or_fail("kill SIGUSR2");
        std::thread::sleep(Duration::from_millis(50));
    });
}

pub fn spawn_mem_writer(mut w: mem::Writer) {
    spawn("vkl-memw", move || loop {
        w.step(sys::mono_ns() / 1_000_000);
        std::thread::sleep(Duration::from_millis(5));
    });
}
