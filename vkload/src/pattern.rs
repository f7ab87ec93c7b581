//! Deterministic page and record contents, so that any copy of vkload's state can be checked
//! against what it should be without keeping a second copy.
//!
//! Page layout (4 KiB = 512 little-endian u64 words):
//! word 0 = seqlock sequence (2 * gen when stable, odd while being rewritten),
//! word 1 = page index, word 2 = generation, words 3.. = xorshift stream seeded by
//! (index, gen, salt). An all-zero page means "never written" where the caller allows it.

use std::sync::atomic::{fence, AtomicU64, Ordering};

pub const PAGE_SIZE: usize = 4096;
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;
const W_SEQ: usize = 0;
const W_INDEX: usize = 1;
const W_GEN: usize = 2;
const W_BODY: usize = 3;

pub const SALT_MEM: u64 = 0x6d65_6d00;
pub const SALT_RAM: u64 = 0x7261_6d00;
pub const SALT_CHILD: u64 = 0x6368_6c00;

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64* stream; seeded through splitmix so that neighbouring (index, gen) pairs give
/// unrelated streams.
#[derive(Clone)]
pub struct Pattern(u64);

impl Pattern {
    pub fn new(index: u64, gen: u64, salt: u64) -> Pattern {
        let s = splitmix64(index ^ splitmix64(gen ^ splitmix64(salt)));
        Pattern(if s == 0 { 1 } else { s })
    }
}

impl Iterator for Pattern {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        Some(x.wrapping_mul(0x2545_f491_4f6c_dd1d))
    }
}

/// Rewrites a page under its seqlock, so that a concurrent `check_page` either sees the
/// whole new content or reports the page as busy.
pub fn write_page(page: &[AtomicU64], index: u64, gen: u64, salt: u64) {
    debug_assert_eq!(page.len(), PAGE_WORDS);
    let seq = page[W_SEQ].load(Ordering::Relaxed);
    page[W_SEQ].store(seq | 1, Ordering::Relaxed);
    fence(Ordering::Release);
    page[W_INDEX].store(index, Ordering::Relaxed);
    page[W_GEN].store(gen, Ordering::Relaxed);
    for (w, v) in page[W_BODY..].iter().zip(Pattern::new(index, gen, salt)) {
        w.store(v, Ordering::Relaxed);
    }
    page[W_SEQ].store(gen.wrapping_mul(2), Ordering::Release);
}

/// Result of checking one page.
#[derive(Debug, PartialEq, Eq)]
pub enum PageState {
    /// Consistent pattern page of this generation.
    Gen(u64),
    /// Entirely zero.
    Zero,
    /// A writer was in the middle of rewriting it; try again later.
    Busy,
}

/// Checks a page that another thread may be rewriting with `write_page`.
pub fn check_page(page: &[AtomicU64], index: u64, salt: u64) -> Result<PageState, String> {
    let s1 = page[W_SEQ].load(Ordering::Acquire);
    if s1 & 1 == 1 {
        return Ok(PageState::Busy);
    }
    let res = check_words(|i| page[i].load(Ordering::Relaxed), index, salt);
    fence(Ordering::Acquire);
    if page[W_SEQ].load(Ordering::Relaxed) != s1 {
        return Ok(PageState::Busy);
    }
    res
}

/// Checks a page given as bytes (e.g. read back with pread).
pub fn check_page_bytes(bytes: &[u8], index: u64, salt: u64) -> Result<PageState, String> {
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    check_words(word, index, salt)
}

fn check_words(word: impl Fn(usize) -> u64, index: u64, salt: u64) -> Result<PageState, String> {
    let (seq, idx, gen) = (word(W_SEQ), word(W_INDEX), word(W_GEN));
    if seq == 0 && idx == 0 && gen == 0 && (W_BODY..PAGE_WORDS).all(|i| word(i) == 0) {
        return Ok(PageState::Zero);
    }
    if idx != index {
        return Err(format!("page {index}: header says index {idx}"));
    }
    if seq != gen.wrapping_mul(2) {
        return Err(format!("page {index}: seq {seq} does not match gen {gen}"));
    }
    for (i, want) in (W_BODY..PAGE_WORDS).zip(Pattern::new(index, gen, salt)) {
        let got = word(i);
        if got != want {
            return Err(format!(
                "page {index} gen {gen}: word {i} is {got:#018x}, expected {want:#018x}"
            ));
        }
    }
    Ok(PageState::Gen(gen))
}

/// With writes going round-robin (write number w goes to slot w % period), returns the
/// number of the last write that hit `slot` among the first `writes` writes.
pub fn last_round_robin_write(writes: u64, slot: u64, period: u64) -> Option<u64> {
    if writes <= slot {
        return None;
    }
    Some(slot + period * ((writes - 1 - slot) / period))
}

/// Fixed-size stream record: magic, stream id, sequence number, an auxiliary value
/// (e.g. a child's counter) and four pattern words derived from the rest.
pub const REC_SIZE: usize = 64;
const REC_MAGIC: u64 = 0x6372_6461_6f6c_6b76; // "vkloadrc" little-endian

pub fn encode_record(stream: u64, seq: u64, aux: u64) -> [u8; REC_SIZE] {
    let mut words = [REC_MAGIC, stream, seq, aux, 0, 0, 0, 0];
    for (w, v) in words[4..].iter_mut().zip(Pattern::new(seq, aux, stream)) {
        *w = v;
    }
    let mut out = [0u8; REC_SIZE];
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Returns (seq, aux) of a well-formed record of `stream`.
pub fn decode_record(rec: &[u8], stream: u64) -> Result<(u64, u64), String> {
    let mut words = [0u64; 8];
    for (w, chunk) in words.iter_mut().zip(rec.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    if words[0] != REC_MAGIC || words[1] != stream {
        return Err(format!(
            "bad record header magic={:#x} stream={:#x} (expected stream {stream:#x})",
            words[0], words[1]
        ));
    }
    let (seq, aux) = (words[2], words[3]);
    if encode_record(stream, seq, aux)[..] != rec[..REC_SIZE] {
        return Err(format!("record seq {seq}: pattern mismatch"));
    }
    Ok((seq, aux))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Vec<AtomicU64> {
        (0..PAGE_WORDS).map(|_| AtomicU64::new(0)).collect()
    }

    #[test]
    fn pattern_is_deterministic_and_distinct() {
        let a: Vec<u64> = Pattern::new(5, 7, SALT_MEM).take(16).collect();
        let b: Vec<u64> = Pattern::new(5, 7, SALT_MEM).take(16).collect();
        let c: Vec<u64> = Pattern::new(5, 8, SALT_MEM).take(16).collect();
        let d: Vec<u64> = Pattern::new(6, 7, SALT_MEM).take(16).collect();
        let e: Vec<u64> = Pattern::new(5, 7, SALT_RAM).take(16).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_ne!(a, e);
        assert!(a.iter().all(|&v| v != 0));
    }

    #[test]
    fn page_round_trip_and_corruption() {
        let p = page();
        assert_eq!(check_page(&p, 3, SALT_MEM), Ok(PageState::Zero));
        write_page(&p, 3, 0, SALT_MEM);
        assert_eq!(check_page(&p, 3, SALT_MEM), Ok(PageState::Gen(0)));
        write_page(&p, 3, 41, SALT_MEM);
        assert_eq!(check_page(&p, 3, SALT_MEM), Ok(PageState::Gen(41)));
        assert!(check_page(&p, 4, SALT_MEM).is_err());
        assert!(check_page(&p, 3, SALT_RAM).is_err());

        let bytes: Vec<u8> = p
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect();
        assert_eq!(
            check_page_bytes(&bytes, 3, SALT_MEM),
            Ok(PageState::Gen(41))
        );

        p[100].fetch_xor(1 << 17, Ordering::Relaxed);
        assert!(check_page(&p, 3, SALT_MEM).is_err());
        p[100].fetch_xor(1 << 17, Ordering::Relaxed);
        p[0].store(83, Ordering::Relaxed); // a writer is in the middle of it
        assert_eq!(check_page(&p, 3, SALT_MEM), Ok(PageState::Busy));
    }

    #[test]
    fn round_robin() {
        assert_eq!(last_round_robin_write(0, 0, 4), None);
        assert_eq!(last_round_robin_write(1, 0, 4), Some(0));
        assert_eq!(last_round_robin_write(1, 1, 4), None);
        assert_eq!(last_round_robin_write(4, 3, 4), Some(3));
        assert_eq!(last_round_robin_write(5, 0, 4), Some(4));
        assert_eq!(last_round_robin_write(5, 1, 4), Some(1));
        assert_eq!(last_round_robin_write(9, 0, 4), Some(8));
        // Brute force against a simulation.
        let period = 7;
        let mut last = vec![None; period as usize];
        for w in 0..100u64 {
            last[(w % period) as usize] = Some(w);
            for s in 0..period {
                assert_eq!(last_round_robin_write(w + 1, s, period), last[s as usize]);
            }
        }
    }

    #[test]
    fn records() {
        let r = encode_record(2, 77, 5);
        assert_eq!(decode_record(&r, 2), Ok((77, 5)));
        assert!(decode_record(&r, 3).is_err());
        let mut bad = r;
        bad[40] ^= 1;
        assert!(decode_record(&bad, 2).is_err());
        let mut bad = r;
        bad[16] ^= 1; // seq changes, pattern no longer matches
        assert!(decode_record(&bad, 2).is_err());
    }
}
