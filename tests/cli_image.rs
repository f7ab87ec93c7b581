//! `vkmigrate inspect` and `restore` on images that are not fit to restore: they must be refused
//! with a clear message and exit code 1, and restore must create nothing.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vkm_common::image::{ImageWriter, Space};
use vkm_common::model::{features, Clocks, CpuInfo, Vkernel};

fn vkm(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vkmigrate"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("VKMIGRATE_STATE_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("vkmigrate runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A well-formed image of a vkernel without processes, with a few pages.
fn write_image(path: &Path, name: &str) {
    let vk = Vkernel {
        name: name.into(),
        argv: vec!["sh".into(), "-c".into(), "true".into()],
        source_host: "test-host".into(),
        clocks: Clocks {
            monotonic_ns: 5_000_000_000,
            boottime_ns: 6_000_000_000,
            realtime_ns: 0,
        },
        cpu: CpuInfo::default(),
        processes: Vec::new(),
        mms: Vec::new(),
        objects: Vec::new(),
        fd_tables: Vec::new(),
        files: Vec::new(),
        pipes: Vec::new(),
        console: None,
        net: Vec::new(),
        mconsole: None,
    };
    let f = File::create(path).expect("create");
    let mut w =
        ImageWriter::new(BufWriter::new(f), features::XSTATE | features::TIME_NS).expect("writer");
    w.write_meta(&vk).expect("meta");
    let pages: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8 + 1).collect();
    w.write_pages(Space::Mm(0), 0x10000, &pages).expect("pages");
    let (buf, _) = w.finish().expect("finish");
    buf.into_inner().expect("flush").sync_all().expect("sync");
}

struct Tmp {
    dir: tempfile::TempDir,
}

impl Tmp {
    fn new() -> Tmp {
        Tmp {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn state(&self) -> PathBuf {
        self.path("state")
    }
    fn state_is_empty(&self) -> bool {
        std::fs::read_dir(self.state()).map_or(true, |mut rd| rd.next().is_none())
    }
}

#[test]
fn inspect_refuses_garbage() {
    let t = Tmp::new();
    let garbage = t.path("garbage.vkimg");
    std::fs::write(
        &garbage,
        b"this is not an image, just some text that is long enough",
    )
    .expect("write");
    let out = vkm(&t.state(), &["inspect", garbage.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "Error: The image {} failed verification\n  Caused by (1): Not a vkmigrate image (bad magic)",
            garbage.display()
        )
    );
    assert!(out.stdout.is_empty());

    let out = vkm(
        &t.state(),
        &["inspect", t.path("missing.vkimg").to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Caused by (1): No such file or directory"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn inspect_shows_a_valid_image() {
    let t = Tmp::new();
    let img = t.path("ok.vkimg");
    write_image(&img, "demo");
    let out = vkm(&t.state(), &["inspect", img.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "format 1.0",
        "xstate, time_ns",
        "vkernel demo",
        "test-host",
        "monotonic 5.000000000 s",
        "mm 0: 3 pages",
    ] {
        assert!(s.contains(want), "{want:?} missing from:\n{s}");
    }

    let out = vkm(
        &t.state(),
        &["inspect", "--json", img.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["format"]["major"], 1);
    assert_eq!(v["vkernel"]["name"], "demo");
    assert_eq!(v["summary"]["pages"], 3);
    assert_eq!(v["summary"]["spaces"][0]["kind"], "mm");
}

#[test]
fn restore_refuses_a_truncated_image_before_creating_anything() {
    let t = Tmp::new();
    let img = t.path("whole.vkimg");
    write_image(&img, "demo");
    let bytes = std::fs::read(&img).expect("read");
    for cut in [bytes.len() - 1, bytes.len() / 2, 40, 10] {
        let trunc = t.path(&format!("cut{cut}.vkimg"));
        std::fs::write(&trunc, &bytes[..cut]).expect("write");
        let out = vkm(&t.state(), &["restore", trunc.to_str().expect("utf-8")]);
        assert_eq!(out.status.code(), Some(1), "cut at {cut}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with(&format!(
                "Error: The image {} failed verification\n  Caused by (1): ",
                trunc.display()
            )),
            "cut at {cut}: {err}"
        );
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
        assert!(t.state_is_empty(), "cut at {cut}: restore created state");
    }

    // A flipped bit in a page: the checksum catches it, nothing is created either.
    let mut bad = bytes.clone();
    let mid = bad.len() - 100;
    bad[mid] ^= 0x40;
    let corrupt = t.path("corrupt.vkimg");
    std::fs::write(&corrupt, &bad).expect("write");
    let out = vkm(
        &t.state(),
        &["restore", corrupt.to_str().expect("utf-8"), "--name", "x"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("failed verification"),
        "{}",
        text(&out.stderr)
    );
    assert!(t.state_is_empty());
}

/// A restore that fails inside the shim (here: an image of a vkernel without processes) reports
/// the shim's error chain and leaves no state behind.
#[test]
fn restore_failing_in_the_shim_reports_its_chain_and_leaves_nothing() {
    let t = Tmp::new();
    let img = t.path("empty.vkimg");
    write_image(&img, "demo");
    let out = vkm(&t.state(), &["restore", img.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "Error: Cannot restore vkernel demo from {}\n  Caused by (1): ",
            img.display()
        )),
        "{err}"
    );
    assert!(t.state_is_empty(), "state left behind");
    assert!(out.stdout.is_empty());
}
