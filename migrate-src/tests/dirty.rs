//! The dirty tracker against a real writer: every page whose contents changed while it was
//! tracked must be reported (what pre-copy relies on), and the report must be selective.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vkm_migrate_src::dirty::DirtyTracker;

const PAGE: u64 = 4096;

/// vkload, built into the same target directory by `cargo build --workspace`.
fn vkload() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("vkload");
    assert!(
        p.exists(),
        "{} is missing: cargo build --workspace --bins first",
        p.display()
    );
    p
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn snapshot(pid: u32, ranges: &[(u64, u64)]) -> Vec<(u64, Vec<u8>)> {
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open mem");
    ranges
        .iter()
        .map(|&(s, e)| {
            let mut buf = vec![0u8; usize::try_from(e - s).expect("size")];
            // Unreadable holes (guard pages) stay zero in both snapshots.
            let _ = mem.read_at(&mut buf, s);
            (s, buf)
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn wait_state(pid: u32, stopped: bool) {
    for _ in 0..500 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("");
        if (state == "T") == stopped {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("process {pid} did not reach the expected state");
}

#[test]
fn every_changed_page_is_reported() {
    let child = Command::new(vkload())
        .args([
            "--mem",
            "256",
            "--dirty-mbps",
            "20",
            "--without",
            "children,memfd,socketpair,file",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vkload");
    let child = Killed(child);
    let pid = child.0.id();
    // Let it fill its memory first (first writes to fresh pages are reported, rightly), however
    // long that takes on a loaded machine.
    let t0 = std::time::Instant::now();
    while rss_kib(pid) < 250 * 1024 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "vkload did not fill its memory within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));

    let mut tracker = DirtyTracker::attach(i32::try_from(pid).expect("pid")).expect("attach");
    let ranges = tracker.tracked().to_vec();
    let total: u64 = ranges.iter().map(|(s, e)| (e - s) / PAGE).sum();
    assert!(
        total > 60_000,
        "vkload's 256 MiB is not tracked: {total} pages"
    );
    let before = snapshot(pid, &ranges);

    let mut reported: BTreeSet<u64> = BTreeSet::new();
    let mut add = |d: Vec<(u64, u64)>| {
        for (s, e) in d {
            reported.extend((s..e).step_by(PAGE as usize));
        }
    };
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        add(tracker.collect().expect("collect"));
    }
    // The final round of a migration: the writer is stopped, then one last collect.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    wait_state(pid, true);
    add(tracker.collect().expect("final collect"));
    let after = snapshot(pid, &ranges);

    let mut changed = 0u64;
    for ((start, a), (_, b)) in before.iter().zip(&after) {
        for (i, (pa, pb)) in a
            .chunks(PAGE as usize)
            .zip(b.chunks(PAGE as usize))
            .enumerate()
        {
            if pa != pb {
                changed += 1;
                let addr = start + i as u64 * PAGE;
                assert!(
                    reported.contains(&addr),
                    "page {addr:#x} changed but was not reported"
                );
            }
        }
    }
    assert!(
        changed > 100,
        "the writer changed only {changed} pages; the test proves nothing"
    );
    let reported_n = reported.len() as u64;
    assert!(
        reported_n < total / 2,
        "{reported_n} of {total} pages reported: tracking is not selective"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::SIGCONT,
    )
    .expect("SIGCONT");
}

/// Maps 64 pages, waits for a line on stdin, then unmaps them, maps them again at the same
/// address (maps shows the very same line before and after) and writes page 5.
const REMAPPER: &str = r#"
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
N = 64 * 4096
# PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
a = libc.mmap(None, N, 3, 0x22, -1, 0)
ctypes.memset(a, 1, N)
print(a, flush=True)
sys.stdin.readline()
libc.munmap(a, N)
# MAP_FIXED_NOREPLACE: the same place or nothing
b = libc.mmap(a, N, 3, 0x22 | 0x100000, -1, 0)
if b != a:
    print("FAIL", b, flush=True)
    sys.exit(1)
ctypes.memset(b + 5 * 4096, 2, 4096)
print("done", flush=True)
time.sleep(60)
"#;

/// A mapping unmapped and mapped again alike between two collects is not registered any
/// more; its writes must still be reported (the tracker looks for new mappings only when
/// something shows a change).
#[test]
fn a_mapping_made_again_in_the_same_place_is_still_tracked() {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new("python3")
        .args(["-c", REMAPPER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let child = Killed(child);
    let pid = i32::try_from(child.0.id()).expect("pid");
    let addr: u64 = lines
        .next()
        .expect("a line")
        .expect("read")
        .trim()
        .parse()
        .expect("an address");

    let mut tracker = DirtyTracker::attach(pid).expect("attach");
    // Whatever was written until now.
    tracker.collect().expect("collect");
    writeln!(stdin).expect("go on");
    let done = lines.next().expect("a line").expect("read");
    assert_eq!(done, "done", "the remapper failed");
    let dirty = tracker.collect().expect("collect");
    let page = addr + 5 * PAGE;
    assert!(
        dirty.iter().any(|&(s, e)| (s..e).contains(&page)),
        "the page written in the mapping made again at {addr:#x} is not reported: {dirty:x?}"
    );
}
