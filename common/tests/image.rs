//! Tests of the image/stream codec: round trips, elision, and robustness against any bytes.

// Tests may unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vkm_common::error::CommonError;
use vkm_common::image::{
    decode_meta, verify, Frame, ImageReader, ImageWriter, Space, Summary, WriteStats, FORMAT_MAJOR,
    FRAME_HEADER_LEN, HASH_LEN, HEADER_LEN, KNOWN_REQUIRED_FEATURES, MAGIC, MAX_META_LEN,
    MAX_RUN_PAGES, PAGES_HEADER_LEN, PAGE_SIZE,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    name: String,
    pids: Vec<i32>,
    regs: Vec<u8>,
}

fn meta() -> Meta {
    Meta {
        name: "web1".into(),
        pids: vec![1, 2, 40],
        regs: (0..216).map(|i| i as u8).collect(),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

#[derive(Clone, Copy)]
enum PageKind {
    Zero,
    Random,
    Text,
}

fn pages(kinds: &[PageKind], seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut out = vec![0u8; kinds.len() * PAGE_SIZE];
    for (i, k) in kinds.iter().enumerate() {
        let p = &mut out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
        match k {
            PageKind::Zero => {}
            PageKind::Random => rng.fill(p),
            PageKind::Text => {
                let text = format!("page {i} of a compressible run; ");
                for (j, b) in p.iter_mut().enumerate() {
                    *b = text.as_bytes()[j % text.len()];
                }
            }
        }
    }
    out
}

fn read_all(bytes: &[u8]) -> Result<Vec<Frame>, CommonError> {
    let mut r = ImageReader::new(bytes)?;
    let mut frames = Vec::new();
    while let Some(f) = r.next_frame()? {
        frames.push(f);
    }
    Ok(frames)
}

/// Overlays every Pages frame of `frames` onto zeroed spaces of the given sizes.
fn rebuild(frames: &[Frame], sizes: &BTreeMap<Space, usize>) -> BTreeMap<Space, Vec<u8>> {
    let mut mem: BTreeMap<Space, Vec<u8>> = sizes.iter().map(|(s, n)| (*s, vec![0; *n])).collect();
    for f in frames {
        if let Frame::Pages { space, addr, data } = f {
            assert_eq!(addr % PAGE_SIZE as u64, 0);
            assert!(!data.is_empty() && data.len() % PAGE_SIZE == 0);
            assert!(data.len() <= MAX_RUN_PAGES * PAGE_SIZE);
            let m = mem.get_mut(space).expect("known space");
            let a = *addr as usize;
            m[a..a + data.len()].copy_from_slice(data);
        }
    }
    mem
}

struct Built {
    bytes: Vec<u8>,
    stats: WriteStats,
    spaces: BTreeMap<Space, Vec<u8>>,
}

fn build(compression: bool) -> Built {
    use PageKind::*;
    let mut spaces = BTreeMap::new();
    // An mm with zero pages at the start, middle and end, and a run longer than MAX_RUN_PAGES.
    let mut kinds = vec![Zero, Random, Text, Zero, Zero, Text, Random, Zero];
    kinds.extend(std::iter::repeat_n(Text, 300));
    kinds.push(Zero);
    spaces.insert(Space::Mm(0), pages(&kinds, 1));
    spaces.insert(Space::Object(7), pages(&[Random, Zero, Text, Text], 2));
    spaces.insert(Space::Mm(3), pages(&[Zero, Zero], 3));

    let mut w = ImageWriter::new(Vec::new(), 0).unwrap();
    w.set_compression(compression);
    w.write_meta(&meta()).unwrap();
    for (space, data) in &spaces {
        w.write_pages(*space, 0, data).unwrap();
    }
    w.write_blob("pipe:3", b"unread pipe bytes").unwrap();
    w.write_blob("", b"").unwrap();
    let (bytes, stats) = w.finish().unwrap();
    Built {
        bytes,
        stats,
        spaces,
    }
}

#[test]
fn round_trip_with_and_without_compression() {
    for compression in [false, true] {
        let b = build(compression);
        let frames = read_all(&b.bytes).unwrap();

        let Frame::Meta(m) = &frames[0] else {
            panic!("first frame is not Meta: {:?}", frames[0]);
        };
        assert_eq!(decode_meta::<Meta>(m).unwrap(), meta());

        let sizes = b.spaces.iter().map(|(s, d)| (*s, d.len())).collect();
        assert_eq!(rebuild(&frames, &sizes), b.spaces);

        let blobs: Vec<(&str, &[u8])> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Blob { name, data } => Some((name.as_str(), data.as_slice())),
                _ => None,
            })
            .collect();
        assert_eq!(
            blobs,
            vec![("pipe:3", &b"unread pipe bytes"[..]), ("", &b""[..])]
        );

        let s = verify(&b.bytes[..]).unwrap();
        assert_eq!(s.total_bytes, b.bytes.len() as u64);
        assert_eq!(s.total_bytes, b.stats.bytes_written);
        assert_eq!(s.meta_frames, 1);
        assert_eq!(s.blob_frames, 2);
        assert_eq!(s.blob_bytes, 17);
        assert_eq!(s.page_frames, b.stats.page_frames);
        assert_eq!(s.pages, b.stats.pages_written);
        assert_eq!(s.page_bytes_encoded, b.stats.bytes_encoded);
        assert_eq!(s.compressed_page_frames, b.stats.compressed_page_frames);
        assert_eq!(s.pages_per_space.get(&Space::Mm(0)), Some(&(4 + 300)));
        assert_eq!(s.pages_per_space.get(&Space::Object(7)), Some(&3));
        assert_eq!(s.pages_per_space.get(&Space::Mm(3)), None);
        assert_eq!(s.header.major, FORMAT_MAJOR);
        if compression {
            assert!(b.stats.compressed_page_frames > 0);
            assert!(b.stats.bytes_encoded < b.stats.bytes_raw);
        } else {
            assert_eq!(b.stats.compressed_page_frames, 0);
            assert_eq!(b.stats.bytes_encoded, b.stats.bytes_raw);
        }
    }
}

#[test]
fn zero_pages_are_elided_and_runs_split() {
    use PageKind::*;
    let mut w = ImageWriter::new(Vec::new(), 0).unwrap();
    let st = w
        .write_pages(
            Space::Mm(1),
            0x7000_0000,
            &pages(&[Zero, Random, Random, Zero, Zero, Random], 5),
        )
        .unwrap();
    assert_eq!(
        (st.pages_written, st.zero_pages_skipped, st.frames),
        (3, 3, 2)
    );

    let st = w
        .write_pages(Space::Mm(1), 0, &pages(&vec![Random; 600], 6))
        .unwrap();
    assert_eq!(
        (st.pages_written, st.zero_pages_skipped, st.frames),
        (600, 0, 3)
    );
    let st = w.write_pages(Space::Mm(1), 0, &[]).unwrap();
    assert_eq!((st.pages_written, st.frames), (0, 0));
    let st = w
        .write_pages(Space::Mm(2), 0, &vec![0u8; 64 * PAGE_SIZE])
        .unwrap();
    assert_eq!(
        (st.pages_written, st.zero_pages_skipped, st.frames),
        (0, 64, 0)
    );

    let (bytes, stats) = w.finish().unwrap();
    assert_eq!(stats.zero_pages_skipped, 67);
    assert_eq!(stats.pages_written, 603);
    assert_eq!(stats.page_frames, 5);
    // Random pages do not compress by 1/8.
    assert_eq!(stats.compressed_page_frames, 0);

    let frames = read_all(&bytes).unwrap();
    let runs: Vec<(u64, usize)> = frames
        .iter()
        .map(|f| match f {
            Frame::Pages { addr, data, .. } => (*addr, data.len() / PAGE_SIZE),
            other => panic!("unexpected frame {other:?}"),
        })
        .collect();
    assert_eq!(
        runs,
        vec![
            (0x7000_1000, 2),
            (0x7000_5000, 1),
            (0, 256),
            (256 * 4096, 256),
            (512 * 4096, 88)
        ]
    );
}

#[test]
fn writer_rejects_bad_arguments_without_writing() {
    let mut w = ImageWriter::new(Vec::new(), 0).unwrap();
    let before = w.stats().bytes_written;
    let page = vec![1u8; PAGE_SIZE];
    assert!(matches!(
        w.write_pages(Space::Mm(0), 0x1001, &page),
        Err(CommonError::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.write_pages(Space::Mm(0), 0x1000, &page[..100]),
        Err(CommonError::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.write_pages(Space::Mm(0), u64::MAX - 0xFFF, &page),
        Err(CommonError::InvalidArgument { .. })
    ));
    let long_name = "n".repeat(70_000);
    assert!(matches!(
        w.write_blob(&long_name, b""),
        Err(CommonError::InvalidArgument { .. })
    ));
    assert!(matches!(
        w.write_blob("big", &vec![0u8; MAX_META_LEN]),
        Err(CommonError::TooLarge { .. })
    ));
    assert_eq!(w.stats().bytes_written, before);
    // Still usable.
    w.write_pages(Space::Mm(0), 0x1000, &page).unwrap();
    let (bytes, _) = w.finish().unwrap();
    assert_eq!(read_all(&bytes).unwrap().len(), 1);

    assert!(matches!(
        ImageWriter::new(Vec::new(), 1 << 31),
        Err(CommonError::UnknownRequiredFeatures(x)) if x == 1 << 31
    ));
    // Known required bits and any optional bit are fine.
    let features = KNOWN_REQUIRED_FEATURES | 1 << 40;
    let (bytes, _) = ImageWriter::new(Vec::new(), features)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(verify(&bytes[..]).unwrap().header.features, features);
}

/// A small image (meta, one compressed and one raw run, a blob) for exhaustive mutation, and
/// the byte range of its raw run's page data.
fn small_image() -> (Vec<u8>, std::ops::Range<usize>) {
    use PageKind::*;
    let mut w = ImageWriter::new(Vec::new(), 0).unwrap();
    w.write_meta(&meta()).unwrap();
    w.write_pages(Space::Object(1), 0x2000, &pages(&[Text], 9))
        .unwrap();
    let mut raw = vec![0u8; PAGE_SIZE];
    Rng(11).fill(&mut raw[..300]);
    w.set_compression(false);
    w.write_pages(Space::Mm(2), 0x5000, &raw).unwrap();
    w.write_blob("b", b"blob").unwrap();
    let (bytes, stats) = w.finish().unwrap();
    assert_eq!(stats.compressed_page_frames, 1);
    let start = bytes
        .windows(300)
        .position(|w| w == &raw[..300])
        .expect("raw page data is in the image");
    (bytes, start..start + PAGE_SIZE)
}

/// Every offset of the small image, except that inside the raw page data (4 KiB of bytes that
/// are all treated alike) only every 61st is taken, to keep the tests fast in debug builds.
fn offsets(len: usize, body: &std::ops::Range<usize>) -> impl Iterator<Item = usize> + '_ {
    (0..len).filter(move |i| !body.contains(i) || i % 61 == 0 || *i == body.end - 1)
}

#[test]
fn every_truncation_is_an_error() {
    let (img, body) = small_image();
    assert!(read_all(&img).is_ok());
    for len in offsets(img.len(), &body) {
        let cut = &img[..len];
        let r = read_all(cut);
        assert!(
            matches!(r, Err(CommonError::Truncated { .. })),
            "prefix of {len} bytes: {r:?}"
        );
        assert!(
            verify(cut).is_err(),
            "verify accepted a prefix of {len} bytes"
        );
    }
}

#[test]
fn every_single_byte_flip_is_an_error_or_harmless() {
    let (img, body) = small_image();
    let good = read_all(&img).unwrap();
    for i in offsets(img.len(), &body) {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut bad = img.clone();
            bad[i] ^= mask;
            // A flip inside lz4 data may yield another encoding of the very same pages (the
            // run hash covers the pages, not their encoding): then nothing was lost.
            match read_all(&bad) {
                Err(_) => assert!(verify(&bad[..]).is_err(), "flip {mask:#x} at {i} verified"),
                Ok(frames) => assert_eq!(frames, good, "flip {mask:#x} at {i} changed the content"),
            }
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    let (mut img, _) = small_image();
    img.push(0);
    assert!(matches!(read_all(&img), Err(CommonError::TrailingData)));
    assert!(matches!(verify(&img[..]), Err(CommonError::TrailingData)));
}

#[test]
fn reader_is_poisoned_after_an_error_and_done_after_end() {
    let (img, _) = small_image();
    let mut r = ImageReader::new(&img[..img.len() - 1]).unwrap();
    let err = loop {
        match r.next_frame() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("truncated image read to the end"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, CommonError::Truncated { .. }));
    assert!(matches!(r.next_frame(), Err(CommonError::Poisoned)));

    let mut r = ImageReader::new(&img[..]).unwrap();
    while r.next_frame().unwrap().is_some() {}
    assert!(r.next_frame().unwrap().is_none());
    assert_eq!(r.summary().total_bytes, img.len() as u64);
}

// --- Crafted images: structure errors behind a correct trailer hash -------------------------

/// Header bytes with the given version and features.
fn header(major: u16, minor: u16, features: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&major.to_le_bytes());
    h.extend_from_slice(&minor.to_le_bytes());
    h.extend_from_slice(&features.to_le_bytes());
    h.resize(HEADER_LEN, 0);
    h
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind, 0, 0, 0];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Appends a correct End frame.
/// The end hash covers every byte but the page bytes of runs (their own hash covers those).
fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    h.update(&body[..HEADER_LEN]);
    let mut at = HEADER_LEN;
    while at + FRAME_HEADER_LEN <= body.len() {
        let kind = body[at];
        let len = u32::from_le_bytes(body[at + 4..at + 8].try_into().unwrap()) as usize;
        let payload = at + FRAME_HEADER_LEN;
        let end = (payload + len).min(body.len());
        h.update(&body[at..payload]);
        if kind == 2 && len >= PAGES_HEADER_LEN + HASH_LEN && end == payload + len {
            h.update(&body[payload..payload + PAGES_HEADER_LEN]);
            h.update(&body[end - HASH_LEN..end]);
        } else {
            h.update(&body[payload..end]);
        }
        at = end;
    }
    let hash = h.finalize();
    body.extend_from_slice(&[0xFF, 0, 0, 0]);
    body.extend_from_slice(&(HASH_LEN as u32).to_le_bytes());
    body.extend_from_slice(hash.as_bytes());
    body
}

#[allow(clippy::too_many_arguments)]
fn run_payload(
    kind: u8,
    id: u32,
    addr: u64,
    npages: u32,
    encoding: u8,
    raw_len: u32,
    body: &[u8],
    hash_of: &[u8],
) -> Vec<u8> {
    let mut p = vec![kind, 0, 0, 0];
    p.extend_from_slice(&id.to_le_bytes());
    p.extend_from_slice(&addr.to_le_bytes());
    p.extend_from_slice(&npages.to_le_bytes());
    p.extend_from_slice(&[encoding, 0, 0, 0]);
    p.extend_from_slice(&raw_len.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(body);
    p.extend_from_slice(blake3::hash(hash_of).as_bytes());
    p
}

fn with_frames(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut b = header(FORMAT_MAJOR, 0, 0);
    for f in frames {
        b.extend_from_slice(f);
    }
    seal(b)
}

#[test]
fn crafted_valid_image_reads() {
    let page = vec![5u8; PAGE_SIZE];
    let img = with_frames(&[frame(
        2,
        &run_payload(1, 9, 0x1000, 1, 0, 4096, &page, &page),
    )]);
    let frames = read_all(&img).unwrap();
    assert_eq!(
        frames,
        vec![Frame::Pages {
            space: Space::Mm(9),
            addr: 0x1000,
            data: page
        }]
    );
}

#[test]
fn header_checks() {
    let empty = seal(header(FORMAT_MAJOR, 0, 0));
    assert_eq!(
        verify(&empty[..]).unwrap(),
        Summary {
            header: vkm_common::image::ImageHeader {
                major: FORMAT_MAJOR,
                minor: 0,
                features: 0
            },
            total_bytes: (HEADER_LEN + FRAME_HEADER_LEN + HASH_LEN) as u64,
            ..Summary::default()
        }
    );

    let mut bad_magic = empty.clone();
    bad_magic[0] = b'X';
    assert!(matches!(verify(&bad_magic[..]), Err(CommonError::BadMagic)));
    assert!(matches!(
        verify(&b"VKM"[..]),
        Err(CommonError::Truncated { .. })
    ));

    let newer_major = seal(header(FORMAT_MAJOR + 1, 0, 0));
    assert!(matches!(
        verify(&newer_major[..]),
        Err(CommonError::UnsupportedVersion { major, .. }) if major == FORMAT_MAJOR + 1
    ));
    let older_major = seal(header(0, 0, 0));
    assert!(matches!(
        verify(&older_major[..]),
        Err(CommonError::UnsupportedVersion { .. })
    ));

    // A newer minor with unknown optional features is read.
    let newer_minor = seal(header(FORMAT_MAJOR, 7, 1 << 63 | 1 << 32));
    let s = verify(&newer_minor[..]).unwrap();
    assert_eq!((s.header.minor, s.header.features), (7, 1 << 63 | 1 << 32));
    // ... but not with an unknown required one.
    let unknown_required = seal(header(FORMAT_MAJOR, 7, 1 << 20 | 1 << 40));
    assert!(matches!(
        verify(&unknown_required[..]),
        Err(CommonError::UnknownRequiredFeatures(x)) if x == 1 << 20
    ));

    let mut reserved = header(FORMAT_MAJOR, 0, 0);
    reserved[31] = 1;
    let reserved = seal(reserved);
    assert!(matches!(
        verify(&reserved[..]),
        Err(CommonError::BadHeader { .. })
    ));
}

#[test]
fn frame_structure_checks() {
    let page = vec![5u8; PAGE_SIZE];
    let ok_run = run_payload(1, 0, 0, 1, 0, 4096, &page, &page);
    let is_bad_frame = |img: &[u8]| matches!(read_all(img), Err(CommonError::BadFrame { .. }));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid kind 0", with_frames(&[frame(0, b"")])),
        ("unknown kind", with_frames(&[frame(4, b"")])),
        ("reserved in frame header", {
            let mut f = frame(1, &[0xA0]);
            f[2] = 1;
            with_frames(&[f])
        }),
        ("end frame too short", {
            let mut b = header(FORMAT_MAJOR, 0, 0);
            b.extend_from_slice(&frame(0xFF, &[0; 16]));
            b
        }),
        (
            "unknown space kind",
            with_frames(&[frame(2, &run_payload(3, 0, 0, 1, 0, 4096, &page, &page))]),
        ),
        (
            "unaligned addr",
            with_frames(&[frame(2, &run_payload(1, 0, 10, 1, 0, 4096, &page, &page))]),
        ),
        (
            "zero pages",
            with_frames(&[frame(2, &run_payload(1, 0, 0, 0, 0, 0, b"", b""))]),
        ),
        (
            "too many pages",
            with_frames(&[frame(
                2,
                &run_payload(1, 0, 0, 257, 0, 257 * 4096, &page, &page),
            )]),
        ),
        (
            "raw_len mismatch",
            with_frames(&[frame(2, &run_payload(1, 0, 0, 1, 0, 4095, &page, &page))]),
        ),
        (
            "raw body length",
            with_frames(&[frame(2, &run_payload(1, 0, 0, 2, 0, 8192, &page, &page))]),
        ),
        (
            "unknown encoding",
            with_frames(&[frame(2, &run_payload(1, 0, 0, 1, 2, 4096, &page, &page))]),
        ),
        (
            "lz4 body longer than raw",
            with_frames(&[frame(
                2,
                &run_payload(1, 0, 0, 1, 1, 4096, &[0; 4097], &page),
            )]),
        ),
        (
            "lz4 garbage",
            with_frames(&[frame(
                2,
                &run_payload(1, 0, 0, 1, 1, 4096, &[0xF0; 64], &page),
            )]),
        ),
        ("lz4 too short output", {
            let small = lz4_flex::block::compress(&[7u8; 100]);
            with_frames(&[frame(2, &run_payload(1, 0, 0, 1, 1, 4096, &small, &page))])
        }),
        (
            "run past the address range",
            with_frames(&[frame(
                2,
                &run_payload(1, 0, u64::MAX - 0xFFF, 1, 0, 4096, &page, &page),
            )]),
        ),
        (
            "pages payload too short",
            with_frames(&[frame(2, &ok_run[..40])]),
        ),
        ("run reserved", {
            let mut p = ok_run.clone();
            p[29] = 1;
            with_frames(&[frame(2, &p)])
        }),
        (
            "blob shorter than its name length",
            with_frames(&[frame(3, &[1])]),
        ),
        (
            "blob name longer than payload",
            with_frames(&[frame(3, &[9, 0, b'a'])]),
        ),
        (
            "blob name not UTF-8",
            with_frames(&[frame(3, &[2, 0, 0xC3, 0x28])]),
        ),
    ];
    for (what, img) in &cases {
        assert!(is_bad_frame(img), "{what}: {:?}", read_all(img));
        assert!(verify(&img[..]).is_err(), "{what}: verify accepted it");
    }

    // A wrong run hash behind a correct trailer.
    let other = vec![6u8; PAGE_SIZE];
    let img = with_frames(&[frame(2, &run_payload(1, 0, 0, 1, 0, 4096, &page, &other))]);
    assert!(matches!(read_all(&img), Err(CommonError::Checksum { .. })));
    assert!(matches!(
        verify(&img[..]),
        Err(CommonError::Checksum { .. })
    ));
}

#[test]
fn huge_lengths_are_refused_before_allocation() {
    for kind in [1u8, 2, 3] {
        let mut b = header(FORMAT_MAJOR, 0, 0);
        b.extend_from_slice(&[kind, 0, 0, 0]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 64]);
        assert!(
            matches!(read_all(&b), Err(CommonError::TooLarge { .. })),
            "kind {kind}: {:?}",
            read_all(&b)
        );
    }
    // Below the cap but lying: costs only what arrives.
    let mut b = header(FORMAT_MAJOR, 0, 0);
    b.extend_from_slice(&[1, 0, 0, 0]);
    b.extend_from_slice(&(MAX_META_LEN as u32).to_le_bytes());
    b.extend_from_slice(&[0xA0; 10]);
    assert!(matches!(read_all(&b), Err(CommonError::Truncated { .. })));
    assert!(matches!(verify(&b[..]), Err(CommonError::Truncated { .. })));
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (valid, _) = small_image();
    for _ in 0..2000 {
        let len = (rng.next() % 200) as usize;
        let mut b = header(FORMAT_MAJOR, 0, 0);
        let mut tail = vec![0u8; len];
        rng.fill(&mut tail);
        // Bias towards plausible frame kinds and small lengths.
        if len >= 8 {
            tail[0] = [1, 2, 3, 0xFF][(rng.next() % 4) as usize];
            tail[1..4].fill(0);
            tail[6..8].fill(0);
        }
        b.extend_from_slice(&tail);
        assert!(read_all(&b).is_err());
        let _ = verify(&b[..]);
        // And splice random bytes into the valid image.
        let mut v = valid.clone();
        let at = (rng.next() as usize) % v.len();
        let n = 1 + (rng.next() % 8) as usize;
        for i in at..(at + n).min(v.len()) {
            v[i] = rng.next() as u8;
        }
        if v != valid {
            assert!(read_all(&v).is_err());
        }
    }
}

#[test]
fn decode_meta_rejects_trailing_bytes_and_wrong_types() {
    let mut bytes = Vec::new();
    ciborium::into_writer(&meta(), &mut bytes).unwrap();
    assert_eq!(decode_meta::<Meta>(&bytes).unwrap(), meta());
    bytes.push(0);
    assert!(matches!(
        decode_meta::<Meta>(&bytes),
        Err(CommonError::BadFrame { .. })
    ));
    assert!(matches!(
        decode_meta::<Meta>(&[0x01]),
        Err(CommonError::CborDecode(_))
    ));
    // A byte string claiming 2^63 bytes.
    let huge = [0x5B, 0x80, 0, 0, 0, 0, 0, 0, 0];
    assert!(decode_meta::<serde_bytes_like::Bytes>(&huge).is_err());
}

mod serde_bytes_like {
    /// Deserialises a CBOR byte string.
    #[derive(Debug)]
    pub struct Bytes(#[allow(dead_code)] pub Vec<u8>);
    impl<'de> serde::Deserialize<'de> for Bytes {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

// --- Golden image of format 1.0 -----------------------------------------------------------

const GOLDEN_1_0: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/image/v1.0.vkimg"
);

type Runs = Vec<(Space, u64, Vec<u8>)>;
type Blobs = Vec<(String, Vec<u8>)>;

fn golden_content() -> (Meta, Runs, Blobs) {
    use PageKind::*;
    let runs = vec![
        (
            Space::Mm(0),
            0x40_0000,
            pages(&[Text, Random, Zero, Text], 42),
        ),
        (Space::Object(1), 0, pages(&[Random], 43)),
    ];
    (meta(), runs, vec![("pipe:0".into(), b"hello".to_vec())])
}

/// The golden file is `golden_content()` written by the 1.0 writer (meta, the runs, the blobs,
/// then `finish`). A new format version adds a new file next to it; an old one is never
/// rewritten: it is what a released reader must keep loading.
#[test]
fn golden_image_1_0_still_reads() {
    let bytes = std::fs::read(GOLDEN_1_0).unwrap();
    let (m, runs, blobs) = golden_content();
    let frames = read_all(&bytes).unwrap();
    let Frame::Meta(meta_bytes) = &frames[0] else {
        panic!("first frame is not Meta");
    };
    assert_eq!(decode_meta::<Meta>(meta_bytes).unwrap(), m);
    let sizes: BTreeMap<Space, usize> = runs
        .iter()
        .map(|(s, a, d)| (*s, *a as usize + d.len()))
        .collect();
    let mem = rebuild(&frames, &sizes);
    for (space, addr, data) in &runs {
        assert_eq!(&mem[space][*addr as usize..], &data[..]);
    }
    let got_blobs: Vec<(String, Vec<u8>)> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Blob { name, data } => Some((name.clone(), data.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(got_blobs, blobs);
    let s = verify(&bytes[..]).unwrap();
    assert_eq!((s.header.major, s.header.minor), (1, 0));
    assert_eq!(s.pages, 4);
    assert!(s.compressed_page_frames >= 1);
}

/// The page-stream encoder writes exactly what encoding runs and then their messages does,
/// and each of its messages decodes back to the pages it carries.
#[test]
fn wire_encoding_matches_the_runs_and_decodes() {
    use vkm_common::image::{
        decode_run, encode_pages, encode_pages_keep_zero, encode_pages_wire, WireCounts,
    };
    let mut kinds = Vec::new();
    for i in 0..(MAX_RUN_PAGES * 2 + 7) {
        kinds.push(match i % 11 {
            0 | 1 => PageKind::Zero,
            2..=5 => PageKind::Text,
            _ => PageKind::Random,
        });
    }
    // A run of text pages long enough to be compressed on its own, and one of random pages.
    kinds.extend([PageKind::Text; 8]);
    kinds.extend([PageKind::Random; 3]);
    let data = pages(&kinds, 7);
    let addr = 0x7f00_0000_0000u64;
    for compression in [false, true] {
        for keep_zero in [false, true] {
            let runs = if keep_zero {
                encode_pages_keep_zero(Space::Mm(3), addr, &data, compression)
            } else {
                encode_pages(Space::Mm(3), addr, &data, compression)
            }
            .expect("encode");
            let mut want = Vec::new();
            for r in &runs.runs {
                r.write_wire(&mut want);
            }
            let mut got = b"before".to_vec();
            let counts =
                encode_pages_wire(Space::Mm(3), addr, &data, compression, keep_zero, &mut got)
                    .expect("encode_pages_wire");
            assert_eq!(&got[..6], b"before", "what was in the buffer is kept");
            assert_eq!(
                got[6..],
                want[..],
                "compression {compression}, keep_zero {keep_zero}"
            );
            let zero = kinds.iter().filter(|k| matches!(k, PageKind::Zero)).count() as u64;
            assert_eq!(
                counts,
                WireCounts {
                    runs: runs.runs.len() as u64,
                    zero_pages_skipped: if keep_zero { 0 } else { zero },
                    zero_pages_sent: if keep_zero { zero } else { 0 },
                }
            );
            // Every message decodes to its pages of `data`.
            let mut rest = &got[6..];
            while !rest.is_empty() {
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                let (space, at, pages) = decode_run(&rest[4..4 + n]).expect("decode");
                assert_eq!(space, Space::Mm(3));
                let off = usize::try_from(at - addr).expect("offset");
                assert_eq!(pages[..], data[off..off + pages.len()]);
                rest = &rest[4 + n..];
            }
        }
    }
    assert!(
        encode_pages_wire(Space::Mm(3), addr + 1, &data, true, false, &mut Vec::new()).is_err()
    );
}
