//! End-to-end: vkload under `vkmigrate run`, checkpointed to a file and restored. vkload checks
//! itself continuously (it prints `vkload FAIL` and exits on any inconsistency), so these tests
//! assert what an operator would look at: the console goes on from where it was.

mod common;

use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use common::{field_u64, last_tick_line, tick_lines, ConsoleTail, Lab};

const LONG: Duration = Duration::from_secs(30);
/// vkload options for the fd kinds checkpoint supports (today: all of vkload's).
const SUPPORTED: &[&str] = &[];

fn vkload_cmd(extra: &[&str]) -> Vec<String> {
    let mut v = vec![common::vkload_bin().to_string_lossy().into_owned()];
    v.extend(SUPPORTED.iter().map(|s| s.to_string()));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_vkload(lab: &mut Lab, name: &str, extra: &[&str]) {
    let cmd = vkload_cmd(extra);
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    lab.run(name, &refs);
}

/// The restored vkernel continues: its first tick is the one after the last tick before the
/// checkpoint, its counters did not reset, CLOCK_MONOTONIC did not jump, and it keeps running.
fn assert_continues(lab: &Lab, name: &str, before: &std::collections::BTreeMap<String, String>) {
    let t_before = field_u64(before, "tick");
    let after = lab.wait_tick(name, t_before + 20, LONG);
    let log = lab.console_log(name);
    let lines = tick_lines(&log);
    let first = lines.first().expect("restored vkernel printed ticks");
    assert_eq!(
        field_u64(first, "tick"),
        t_before + 1,
        "first tick after restore; console:\n{log}"
    );
    let gap = field_u64(first, "mono_ms").saturating_sub(field_u64(before, "mono_ms"));
    assert!(
        gap < 2_000,
        "CLOCK_MONOTONIC jumped by {gap} ms across the restore"
    );
    for key in ["pipe", "alrm", "ptimer", "usr2", "mem", "child", "file"] {
        if let (Some(b), Some(a)) = (before.get(key), after.get(key)) {
            let (b, a): (u64, u64) = (b.parse().unwrap_or(0), a.parse().unwrap_or(0));
            assert!(a >= b, "{key} went back from {b} to {a}");
        }
    }
    assert!(
        field_u64(&after, "alrm") > field_u64(before, "alrm"),
        "itimer stopped firing"
    );
}

#[test]
fn checkpoint_then_restore_continues() {
    let mut lab = Lab::new();
    run_vkload(&mut lab, "cr1", &[]);
    lab.wait_tick("cr1", 15, LONG);
    let tail = ConsoleTail::start(&lab, "cr1");
    let img = lab.path("cr1.vkimg");
    lab.ok(&["checkpoint", "cr1", "-o", img.to_str().expect("utf-8")]);
    lab.forget("cr1");
    let before = last_tick_line(&tail.finish()).expect("ticks before the checkpoint");
    let meta = std::fs::metadata(&img).expect("image written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "image mode");
    // Without --leave-running the vkernel is gone once the image is safe.
    let ps = lab.ok(&["ps", "--json"]);
    assert!(
        !ps.contains("\"cr1\""),
        "cr1 still listed after checkpoint: {ps}"
    );
    lab.restore(&img, "cr1");
    assert_continues(&lab, "cr1", &before);
}

/// One image restores more than once (one after the other: the restored vkernels would share
/// vkload's data file otherwise).
#[test]
fn restore_twice_from_one_file() {
    let mut lab = Lab::new();
    run_vkload(&mut lab, "tw", &[]);
    lab.wait_tick("tw", 10, LONG);
    let tail = ConsoleTail::start(&lab, "tw");
    let img = lab.path("tw.vkimg");
    lab.ok(&["checkpoint", "tw", "-o", img.to_str().expect("utf-8")]);
    lab.forget("tw");
    let before = last_tick_line(&tail.finish()).expect("ticks before the checkpoint");
    for name in ["tw-a", "tw-b"] {
        // vkload appends to its data file; restore the file's length too, as a rollback would.
        lab.restore(&img, name);
        assert_continues(&lab, name, &before);
        lab.ok(&["kill", name]);
        lab.forget(name);
        truncate_data_files(&lab, &before);
    }
}

/// `--leave-running`: the image is written and the vkernel never notices.
#[test]
fn leave_running_keeps_the_vkernel() {
    let mut lab = Lab::new();
    run_vkload(&mut lab, "lr", &[]);
    let t = lab.wait_tick("lr", 10, LONG);
    let img = lab.path("lr.vkimg");
    lab.ok(&[
        "checkpoint",
        "lr",
        "-o",
        img.to_str().expect("utf-8"),
        "--leave-running",
    ]);
    let after = lab.wait_tick("lr", field_u64(&t, "tick") + 20, LONG);
    assert!(field_u64(&after, "alrm") > field_u64(&t, "alrm"));
    assert!(img.exists());
}

/// A vkernel holding an fd of a kind checkpoint does not support (here a listening TCP
/// socket) is refused, named, and keeps running; no image appears.
#[test]
fn unsupported_fd_is_refused_and_vkernel_untouched() {
    let mut lab = Lab::new();
    let py = common::python3();
    let prog = "import socket,time\n\
                s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen()\n\
                i=0\n\
                while True:\n    i+=1; print('t',i,flush=True); time.sleep(0.1)\n";
    lab.run("us", &[py.as_str(), "-c", prog]);
    let counter = |l: &str| {
        l.strip_prefix("t ")
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    let t = lab.wait_line("us", LONG, |l| counter(l).filter(|&n| n >= 5));
    let img = lab.path("us.vkimg");
    let out = lab.vkm(&["checkpoint", "us", "-o", img.to_str().expect("utf-8")]);
    assert!(
        !out.status.success(),
        "checkpoint of a vkernel with a TCP socket succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("socket"),
        "error does not name the socket: {err}"
    );
    assert!(err.contains("fd "), "error does not name the fd: {err}");
    assert!(!img.exists(), "an image was left behind");
    let dir_entries: Vec<_> = std::fs::read_dir(lab.dir.path())
        .expect("lab dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        !dir_entries
            .iter()
            .any(|n| n.to_string_lossy().contains(".tmp")),
        "temporary file left: {dir_entries:?}"
    );
    lab.wait_line("us", LONG, |l| counter(l).filter(|&n| n >= t + 15));
}

/// A corrupted or truncated image is refused before anything is created.
#[test]
fn corrupted_and_truncated_images_are_refused() {
    let mut lab = Lab::new();
    run_vkload(&mut lab, "co", &["--mem", "4"]);
    lab.wait_tick("co", 5, LONG);
    let img = lab.path("co.vkimg");
    lab.ok(&[
        "checkpoint",
        "co",
        "-o",
        img.to_str().expect("utf-8"),
        "--leave-running",
    ]);
    let bytes = std::fs::read(&img).expect("image");
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let bad = lab.path("flipped.vkimg");
    std::fs::write(&bad, &flipped).expect("write");
    let short = lab.path("short.vkimg");
    std::fs::write(&short, &bytes[..bytes.len() * 2 / 3]).expect("write");
    for (path, name) in [(&bad, "bad1"), (&short, "bad2")] {
        let out = lab.vkm(&["restore", path.to_str().expect("utf-8"), "--name", name]);
        assert!(
            !out.status.success(),
            "restore of a damaged image succeeded"
        );
        assert!(
            !lab.state_dir().join(name).exists(),
            "a damaged restore left state behind"
        );
    }
}

fn truncate_data_files(lab: &Lab, before: &std::collections::BTreeMap<String, String>) {
    let size = field_u64(before, "file");
    for e in std::fs::read_dir(lab.dir.path())
        .expect("lab dir")
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("vkload-") && n.ends_with(".dat") {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(e.path())
                .expect("data file");
            f.set_len(size).expect("truncate");
        }
    }
}

/// The console stays the controlling terminal of the vkernel's session, with the same
/// foreground process group: `/dev/tty` opens and the shell's job control keeps working.
#[test]
fn console_stays_the_controlling_terminal() {
    let mut lab = Lab::new();
    let script = r#"
import os, time
n = 0
while True:
    n += 1
    try:
        os.close(os.open('/dev/tty', os.O_RDWR))
        ctty = 'yes'
    except OSError:
        ctty = 'no'
    fg = 'yes' if os.tcgetpgrp(1) == os.getpgrp() else 'no'
    print('tty', n, ctty, fg, flush=True)
    time.sleep(0.1)
"#;
    let py = common::python3();
    lab.run("tty", &[&py, "-c", script]);
    let count = |l: &str| -> Option<u64> {
        l.strip_prefix("tty ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    lab.wait_line("tty", LONG, |l| count(l).filter(|&n| n >= 5));
    let img = lab.path("tty.vkimg");
    lab.ok(&["checkpoint", "tty", "-o", img.to_str().expect("utf-8")]);
    lab.forget("tty");
    lab.restore(&img, "tty");
    lab.wait_line("tty", LONG, |l| count(l).filter(|&n| n >= 12));
    let log = lab.console_log("tty");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("tty ")).collect();
    assert!(!lines.is_empty());
    for l in lines {
        assert!(
            l.ends_with(" yes yes"),
            "lost the controlling terminal after restore: {l}\n{log}"
        );
    }
}

/// A process that dropped capabilities comes back with exactly the ones it kept, not with
/// the restorer's: effective, permitted and bounding sets as they were.
#[test]
fn dropped_capabilities_stay_dropped() {
    let mut lab = Lab::new();
    let script = r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(24, 21, 0, 0, 0)              # PR_CAPBSET_DROP CAP_SYS_ADMIN
hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
data = (ctypes.c_uint32 * 6)()
libc.capget(hdr, data)
keep = ~((1 << 21) | (1 << 12)) & 0xffffffff   # drop CAP_SYS_ADMIN and CAP_NET_ADMIN
data[0] &= keep; data[1] &= keep
if libc.capset(hdr, data) != 0: print("FAIL capset", ctypes.get_errno(), flush=True)
def caps():
    d = {}
    for l in open("/proc/self/status"):
        if l.startswith("Cap"):
            k, v = l.split(":"); d[k] = int(v, 16)
    return d
first = caps()
n = 0
while True:
    n += 1
    now = caps()
    print("caps", n, "same" if now == first else "CHANGED %r %r" % (first, now), "%x" % now["CapEff"], flush=True)
    time.sleep(0.05)
"#;
    let py = common::python3();
    lab.run("caps", &[&py, "-c", script]);
    let count = |l: &str| -> Option<u64> {
        l.strip_prefix("caps ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    lab.wait_line("caps", LONG, |l| count(l).filter(|&n| n >= 5));
    let img = lab.path("caps.vkimg");
    lab.ok(&["checkpoint", "caps", "-o", img.to_str().expect("utf-8")]);
    lab.forget("caps");
    lab.restore(&img, "caps");
    lab.wait_line("caps", LONG, |l| count(l).filter(|&n| n >= 15));
    let log = lab.console_log("caps");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("caps ")).collect();
    assert!(!lines.is_empty());
    for l in lines {
        assert!(
            l.contains(" same "),
            "capabilities changed across the restore: {l}"
        );
        let eff = u64::from_str_radix(l.rsplit(' ').next().unwrap_or("0"), 16).unwrap_or(0);
        assert_eq!(eff & (1 << 21), 0, "CAP_SYS_ADMIN came back: {l}");
    }
}
