//! The private anonymous pattern region (rewritten at the dirty rate, verified continuously)
//! and a heap block with a running checksum.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::pattern::{self, PageState, PAGE_SIZE, PAGE_WORDS, SALT_MEM};
use crate::sys;

/// Pages rewritten so far (all writers), for the watchdog.
pub static WRITTEN: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
pub struct Region {
    words: &'static [AtomicU64],
}

impl Region {
    /// Maps `mib` MiB and writes generation 0 into every page, so that every page is
    /// populated and a page lost by a restore (read back as zeroes) is caught.
    pub fn new(mib: u64) -> std::io::Result<Region> {
        let words = sys::map_private(mib as usize * 1024 * 1024)?;
        let r = Region { words };
        for i in 0..r.pages() {
            pattern::write_page(r.page(i), i, 0, SALT_MEM);
        }
        Ok(r)
    }

    pub fn pages(&self) -> u64 {
        (self.words.len() / PAGE_WORDS) as u64
    }

    fn page(&self, i: u64) -> &'static [AtomicU64] {
        let start = i as usize * PAGE_WORDS;
        &self.words[start..start + PAGE_WORDS]
    }
}

/// Rewrites random pages with generation + 1 at a fixed rate.
pub struct Writer {
    region: Region,
    rng: u64,
    pages_per_s: u64,
    /// Most pages one step may write: debt accumulated while the process was stopped is
    /// dropped rather than paid back in one burst.
    max_burst: u64,
    start_ms: u64,
    done: u64,
}

impl Writer {
    pub fn new(region: Region, dirty_mbps: u64, tick_ms: u64, now_ms: u64) -> Writer {
        let pages_per_s = if dirty_mbps == 0 {
            (8 * 1000 / tick_ms).max(1)
        } else {
            dirty_mbps * (1024 * 1024 / PAGE_SIZE as u64)
        };
        Writer {
            region,
            rng: pattern::splitmix64(now_ms) | 1,
            pages_per_s,
            max_burst: (pages_per_s * tick_ms.max(100) / 1000).max(1),
            start_ms: now_ms,
            done: 0,
        }
    }

    /// Writes the pages owed at `now_ms`; returns how many.
    pub fn step(&mut self, now_ms: u64) -> u64 {
        let due = now_ms.saturating_sub(self.start_ms) * self.pages_per_s / 1000;
        let mut owed = due.saturating_sub(self.done);
        if owed > self.max_burst {
            self.done = due - self.max_burst;
            owed = self.max_burst;
        }
        let pages = self.region.pages();
        for _ in 0..owed {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let i = self.rng % pages;
            let page = self.region.page(i);
            // Only this writer changes pages, so the current generation is simply read back.
            let gen = page[2].load(Ordering::Relaxed) + 1;
            pattern::write_page(page, i, gen, SALT_MEM);
        }
        self.done += owed;
        WRITTEN.fetch_add(owed, Ordering::Relaxed);
        owed
    }
}

/// Verifies a slice of the region per tick, so that all of it is covered every `verify_s`.
pub struct Verifier {
    region: Region,
    cursor: u64,
    per_tick: u64,
    pub verified: u64,
}

impl Verifier {
    pub fn new(region: Region, tick_ms: u64, verify_s: u64) -> Verifier {
        let pages = region.pages();
        Verifier {
            region,
            cursor: 0,
            per_tick: (pages * tick_ms)
                .div_ceil(verify_s.max(1) * 1000)
                .clamp(1, pages.max(1)),
            verified: 0,
        }
    }

    pub fn tick(&mut self) -> Result<(), String> {
        let pages = self.region.pages();
        for _ in 0..self.per_tick {
            let i = self.cursor;
            self.cursor = (self.cursor + 1) % pages;
            match pattern::check_page(self.region.page(i), i, SALT_MEM) {
                Ok(PageState::Gen(_)) => self.verified += 1,
                // Being rewritten right now: it will be checked on the next pass.
                Ok(PageState::Busy) => {}
                Ok(PageState::Zero) => return Err(format!("memory region page {i} is all zero")),
                Err(e) => return Err(format!("memory region {e}")),
            }
        }
        Ok(())
    }
}

/// A heap block whose checksum is maintained incrementally and recomputed every tick.
pub struct Heap {
    data: Vec<u64>,
    sum: u64,
    n: u64,
}

const HEAP_WORDS: usize = 16 * 1024;

impl Heap {
    pub fn new() -> Heap {
        let data: Vec<u64> = (0..HEAP_WORDS as u64).map(pattern::splitmix64).collect();
        let sum = checksum(&data);
        Heap { data, sum, n: 0 }
    }

    pub fn tick(&mut self) -> Result<(), String> {
        self.n += 1;
        let i = (pattern::splitmix64(self.n) % HEAP_WORDS as u64) as usize;
        let new = pattern::splitmix64(self.n ^ 0x6865_6170);
        self.sum = self
            .sum
            .wrapping_sub(mix(i, self.data[i]))
            .wrapping_add(mix(i, new));
        self.data[i] = new;
        let actual = checksum(&self.data);
        if actual != self.sum {
            return Err(format!(
                "heap checksum {actual:#x}, expected {:#x} (update {})",
                self.sum, self.n
            ));
        }
        Ok(())
    }
}

fn mix(i: usize, v: u64) -> u64 {
    pattern::splitmix64(v ^ (i as u64).rotate_left(40))
}

fn checksum(data: &[u64]) -> u64 {
    data.iter()
        .enumerate()
        .fold(0u64, |s, (i, &v)| s.wrapping_add(mix(i, v)))
}
