//! The checkpoint image / migration stream codec.
//!
//! One format serves a checkpoint file and (later) a migration stream: it is written front to
//! back and read front to back, never seeked. Every integer is little-endian and every header has
//! a fixed, explicit layout (no struct transmutes, no implicit padding).
//!
//! ```text
//! image   = header frame* end
//! header  = magic[8] = "VKMIMG\0\x01" | major u16 | minor u16 | features u64 | reserved[12] = 0
//! frame   = kind u8 | reserved[3] = 0 | len u32 | payload[len]
//!   kind 1 Meta   payload = CBOR of the state model (at most MAX_META_LEN bytes)
//!   kind 2 Pages  payload = run header[32] | page bytes (raw or lz4 block) | blake3(raw pages)[32]
//!          run header = space_kind u8 (1 mm, 2 object) | reserved[3] | space_id u32 | addr u64
//!                     | npages u32 | encoding u8 (0 raw, 1 lz4) | reserved[3] | raw_len u32
//!                     | reserved[4]
//!   kind 3 Blob   payload = name_len u16 | name (UTF-8) | data   (at most MAX_BLOB_LEN bytes)
//! end     = kind 0xFF | reserved[3] = 0 | len u32 = 32 | blake3(every byte before this frame,
//!                                                             except the page bytes of runs)
//! ```
//!
//! Integrity is a two-level tree: each run's page bytes are covered by the run's own hash, and
//! the end hash covers everything else, run hashes included. Hashing page bytes once instead of
//! twice is what lets checkpoint and restore go past 1 GB/s on one core.
//!
//! Pages: a run holds 1..=[`MAX_RUN_PAGES`] consecutive non-zero pages of one address space
//! ([`Space::Mm`]: `addr` is a virtual address) or memory object ([`Space::Object`]: `addr` is a
//! byte offset). All-zero pages are never written: a page of a space that no run covers is zero.
//! Nothing may follow the end frame.
//!
//! A reader validates and caps every length before it allocates, so any byte sequence yields a
//! frame or an error, never a panic or an unbounded allocation.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CommonError, Result};

/// The first 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"VKMIMG\0\x01";

/// Format version, independent of the product version.
///
/// Compatibility rule (checked by [`ImageReader::new`]):
/// - `major` must equal [`FORMAT_MAJOR`]; any change an older reader would misread without
///   noticing (header or frame layout, reserved bytes put to use, changed meaning) bumps it.
/// - `minor` may be anything. A reader accepts an image with a newer minor unless the image sets a
///   *required* feature bit ([`REQUIRED_FEATURES_MASK`], low 32 bits) that the reader does not know
///   ([`KNOWN_REQUIRED_FEATURES`]). Unknown *optional* bits (high 32 bits) are ignored.
/// - So a minor bump may: add optional feature bits (for additions that an old reader may safely
///   ignore, such as new CBOR fields with defaults in the self-describing metadata), and add
///   required feature bits for anything an old reader cannot handle (a new frame kind, encoding or
///   space kind, which an old reader would otherwise reject as a malformed frame).
///
/// Changes: 1.0 — first version.
pub const FORMAT_MAJOR: u16 = 1;
/// See [`FORMAT_MAJOR`].
pub const FORMAT_MINOR: u16 = 0;

/// Feature bits an image may not set unless the reader knows them (low 32 bits).
pub const REQUIRED_FEATURES_MASK: u64 = 0x0000_0000_FFFF_FFFF;
/// Feature bits a reader may ignore (high 32 bits).
pub const OPTIONAL_FEATURES_MASK: u64 = !REQUIRED_FEATURES_MASK;
/// The required feature bits this build understands. The bits themselves are defined with the
/// state model ([`crate::model::features`]); every new required bit must be added here too.
pub const KNOWN_REQUIRED_FEATURES: u64 =
    crate::model::features::XSTATE | crate::model::features::TIME_NS;

/// Length of the image header.
pub const HEADER_LEN: usize = 32;
/// Length of a frame header (`kind`, reserved, `len`).
pub const FRAME_HEADER_LEN: usize = 8;
/// Size of a page.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one page run (1 MiB).
pub const MAX_RUN_PAGES: usize = 256;
/// Length of a page run's header inside a Pages payload.
pub const PAGES_HEADER_LEN: usize = 32;
/// Length of a blake3 hash.
pub const HASH_LEN: usize = 32;
/// Cap on a Meta payload.
pub const MAX_META_LEN: usize = 64 << 20;
/// Cap on a Blob payload (name length field, name and data).
pub const MAX_BLOB_LEN: usize = 64 << 20;
/// Cap on a Pages payload.
pub const MAX_PAGES_LEN: usize = PAGES_HEADER_LEN + MAX_RUN_PAGES * PAGE_SIZE + HASH_LEN;

const PAGE_MASK: u64 = PAGE_SIZE as u64 - 1;
const ENCODING_RAW: u8 = 0;
const ENCODING_LZ4: u8 = 1;
/// A run of zero pages with no body (migration page streams only).
const ENCODING_ZERO: u8 = 2;
const SPACE_KIND_MM: u8 = 1;
const SPACE_KIND_OBJECT: u8 = 2;
const READ_STEP: &str = "reading the image";
const WRITE_STEP: &str = "writing the image";

/// Page runs ready to be written: zero pages elided, each run hashed and maybe compressed.
#[derive(Debug, Default)]
pub struct EncodedPages {
    pub runs: Vec<EncodedRun>,
    pub zero_pages_skipped: u64,
}

/// One run as it goes into a Pages frame.
#[derive(Debug)]
pub struct EncodedRun {
    header: [u8; PAGES_HEADER_LEN],
    body: Vec<u8>,
    hash: [u8; HASH_LEN],
    raw_len: usize,
    compressed: bool,
}

/// Encode the pages of `data` (a whole number of pages at page-aligned `addr` of `space`) into
/// runs: all-zero pages are skipped, the others grouped into runs of at most [`MAX_RUN_PAGES`],
/// each hashed and, with `compression`, lz4-compressed when that saves at least an eighth.
/// Pure and thread-safe, so that a pipeline can encode on one core while it writes on another.
pub fn encode_pages(
    space: Space,
    addr: u64,
    data: &[u8],
    compression: bool,
) -> Result<EncodedPages> {
    check_pages(addr, data)?;
    let mut out = EncodedPages::default();
    for (start, end, zero) in runs_of(data) {
        if zero {
            out.zero_pages_skipped += (end - start) as u64;
            continue;
        }
        out.runs.push(encode_run(
            space,
            addr + (start * PAGE_SIZE) as u64,
            &data[start * PAGE_SIZE..end * PAGE_SIZE],
            compression,
        ));
    }
    Ok(out)
}

/// `data`'s pages in runs of at most [`MAX_RUN_PAGES`] pages that are all zero or none:
/// (first page, end page, all zero).
fn runs_of(data: &[u8]) -> impl Iterator<Item = (usize, usize, bool)> + '_ {
    let npages = data.len() / PAGE_SIZE;
    let zero = move |i: usize| is_zero_page(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= npages {
            return None;
        }
        let start = i;
        let z = zero(i);
        i += 1;
        while i < npages && i - start < MAX_RUN_PAGES && zero(i) == z {
            i += 1;
        }
        Some((start, i, z))
    })
}

fn compresses(page: &[u8]) -> bool {
    let mut buf = [0u8; 2 * PAGE_SIZE];
    matches!(lz4_flex::block::compress_into(page, &mut buf), Ok(n) if n <= page.len() - page.len() / 8)
}

/// Append `run` to `out` lz4-compressed, when that saves at least an eighth; false (and `out`
/// as it was) otherwise. Random-looking memory does not compress, and trying costs more than
/// storing it: the run's first page decides whether the whole run is worth a try.
fn append_compressed(run: &[u8], out: &mut Vec<u8>) -> bool {
    if !compresses(&run[..PAGE_SIZE]) {
        return false;
    }
    let at = out.len();
    out.resize(at + lz4_flex::block::get_maximum_output_size(run.len()), 0);
    match lz4_flex::block::compress_into(run, &mut out[at..]) {
        Ok(n) if n <= run.len() - run.len() / 8 => {
            out.truncate(at + n);
            true
        }
        // Not worth it, or failed: stored raw.
        _ => {
            out.truncate(at);
            false
        }
    }
}

fn encode_run(space: Space, addr: u64, run: &[u8], compression: bool) -> EncodedRun {
    let npages = run.len() / PAGE_SIZE;
    let hash = *blake3::hash(run).as_bytes();
    let mut body = Vec::new();
    let compressed = compression && append_compressed(run, &mut body);
    if !compressed {
        body = run.to_vec();
    }
    let encoding = if compressed {
        ENCODING_LZ4
    } else {
        ENCODING_RAW
    };
    let header = run_header(space, addr, npages, encoding);
    EncodedRun {
        header,
        body,
        hash,
        raw_len: run.len(),
        compressed,
    }
}

/// A page run header, checked.
struct RunHeader {
    space: Space,
    addr: u64,
    npages: usize,
    encoding: u8,
    raw_len: usize,
}

/// Parse and check a run header for a body of `enc_len` encoded bytes: the same rules for a
/// run read from an image and one received on a migration's page stream.
fn parse_run_header(rh: &[u8; PAGES_HEADER_LEN], enc_len: usize) -> Result<RunHeader> {
    let bad = |reason: String| CommonError::BadFrame {
        kind: FrameKind::Pages as u8,
        reason,
    };
    let space_id = u32::from_le_bytes(le4(&rh[4..8]));
    let space = Space::from_wire(rh[0], space_id)
        .ok_or_else(|| bad(format!("unknown space kind {}", rh[0])))?;
    let addr = u64::from_le_bytes(le8(&rh[8..16]));
    let npages = u32::from_le_bytes(le4(&rh[16..20])) as usize;
    let encoding = rh[20];
    let raw_len = u32::from_le_bytes(le4(&rh[24..28])) as usize;
    if rh[1..4] != [0; 3] || rh[21..24] != [0; 3] || rh[28..32] != [0; 4] {
        return Err(bad("non-zero reserved bytes in the run header".to_owned()));
    }
    if addr & PAGE_MASK != 0 {
        return Err(bad(format!("address {addr:#x} is not page-aligned")));
    }
    if npages == 0 || npages > MAX_RUN_PAGES {
        return Err(bad(format!(
            "{npages} pages in one run (1..={MAX_RUN_PAGES})"
        )));
    }
    if raw_len != npages * PAGE_SIZE {
        return Err(bad(format!("raw length {raw_len} for {npages} pages")));
    }
    if addr.checked_add(raw_len as u64).is_none() {
        return Err(bad(format!(
            "run at {addr:#x} passes the end of the address range"
        )));
    }
    match encoding {
        ENCODING_RAW if enc_len != raw_len => {
            return Err(bad(format!(
                "raw run of {enc_len} bytes, expected {raw_len}"
            )));
        }
        ENCODING_LZ4 if enc_len == 0 || enc_len > raw_len => {
            return Err(bad(format!(
                "lz4 run of {enc_len} bytes for {raw_len} raw bytes"
            )));
        }
        ENCODING_ZERO if enc_len != 0 => {
            return Err(bad(format!("zero run with {enc_len} bytes of data")));
        }
        ENCODING_RAW | ENCODING_LZ4 | ENCODING_ZERO => {}
        other => return Err(bad(format!("unknown encoding {other}"))),
    }
    Ok(RunHeader {
        space,
        addr,
        npages,
        encoding,
        raw_len,
    })
}

/// Like [`encode_pages`], but zero pages are kept as runs that carry no data: a page that was
/// sent earlier in a migration and has become zero since must be cleared at the destination.
pub fn encode_pages_keep_zero(
    space: Space,
    addr: u64,
    data: &[u8],
    compression: bool,
) -> Result<EncodedPages> {
    check_pages(addr, data)?;
    let mut out = EncodedPages::default();
    for (start, end, zero) in runs_of(data) {
        let run_addr = addr + (start * PAGE_SIZE) as u64;
        out.runs.push(if zero {
            zero_run(space, run_addr, end - start)
        } else {
            encode_run(
                space,
                run_addr,
                &data[start * PAGE_SIZE..end * PAGE_SIZE],
                compression,
            )
        });
    }
    Ok(out)
}

/// What [`encode_pages_wire`] appended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WireCounts {
    /// Runs (page-stream messages) written.
    pub runs: u64,
    /// Zero pages left out.
    pub zero_pages_skipped: u64,
    /// Zero pages sent as data-less runs (`keep_zero`).
    pub zero_pages_sent: u64,
}

/// [`encode_pages`] (with `keep_zero`, [`encode_pages_keep_zero`]) straight into `out`, each
/// run as a page-stream message in [`EncodedRun::write_wire`]'s form: the page data is copied
/// once, into `out`, or compressed into it, instead of into a run and then again into the
/// message (a migration moves gigabytes through here, and both ends share the CPUs).
pub fn encode_pages_wire(
    space: Space,
    addr: u64,
    data: &[u8],
    compression: bool,
    keep_zero: bool,
    out: &mut Vec<u8>,
) -> Result<WireCounts> {
    check_pages(addr, data)?;
    let mut counts = WireCounts::default();
    for (start, end, zero) in runs_of(data) {
        let n = end - start;
        let run_addr = addr + (start * PAGE_SIZE) as u64;
        if zero {
            if keep_zero {
                zero_run(space, run_addr, n).write_wire(out);
                counts.runs += 1;
                counts.zero_pages_sent += n as u64;
            } else {
                counts.zero_pages_skipped += n as u64;
            }
            continue;
        }
        let run = &data[start * PAGE_SIZE..end * PAGE_SIZE];
        let at = out.len();
        // Length and header are filled in once the body's size and encoding are known.
        out.resize(at + 4 + PAGES_HEADER_LEN, 0);
        let body_at = out.len();
        let encoding = if compression && append_compressed(run, out) {
            ENCODING_LZ4
        } else {
            out.extend_from_slice(run);
            ENCODING_RAW
        };
        out.extend_from_slice(blake3::hash(run).as_bytes());
        let len = (out.len() - at - 4) as u32;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        out[at + 4..body_at].copy_from_slice(&run_header(space, run_addr, n, encoding));
        counts.runs += 1;
    }
    Ok(counts)
}

/// `data` is whole pages at page-aligned `addr`, within the address range.
fn check_pages(addr: u64, data: &[u8]) -> Result<()> {
    if addr & PAGE_MASK != 0 {
        return Err(CommonError::InvalidArgument {
            reason: format!("page address {addr:#x} is not page-aligned"),
        });
    }
    if data.len() & (PAGE_SIZE - 1) != 0 {
        return Err(CommonError::InvalidArgument {
            reason: format!("page data of {} bytes is not whole pages", data.len()),
        });
    }
    if addr.checked_add(data.len() as u64).is_none() {
        return Err(CommonError::InvalidArgument {
            reason: format!("pages at {addr:#x} run past the end of the address range"),
        });
    }
    Ok(())
}

/// The 32-byte header of a run: space kind, space id, address, pages, encoding, raw length.
fn run_header(space: Space, addr: u64, npages: usize, encoding: u8) -> [u8; PAGES_HEADER_LEN] {
    let (space_kind, space_id) = space.to_wire();
    let mut header = [0u8; PAGES_HEADER_LEN];
    header[0] = space_kind;
    header[4..8].copy_from_slice(&space_id.to_le_bytes());
    header[8..16].copy_from_slice(&addr.to_le_bytes());
    header[16..20].copy_from_slice(&(npages as u32).to_le_bytes());
    header[20] = encoding;
    header[24..28].copy_from_slice(&((npages * PAGE_SIZE) as u32).to_le_bytes());
    header
}

/// A run of `npages` zero pages: a header and the hash of the zeros, no body.
fn zero_run(space: Space, addr: u64, npages: usize) -> EncodedRun {
    let raw_len = npages * PAGE_SIZE;
    let hash = *blake3::hash(&vec![0u8; raw_len]).as_bytes();
    EncodedRun {
        header: run_header(space, addr, npages, ENCODING_ZERO),
        body: Vec::new(),
        hash,
        raw_len,
        compressed: false,
    }
}

impl EncodedRun {
    /// Bytes of page data before encoding.
    pub fn raw_len(&self) -> usize {
        self.raw_len
    }

    /// The run as one page-stream message: its length (u32 LE), header, body and hash. A page
    /// stream carries these back to back; [`decode_run`] reads one.
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        let len = PAGES_HEADER_LEN + self.body.len() + HASH_LEN;
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.hash);
    }
}

/// Decode one run received on a page stream (the bytes after its length prefix): check the
/// header, decompress, verify the hash. Returns the space, the address and the raw pages
/// (borrowed from `msg` when the run was not compressed: a page stream carries gigabytes, and
/// every copy of them costs).
pub fn decode_run(msg: &[u8]) -> Result<(Space, u64, std::borrow::Cow<'_, [u8]>)> {
    use std::borrow::Cow;
    let bad = |reason: String| CommonError::BadFrame {
        kind: FrameKind::Pages as u8,
        reason,
    };
    if msg.len() > MAX_PAGES_LEN {
        return Err(CommonError::TooLarge {
            what: "page run message",
            len: msg.len() as u64,
            cap: MAX_PAGES_LEN as u64,
        });
    }
    let Some(enc_len) = msg.len().checked_sub(PAGES_HEADER_LEN + HASH_LEN) else {
        return Err(bad(format!(
            "message of {} bytes is shorter than a run's header and hash",
            msg.len()
        )));
    };
    let mut rh = [0u8; PAGES_HEADER_LEN];
    rh.copy_from_slice(&msg[..PAGES_HEADER_LEN]);
    let h = parse_run_header(&rh, enc_len)?;
    let body = &msg[PAGES_HEADER_LEN..PAGES_HEADER_LEN + enc_len];
    let data = match h.encoding {
        ENCODING_LZ4 => {
            let mut raw = vec![0u8; h.raw_len];
            match lz4_flex::block::decompress_into(body, &mut raw) {
                Ok(n) if n == h.raw_len => Cow::Owned(raw),
                Ok(n) => {
                    return Err(bad(format!(
                        "lz4 data decompresses to {n} bytes, expected {}",
                        h.raw_len
                    )))
                }
                Err(e) => return Err(bad(format!("lz4 data does not decompress ({e})"))),
            }
        }
        ENCODING_ZERO => Cow::Owned(vec![0u8; h.raw_len]),
        _ => Cow::Borrowed(body),
    };
    if blake3::hash(&data).as_bytes()[..] != msg[PAGES_HEADER_LEN + enc_len..] {
        return Err(CommonError::Checksum {
            what: format!("page run of {} at {:#x}", h.space, h.addr),
        });
    }
    debug_assert_eq!(data.len(), h.npages * PAGE_SIZE);
    Ok((h.space, h.addr, data))
}

/// A frame's kind byte. 0 is reserved as invalid.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Never valid on the wire.
    Invalid = 0,
    /// CBOR metadata.
    Meta = 1,
    /// A run of pages.
    Pages = 2,
    /// A named opaque blob.
    Blob = 3,
    /// The trailer with the whole-image hash.
    End = 0xFF,
}

impl FrameKind {
    /// The kind for a wire byte; `None` for unknown bytes and for 0 ([`FrameKind::Invalid`]).
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameKind::Meta),
            2 => Some(FrameKind::Pages),
            3 => Some(FrameKind::Blob),
            0xFF => Some(FrameKind::End),
            _ => None,
        }
    }
}

/// The memory a page run belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// An mm (address space), by the id the state model gives it; `addr` is a virtual address.
    Mm(u32),
    /// A memory object such as a memfd, by its id in the state model; `addr` is a byte offset.
    Object(u32),
}

impl Space {
    fn to_wire(self) -> (u8, u32) {
        match self {
            Space::Mm(id) => (SPACE_KIND_MM, id),
            Space::Object(id) => (SPACE_KIND_OBJECT, id),
        }
    }

    fn from_wire(kind: u8, id: u32) -> Option<Self> {
        match kind {
            SPACE_KIND_MM => Some(Space::Mm(id)),
            SPACE_KIND_OBJECT => Some(Space::Object(id)),
            _ => None,
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Space::Mm(id) => write!(f, "mm {id}"),
            Space::Object(id) => write!(f, "object {id}"),
        }
    }
}

/// The decoded image header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageHeader {
    pub major: u16,
    pub minor: u16,
    pub features: u64,
}

impl ImageHeader {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[12..20].copy_from_slice(&self.features.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the compatibility rule of [`FORMAT_MAJOR`].
    fn decode(b: &[u8; HEADER_LEN]) -> Result<Self> {
        if b[0..8] != MAGIC {
            return Err(CommonError::BadMagic);
        }
        let h = ImageHeader {
            major: u16::from_le_bytes([b[8], b[9]]),
            minor: u16::from_le_bytes([b[10], b[11]]),
            features: u64::from_le_bytes(le8(&b[12..20])),
        };
        if h.major != FORMAT_MAJOR {
            return Err(CommonError::UnsupportedVersion {
                major: h.major,
                minor: h.minor,
            });
        }
        check_required_features(h.features)?;
        if b[20..].iter().any(|&x| x != 0) {
            return Err(CommonError::BadHeader {
                reason: "non-zero reserved bytes",
            });
        }
        Ok(h)
    }
}

fn check_required_features(features: u64) -> Result<()> {
    let unknown = features & REQUIRED_FEATURES_MASK & !KNOWN_REQUIRED_FEATURES;
    if unknown != 0 {
        return Err(CommonError::UnknownRequiredFeatures(unknown));
    }
    Ok(())
}

/// Copies 8 bytes out of a slice that the caller has sized to 8.
fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    a
}

fn le4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&s[..4]);
    a
}

fn frame_header(kind: FrameKind, len: usize) -> Result<[u8; FRAME_HEADER_LEN]> {
    let len = u32::try_from(len).map_err(|_| CommonError::TooLarge {
        what: "frame",
        len: len as u64,
        cap: u64::from(u32::MAX),
    })?;
    let mut b = [0u8; FRAME_HEADER_LEN];
    b[0] = kind as u8;
    b[4..8].copy_from_slice(&len.to_le_bytes());
    Ok(b)
}

/// True if the page (or any slice) holds only zero bytes.
pub fn is_zero_page(page: &[u8]) -> bool {
    // OR-folding fixed chunks vectorises; a plain `all(|b| b == 0)` does not.
    page.chunks(128)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Encodes metadata as CBOR (what [`ImageWriter::write_meta`] stores).
pub fn encode_meta<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    ciborium::into_writer(value, &mut buf).map_err(CommonError::CborEncode)?;
    Ok(buf)
}

/// Decodes the payload of a [`Frame::Meta`]; bytes after the CBOR value are an error.
pub fn decode_meta<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let mut rest = bytes;
    let value = ciborium::from_reader(&mut rest).map_err(CommonError::CborDecode)?;
    if !rest.is_empty() {
        return Err(CommonError::BadFrame {
            kind: FrameKind::Meta as u8,
            reason: format!("{} bytes follow the CBOR value", rest.len()),
        });
    }
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Writer

/// Counters of an [`ImageWriter`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub meta_frames: u64,
    pub blob_frames: u64,
    /// Pages frames (runs) written.
    pub page_frames: u64,
    /// Of those, the runs stored lz4-compressed.
    pub compressed_page_frames: u64,
    /// Non-zero pages written.
    pub pages_written: u64,
    /// All-zero pages elided.
    pub zero_pages_skipped: u64,
    /// Page bytes written, uncompressed (`pages_written * PAGE_SIZE`).
    pub bytes_raw: u64,
    /// The same page bytes as stored (after compression).
    pub bytes_encoded: u64,
    /// Every byte of the stream so far, headers and trailer included.
    pub bytes_written: u64,
}

/// What one [`ImageWriter::write_pages`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagesStats {
    pub pages_written: u64,
    pub zero_pages_skipped: u64,
    /// Runs (Pages frames) written.
    pub frames: u64,
    /// Page bytes as stored (after compression), without frame and run headers.
    pub bytes_encoded: u64,
}

/// Writes an image front to back.
///
/// Every frame is written with several `write_all` calls: hand it a buffered writer. The writer
/// does not sync; for a file, call `sync_all` on it after [`ImageWriter::finish`].
/// After an I/O error the writer is poisoned and every further call fails.
pub struct ImageWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    compression: bool,
    poisoned: bool,
    stats: WriteStats,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the header. `features` may not contain required bits this build does not know.
    /// Compression is on; see [`ImageWriter::set_compression`].
    pub fn new(out: W, features: u64) -> Result<Self> {
        check_required_features(features)?;
        let mut w = ImageWriter {
            out,
            hasher: blake3::Hasher::new(),
            compression: true,
            poisoned: false,
            stats: WriteStats::default(),
        };
        let header = ImageHeader {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            features,
        };
        w.emit(&[&header.encode()])?;
        Ok(w)
    }

    /// Whether page runs are lz4-compressed (a run is stored compressed only when that saves at
    /// least 1/8 of its size).
    pub fn set_compression(&mut self, on: bool) {
        self.compression = on;
    }

    /// The counters so far.
    pub fn stats(&self) -> &WriteStats {
        &self.stats
    }

    /// Writes a Meta frame holding `value` as CBOR.
    pub fn write_meta<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let buf = encode_meta(value)?;
        if buf.len() > MAX_META_LEN {
            return Err(CommonError::TooLarge {
                what: "metadata frame",
                len: buf.len() as u64,
                cap: MAX_META_LEN as u64,
            });
        }
        let fh = frame_header(FrameKind::Meta, buf.len())?;
        self.emit(&[&fh, &buf])?;
        self.stats.meta_frames += 1;
        Ok(())
    }

    /// Writes a named blob.
    pub fn write_blob(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let name_len = u16::try_from(name.len()).map_err(|_| CommonError::InvalidArgument {
            reason: format!("blob name of {} bytes (at most 65535)", name.len()),
        })?;
        let len = 2 + name.len() + data.len();
        if len > MAX_BLOB_LEN {
            return Err(CommonError::TooLarge {
                what: "blob frame",
                len: len as u64,
                cap: MAX_BLOB_LEN as u64,
            });
        }
        let fh = frame_header(FrameKind::Blob, len)?;
        self.emit(&[&fh, &name_len.to_le_bytes(), name.as_bytes(), data])?;
        self.stats.blob_frames += 1;
        Ok(())
    }

    /// Writes the pages of `data` (a whole number of pages) found at `addr` (page-aligned) of
    /// `space`: all-zero pages are skipped and the others grouped into runs of at most
    /// [`MAX_RUN_PAGES`].
    pub fn write_pages(&mut self, space: Space, addr: u64, data: &[u8]) -> Result<PagesStats> {
        let enc = encode_pages(space, addr, data, self.compression)?;
        self.write_encoded(&enc)
    }

    /// Writes pages encoded by [`encode_pages`] (possibly on another thread: that is where the
    /// hashing and compression happen).
    pub fn write_encoded(&mut self, enc: &EncodedPages) -> Result<PagesStats> {
        let mut st = PagesStats {
            zero_pages_skipped: enc.zero_pages_skipped,
            ..Default::default()
        };
        for run in &enc.runs {
            let fh = frame_header(
                FrameKind::Pages,
                PAGES_HEADER_LEN + run.body.len() + HASH_LEN,
            )?;
            self.emit(&[&fh, &run.header])?;
            self.emit_unhashed(&run.body)?;
            self.emit(&[&run.hash])?;
            let npages = run.raw_len / PAGE_SIZE;
            self.stats.page_frames += 1;
            if run.compressed {
                self.stats.compressed_page_frames += 1;
            }
            self.stats.pages_written += npages as u64;
            self.stats.bytes_raw += run.raw_len as u64;
            self.stats.bytes_encoded += run.body.len() as u64;
            st.pages_written += npages as u64;
            st.frames += 1;
            st.bytes_encoded += run.body.len() as u64;
        }
        self.stats.zero_pages_skipped += enc.zero_pages_skipped;
        Ok(st)
    }

    /// Writes the End frame, flushes and hands back the sink.
    pub fn finish(mut self) -> Result<(W, WriteStats)> {
        if self.poisoned {
            return Err(CommonError::Poisoned);
        }
        let hash = self.hasher.finalize();
        let fh = frame_header(FrameKind::End, HASH_LEN)?;
        self.emit(&[&fh, hash.as_bytes()])?;
        self.out
            .flush()
            .map_err(CommonError::io("flushing the image"))?;
        Ok((self.out, self.stats))
    }

    /// Writes page bytes, which their run's own hash covers, without the running hash.
    fn emit_unhashed(&mut self, part: &[u8]) -> Result<()> {
        if self.poisoned {
            return Err(CommonError::Poisoned);
        }
        if let Err(e) = self.out.write_all(part) {
            self.poisoned = true;
            return Err(CommonError::io(WRITE_STEP)(e));
        }
        self.stats.bytes_written += part.len() as u64;
        Ok(())
    }

    /// Writes `parts` back to back and adds them to the running hash.
    fn emit(&mut self, parts: &[&[u8]]) -> Result<()> {
        if self.poisoned {
            return Err(CommonError::Poisoned);
        }
        for part in parts {
            if let Err(e) = self.out.write_all(part) {
                self.poisoned = true;
                return Err(CommonError::io(WRITE_STEP)(e));
            }
            self.hasher.update(part);
            self.stats.bytes_written += part.len() as u64;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reader

/// One frame as returned by [`ImageReader::next_frame`], validated and hash-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// CBOR metadata; decode with [`decode_meta`].
    Meta(Vec<u8>),
    /// Decompressed, hash-verified pages (`data.len()` is a multiple of [`PAGE_SIZE`]); pages of
    /// the space that no run covers are zero.
    Pages {
        space: Space,
        addr: u64,
        data: Vec<u8>,
    },
    /// A named blob.
    Blob { name: String, data: Vec<u8> },
}

/// What an image contains, as counted by [`verify`] or [`ImageReader::summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub header: ImageHeader,
    pub meta_frames: u64,
    /// Bytes of CBOR metadata.
    pub meta_bytes: u64,
    pub page_frames: u64,
    pub compressed_page_frames: u64,
    /// Non-zero pages stored.
    pub pages: u64,
    /// Page bytes as stored (after compression).
    pub page_bytes_encoded: u64,
    /// Stored pages per space.
    pub pages_per_space: BTreeMap<Space, u64>,
    pub blob_frames: u64,
    /// Bytes of blob data (names excluded).
    pub blob_bytes: u64,
    /// Every blob's name and data length, in stream order.
    pub blobs: Vec<(String, u64)>,
    /// Bytes of the image read so far (the whole image once the end frame is read).
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    Done,
    Failed,
}

enum Step {
    Frame(Frame),
    Skipped,
    End,
}

/// Reads an image front to back, validating as it goes. After an error it is poisoned.
pub struct ImageReader<R: Read> {
    src: R,
    hasher: blake3::Hasher,
    state: ReadState,
    summary: Summary,
    // Scratch buffers for frames that are checked but not kept (see `verify`).
    enc_buf: Vec<u8>,
    raw_buf: Vec<u8>,
}

/// Checks a whole image in one streaming pass — header, frame structure, every run's hash and the
/// trailer — without keeping its data, and counts what it holds.
pub fn verify<R: Read>(src: R) -> Result<Summary> {
    let mut reader = ImageReader::new(src)?;
    loop {
        match reader.step(false)? {
            Step::End => return Ok(reader.summary),
            Step::Frame(_) | Step::Skipped => {}
        }
    }
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the header (see the compatibility rule at [`FORMAT_MAJOR`]).
    pub fn new(mut src: R) -> Result<Self> {
        let mut b = [0u8; HEADER_LEN];
        read_exact(&mut src, &mut b, "image header")?;
        let header = ImageHeader::decode(&b)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&b);
        Ok(ImageReader {
            src,
            hasher,
            state: ReadState::Open,
            summary: Summary {
                header,
                total_bytes: HEADER_LEN as u64,
                ..Summary::default()
            },
            enc_buf: Vec::new(),
            raw_buf: Vec::new(),
        })
    }

    /// The image's header.
    pub fn header(&self) -> ImageHeader {
        self.summary.header
    }

    /// What was read so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The next frame; `Ok(None)` once the end frame has been read, its hash checked and the
    /// stream found to end there. Errors are final: later calls return [`CommonError::Poisoned`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            match self.step(true)? {
                Step::Frame(f) => return Ok(Some(f)),
                Step::End => return Ok(None),
                Step::Skipped => {}
            }
        }
    }

    /// Gives back the source (e.g. after `next_frame` returned `Ok(None)`).
    pub fn into_inner(self) -> R {
        self.src
    }

    fn step(&mut self, keep: bool) -> Result<Step> {
        match self.state {
            ReadState::Open => {}
            ReadState::Done => return Ok(Step::End),
            ReadState::Failed => return Err(CommonError::Poisoned),
        }
        let res = self.step_inner(keep);
        match res {
            Err(_) => self.state = ReadState::Failed,
            Ok(Step::End) => self.state = ReadState::Done,
            Ok(_) => {}
        }
        res
    }

    fn step_inner(&mut self, keep: bool) -> Result<Step> {
        let mut fh = [0u8; FRAME_HEADER_LEN];
        read_exact(&mut self.src, &mut fh, "stream before the end frame")?;
        let kind_byte = fh[0];
        let bad = |reason: &str| CommonError::BadFrame {
            kind: kind_byte,
            reason: reason.to_owned(),
        };
        let kind = FrameKind::from_u8(kind_byte).ok_or_else(|| bad("unknown frame kind"))?;
        if fh[1..4] != [0, 0, 0] {
            return Err(bad("non-zero reserved bytes in the frame header"));
        }
        let len = u32::from_le_bytes(le4(&fh[4..8])) as usize;
        let cap = match kind {
            FrameKind::Meta => MAX_META_LEN,
            FrameKind::Blob => MAX_BLOB_LEN,
            FrameKind::Pages => MAX_PAGES_LEN,
            FrameKind::End | FrameKind::Invalid => HASH_LEN,
        };
        if len > cap {
            return Err(CommonError::TooLarge {
                what: match kind {
                    FrameKind::Meta => "metadata frame",
                    FrameKind::Blob => "blob frame",
                    FrameKind::Pages => "page run frame",
                    FrameKind::End | FrameKind::Invalid => "end frame",
                },
                len: len as u64,
                cap: cap as u64,
            });
        }

        let step = match kind {
            FrameKind::End => {
                if len != HASH_LEN {
                    return Err(bad("end frame payload is not one hash"));
                }
                let expected = self.hasher.finalize();
                let mut got = [0u8; HASH_LEN];
                read_exact(&mut self.src, &mut got, "end frame")?;
                if expected.as_bytes() != &got {
                    return Err(CommonError::Checksum {
                        what: "whole image (end frame)".to_owned(),
                    });
                }
                self.check_no_trailing_data()?;
                Step::End
            }
            FrameKind::Meta => {
                self.hasher.update(&fh);
                let step = if keep {
                    let mut buf = Vec::new();
                    self.read_hashed_vec(len, "metadata frame", &mut buf)?;
                    Step::Frame(Frame::Meta(buf))
                } else {
                    self.skip_hashed(len, "metadata frame")?;
                    Step::Skipped
                };
                self.summary.meta_frames += 1;
                self.summary.meta_bytes += len as u64;
                step
            }
            FrameKind::Blob => {
                self.hasher.update(&fh);
                self.read_blob(len, keep)?
            }
            FrameKind::Pages => {
                self.hasher.update(&fh);
                self.read_pages(len, keep)?
            }
            FrameKind::Invalid => return Err(bad("unknown frame kind")),
        };
        self.summary.total_bytes += (FRAME_HEADER_LEN + len) as u64;
        Ok(step)
    }

    fn read_blob(&mut self, len: usize, keep: bool) -> Result<Step> {
        let bad = |reason: &str| CommonError::BadFrame {
            kind: FrameKind::Blob as u8,
            reason: reason.to_owned(),
        };
        if len < 2 {
            return Err(bad("payload shorter than the name length"));
        }
        let mut nl = [0u8; 2];
        self.read_hashed(&mut nl, "blob frame")?;
        let name_len = u16::from_le_bytes(nl) as usize;
        let Some(data_len) = len.checked_sub(2 + name_len) else {
            return Err(bad("name longer than the payload"));
        };
        let mut name = Vec::new();
        self.read_hashed_vec(name_len, "blob frame", &mut name)?;
        let name = String::from_utf8(name).map_err(|_| bad("name is not UTF-8"))?;
        self.summary.blob_frames += 1;
        self.summary.blob_bytes += data_len as u64;
        self.summary.blobs.push((name.clone(), data_len as u64));
        if keep {
            let mut data = Vec::new();
            self.read_hashed_vec(data_len, "blob frame", &mut data)?;
            Ok(Step::Frame(Frame::Blob { name, data }))
        } else {
            self.skip_hashed(data_len, "blob frame")?;
            Ok(Step::Skipped)
        }
    }

    fn read_pages(&mut self, len: usize, keep: bool) -> Result<Step> {
        let bad = |reason: String| CommonError::BadFrame {
            kind: FrameKind::Pages as u8,
            reason,
        };
        let Some(enc_len) = len.checked_sub(PAGES_HEADER_LEN + HASH_LEN) else {
            return Err(bad(format!(
                "payload of {len} bytes is shorter than a run's header and hash"
            )));
        };
        let mut rh = [0u8; PAGES_HEADER_LEN];
        self.read_hashed(&mut rh, "page run header")?;
        let RunHeader {
            space,
            addr,
            npages,
            encoding,
            raw_len,
        } = parse_run_header(&rh, enc_len)?;

        let mut enc = if keep {
            Vec::new()
        } else {
            std::mem::take(&mut self.enc_buf)
        };
        self.read_vec(enc_len, "page run data", &mut enc)?;
        let mut stored_hash = [0u8; HASH_LEN];
        self.read_hashed(&mut stored_hash, "page run hash")?;

        let data = if encoding == ENCODING_LZ4 {
            let mut raw = if keep {
                Vec::new()
            } else {
                std::mem::take(&mut self.raw_buf)
            };
            raw.clear();
            raw.resize(raw_len, 0);
            match lz4_flex::block::decompress_into(&enc, &mut raw) {
                Ok(n) if n == raw_len => {}
                Ok(n) => {
                    return Err(bad(format!(
                        "lz4 data decompresses to {n} bytes, expected {raw_len}"
                    )))
                }
                Err(e) => return Err(bad(format!("lz4 data does not decompress ({e})"))),
            }
            if !keep {
                self.enc_buf = enc;
            }
            raw
        } else if encoding == ENCODING_ZERO {
            vec![0u8; raw_len]
        } else {
            enc
        };
        if blake3::hash(&data).as_bytes() != &stored_hash {
            return Err(CommonError::Checksum {
                what: format!("page run of {space} at {addr:#x}"),
            });
        }

        let s = &mut self.summary;
        s.page_frames += 1;
        if encoding == ENCODING_LZ4 {
            s.compressed_page_frames += 1;
        }
        s.pages += npages as u64;
        s.page_bytes_encoded += enc_len as u64;
        *s.pages_per_space.entry(space).or_insert(0) += npages as u64;

        if keep {
            Ok(Step::Frame(Frame::Pages { space, addr, data }))
        } else {
            if encoding == ENCODING_LZ4 {
                self.raw_buf = data;
            } else {
                self.enc_buf = data;
            }
            Ok(Step::Skipped)
        }
    }

    fn read_hashed(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        read_exact(&mut self.src, buf, what)?;
        self.hasher.update(buf);
        Ok(())
    }

    /// Reads exactly `len` bytes into `buf` (cleared first). `buf` grows with the bytes that
    /// actually arrive, so a lying length costs no more memory than the data behind it.
    fn read_hashed_vec(&mut self, len: usize, what: &'static str, buf: &mut Vec<u8>) -> Result<()> {
        self.read_vec(len, what, buf)?;
        self.hasher.update(buf);
        Ok(())
    }

    /// Like [`Self::read_hashed_vec`] without the running hash: for page bytes, which the
    /// run's own hash covers.
    fn read_vec(&mut self, len: usize, what: &'static str, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        let n = (&mut self.src)
            .take(len as u64)
            .read_to_end(buf)
            .map_err(CommonError::io(READ_STEP))?;
        if n != len {
            return Err(CommonError::Truncated { what });
        }
        Ok(())
    }

    /// Reads `len` bytes into the running hash only.
    fn skip_hashed(&mut self, len: usize, what: &'static str) -> Result<()> {
        let n = io::copy(&mut (&mut self.src).take(len as u64), &mut self.hasher)
            .map_err(CommonError::io(READ_STEP))?;
        if n != len as u64 {
            return Err(CommonError::Truncated { what });
        }
        Ok(())
    }

    fn check_no_trailing_data(&mut self) -> Result<()> {
        let mut probe = [0u8; 1];
        loop {
            match self.src.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(CommonError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CommonError::io("checking for data after the end frame")(e)),
            }
        }
    }
}

/// `read_exact`, with an early end reported as [`CommonError::Truncated`].
fn read_exact<R: Read>(src: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    src.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CommonError::Truncated { what }
        } else {
            CommonError::io(READ_STEP)(e)
        }
    })
}
