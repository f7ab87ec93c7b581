//! The RAM file: a memfd mapped MAP_SHARED twice, like User-Mode Linux's guest memory.
//!
//! Page 0 is the control page: word 0 counts pattern writes (written through view A), and
//! from word 8 on there is one 64-byte slot per child process (children increment theirs
//! through their inherited copy of view A). Pages 1.. are pattern pages written round-robin,
//! one per tick, through a one-page window mapped onto each in turn (as UML maps parts of its
//! RAM file in and out; through view A without the `window` feature), and checked through
//! view B and through pread. Pages not yet written are holes, so the file stays sparse for a
//! while, as UML's does.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pattern::{self, PageState, PAGE_SIZE, PAGE_WORDS, SALT_RAM};
use crate::sys;

/// Child slots that fit in the control page after the counter word.
pub const MAX_SLOTS: usize = 63;

pub struct RamFile {
    file: File,
    a: &'static [AtomicU64],
    b: &'static [AtomicU64],
    window: Option<sys::Window>,
    /// Number of pattern pages (all pages but the control page).
    period: u64,
    writes: u64,
    sweep: u64,
    sweep_per_tick: u64,
    pread_sweep: u64,
}

/// The word of child `i`'s counter in the control page.
pub fn slot_word(i: usize) -> usize {
    8 * (1 + i)
}

impl RamFile {
    pub fn create(mib: u64, tick_ms: u64, window: bool) -> std::io::Result<RamFile> {
        let len = mib as usize * 1024 * 1024;
        let file = sys::memfd_create(c"vkload-ram")?;
        file.set_len(len as u64)?;
        let a = sys::map_shared_file(&file, len)?;
        let b = sys::map_shared_file(&file, len)?;
        let window = if window {
            Some(sys::Window::new()?)
        } else {
            None
        };
        let period = (len / PAGE_SIZE) as u64 - 1;
        Ok(RamFile {
            file,
            a,
            b,
            window,
            period,
            writes: 0,
            sweep: 0,
            sweep_per_tick: (period * tick_ms).div_ceil(2000).clamp(1, period),
            pread_sweep: 0,
        })
    }

    /// Control page through view A (children write their slots here) and view B.
    pub fn control_pages(&self) -> (&'static [AtomicU64], &'static [AtomicU64]) {
        (&self.a[..PAGE_WORDS], &self.b[..PAGE_WORDS])
    }

    fn page(view: &'static [AtomicU64], p: u64) -> &'static [AtomicU64] {
        let s = p as usize * PAGE_WORDS;
        &view[s..s + PAGE_WORDS]
    }

    fn pread_page(&self, p: u64) -> Result<[u8; PAGE_SIZE], String> {
        let mut buf = [0u8; PAGE_SIZE];
        self.file
            .read_exact_at(&mut buf, p * PAGE_SIZE as u64)
            .map_err(|e| format!("ram file pread of page {p}: {e}"))?;
        Ok(buf)
    }

    /// Checks pattern page `p` (1-based) against the round-robin schedule.
    fn expect(&self, p: u64, got: Result<PageState, String>, via: &str) -> Result<(), String> {
        let want = match pattern::last_round_robin_write(self.writes, p - 1, self.period) {
            Some(w) => PageState::Gen(w + 1),
            None => PageState::Zero,
        };
        match got {
            Ok(state) if state == want => Ok(()),
            Ok(state) => Err(format!(
                "ram file page {p} via {via}: found {state:?}, expected {want:?} after {} writes",
                self.writes
            )),
            Err(e) => Err(format!("ram file via {via}: {e}")),
        }
    }

    pub fn tick(&mut self) -> Result<(), String> {
        // Write the next pattern page through the window, and the counter through view A.
        let p = 1 + self.writes % self.period;
        let gen = self.writes + 1;
        match self.window.as_mut() {
            Some(w) => w
                .with_page(&self.file, p, |page| {
                    pattern::write_page(page, p, gen, SALT_RAM)
                })
                .map_err(|e| format!("ram file window onto page {p}: {e}"))?,
            None => pattern::write_page(Self::page(self.a, p), p, gen, SALT_RAM),
        }
        self.writes += 1;
        self.a[0].store(self.writes, Ordering::Release);

        // The same must be visible through view B and through the file.
        let b0 = self.b[0].load(Ordering::Acquire);
        if b0 != self.writes {
            return Err(format!(
                "ram file counter via mapping B is {b0}, expected {}",
                self.writes
            ));
        }
        let ctl = self.pread_page(0)?;
        let mut w0 = [0u8; 8];
        w0.copy_from_slice(&ctl[..8]);
        let f0 = u64::from_le_bytes(w0);
        if f0 != self.writes {
            return Err(format!(
                "ram file counter via pread is {f0}, expected {}",
                self.writes
            ));
        }
        self.expect(
            p,
            pattern::check_page(Self::page(self.b, p), p, SALT_RAM),
            "mapping B",
        )?;
        self.expect(
            p,
            pattern::check_page_bytes(&self.pread_page(p)?, p, SALT_RAM),
            "pread",
        )?;

        // Sweep all pattern pages through B every ~2 s, and one more page per tick by pread.
        for _ in 0..self.sweep_per_tick {
            let q = 1 + self.sweep;
            self.sweep = (self.sweep + 1) % self.period;
            self.expect(
                q,
                pattern::check_page(Self::page(self.b, q), q, SALT_RAM),
                "mapping B",
            )?;
        }
        let q = 1 + self.pread_sweep;
        self.pread_sweep = (self.pread_sweep + 1) % self.period;
        self.expect(
            q,
            pattern::check_page_bytes(&self.pread_page(q)?, q, SALT_RAM),
            "pread",
        )
    }
}
