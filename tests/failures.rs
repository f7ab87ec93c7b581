//! Failures an operator will meet: each gets a clear error, loses nothing, and leaves nothing
//! behind (no image, no temporary file, no half-restored processes, no state).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{ok_counter, Lab};

const LONG: Duration = Duration::from_secs(30);

/// Processes (shims and what runs under them) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            out.push(pid);
        }
    }
    out
}

const MAPPER: &str = r#"
import mmap, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
n = 0
while True:
    n += 1
    print("ok", n, m[0], flush=True)
    time.sleep(0.05)
"#;

/// The vkernel maps a file whose unchanged pages are not in the image. If the file changes
/// after the checkpoint, restore refuses before anything runs, and names the file.
#[test]
fn restore_refuses_a_changed_mapped_file() {
    let mut lab = Lab::new();
    let data = lab.path("mapped.dat");
    std::fs::write(&data, vec![7u8; 64 * 1024]).expect("write");
    let py = common::python3();
    lab.run("mf", &[&py, "-c", MAPPER, data.to_str().expect("utf-8")]);
    lab.wait_line("mf", LONG, |l| ok_counter(l).filter(|&n| n >= 3));
    let img = lab.path("mf.vkimg");
    lab.ok(&["checkpoint", "mf", "-o", img.to_str().expect("utf-8")]);
    lab.forget("mf");
    std::fs::write(&data, vec![9u8; 80 * 1024]).expect("rewrite");
    let out = lab.vkm(&["restore", img.to_str().expect("utf-8"), "--name", "mf2"]);
    assert!(
        !out.status.success(),
        "restore with a changed mapped file succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mapped.dat"),
        "the error does not name the file: {err}"
    );
    assert!(
        !lab.state_dir().join("mf2").exists(),
        "a failed restore left state behind"
    );
    let state = lab.state_dir();
    assert!(
        processes_mentioning(state.to_str().expect("utf-8")).is_empty(),
        "a failed restore left processes behind"
    );
}

/// Checkpoint to a full filesystem: a clear error, no image and no temporary file, and the
/// vkernel keeps running as if nothing happened.
#[test]
fn checkpoint_to_a_full_disk_loses_nothing() {
    let mut lab = Lab::new();
    let small = lab.path("small");
    std::fs::create_dir(&small).expect("mkdir");
    let _mount = TmpfsMount::new(&small, "256k");
    let vkload = common::vkload_bin();
    lab.run("fd", &[vkload.to_str().expect("utf-8"), "--mem", "8"]);
    let t = lab.wait_tick("fd", 5, LONG);
    let img = small.join("fd.vkimg");
    let out = lab.vkm(&["checkpoint", "fd", "-o", img.to_str().expect("utf-8")]);
    assert!(!out.status.success(), "checkpoint to a full disk succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left"),
        "the error does not say the disk is full: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(&small)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "files left on the full disk: {left:?}");
    lab.wait_tick("fd", common::field_u64(&t, "tick") + 10, LONG);
}

/// A tmpfs of `size` mounted on `dir` for the test's life.
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> TmpfsMount {
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "vkm-test",
                dir.to_str().expect("utf-8"),
            ])
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        TmpfsMount(dir.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A process that gave up root would come back as root: refused, named, and left running.
#[test]
fn non_root_process_is_refused() {
    let mut lab = Lab::new();
    let py = common::python3();
    let script = "import os, time\nos.setgid(65534); os.setuid(65534)\nn = 0\nwhile True:\n    n += 1\n    print('ok', n, flush=True)\n    time.sleep(0.05)\n";
    lab.run("nr", &[&py, "-c", script]);
    lab.wait_line("nr", LONG, |l| ok_counter(l).filter(|&n| n >= 3));
    let img = lab.path("nr.vkimg");
    let out = lab.vkm(&["checkpoint", "nr", "-o", img.to_str().expect("utf-8")]);
    assert!(
        !out.status.success(),
        "checkpoint of a non-root process succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534"),
        "the error does not name the credentials: {err}"
    );
    assert!(!img.exists());
    let n = lab.wait_line("nr", LONG, ok_counter);
    lab.wait_line("nr", LONG, |l| ok_counter(l).filter(|&m| m >= n + 5));
}

/// Counts SIGALRMs of a one-shot timer that its handler re-arms every 50 µs, and traces a child
/// of its own, so that every freeze stops each thread and is then refused and undone. A signal
/// that was being delivered when a thread was stopped must be delivered after the thaw: the
/// timer is re-armed only by that handler, so a lost one stops the count for good (as it stops
/// a UML's clock).
const TICKER: &str = r#"
import ctypes, os, signal, time
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, None, None)
    os.kill(os.getpid(), signal.SIGSTOP)
    while True: time.sleep(1)
os.waitpid(pid, os.WUNTRACED)
n = 0
def tick(s, f):
    global n
    n += 1
    signal.setitimer(signal.ITIMER_REAL, 0.00005)
signal.signal(signal.SIGALRM, tick)
signal.setitimer(signal.ITIMER_REAL, 0.00005)
while True:
    time.sleep(0.1)
    print("ok", n, flush=True)
"#;

/// Refused freezes lose no signal: a vkernel whose timer fires every 50 µs still counts its
/// ticks after 100 checkpoints that were refused (each one stopped and let go every thread).
#[test]
fn a_refused_freeze_loses_no_signal() {
    let mut lab = Lab::new();
    let py = common::python3();
    lab.run("tick1", &[&py, "-c", TICKER]);
    lab.wait_line("tick1", LONG, ok_counter);
    let image = lab.path("tick1.vkimg");
    for _ in 0..100 {
        let out = lab.vkm(&["checkpoint", "tick1", "-o", image.to_str().expect("utf-8")]);
        assert!(!out.status.success(), "a traced process was checkpointed");
    }
    // Lines come every 0.1 s whatever happens; the count in them must move.
    let before = lab.wait_line("tick1", LONG, ok_counter);
    std::thread::sleep(Duration::from_millis(300));
    let after = lab.wait_line("tick1", LONG, ok_counter);
    assert!(
        after > before,
        "the timer stopped at {before} ticks: a SIGALRM was lost in a freeze"
    );
}
