//! Live migration between two lab hosts (network namespaces joined by a bridge): a running
//! vkload moves from hostA to hostB and keeps passing its own checks; failures leave exactly
//! one running copy.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::netlab::{Host, NetLab, LISTEN_PORT};
use common::tick_lines;

fn dest(h: &Host) -> String {
    format!("{}:{LISTEN_PORT}", h.addr)
}

/// `send` `name` from `a` to `b` at `bandwidth` at most; it must succeed. Returns its report.
fn send_slowly(a: &Host, name: &str, b: &Host, bandwidth: &str) -> serde_json::Value {
    let report = a.dir.join("report.json");
    let out = a.send(
        name,
        b,
        &[
            "--max-bandwidth",
            bandwidth,
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

#[test]
fn a_running_vkload_moves_to_another_host_and_goes_on() {
    let lab = NetLab::new("mig-basic", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    a.run_vkload(
        "web1",
        &["--mem", "32", "--children", "2", "--threads", "2"],
    );
    a.wait_tick("web1", 5, Duration::from_secs(20));
    let report = a.dir.join("report.json");
    // A's console goes with its state once the vkernel has left.
    let seen = a.last_tick("web1");
    let out = a.send("web1", b, &["--report", report.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("migrated web1"));

    // Gone from A, running on B with the same counters going on.
    assert!(!a.ps_names().unwrap().contains(&"web1".to_string()));
    assert!(b.ps_names().unwrap().contains(&"web1".to_string()));
    // 30 ticks: vkload checks every page of its memory once every 2 s.
    let line = b.wait_tick("web1", seen + 30, Duration::from_secs(20));
    assert_eq!(line.get("pid").map(String::as_str), Some("2"));
    let ticks = b.ticks("web1");
    assert!(
        ticks.first().is_some_and(|&t| t > seen),
        "B's console must go on from A's ticks (last seen {seen}): {ticks:?}"
    );
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks must go on one by one: {ticks:?}"
    );

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["outcome"], "migrated");
    assert!(!r["rounds"].as_array().unwrap().is_empty());
    assert!(r["bytes_on_wire"].as_u64().unwrap() > 0);
    assert!(r["downtime_ms"].as_f64().unwrap() > 0.0);
}

/// vkload with a helper process made as UML makes its own (sharing a thread's TLS, and so
/// its errno), blocked in `poll`. The move hands that `poll` an EINTR (its restart state
/// stays behind); the helper must meet it before the rest of the vkernel runs, or it may read
/// the other thread's errno instead. UML's helpers did, and the guest panicked on arrival.
#[test]
fn a_helper_that_shares_a_threads_errno_moves_and_goes_on() {
    let lab = NetLab::new("mig-helper", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    a.run_vkload("web1", &["--mem", "8", "--helper"]);
    a.wait_tick("web1", 5, Duration::from_secs(20));
    let seen = a.last_tick("web1");
    let out = a.send("web1", b, &[]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The helper reads errno a millisecond after its poll failed: well within 10 ticks.
    b.wait_tick("web1", seen + 10, Duration::from_secs(20));
    let log = b.console_log("web1");
    assert!(!log.contains("FAIL"), "on B:\n{log}");
}

#[test]
fn a_certificate_of_another_ca_is_refused_and_the_vkernel_stays() {
    let lab = NetLab::new("mig-cert", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    a.run_vkload("web1", &["--mem", "8"]);
    a.wait_tick("web1", 3, Duration::from_secs(20));
    let foreign = lab.foreign_tls("a");
    let out = a.vkm(&[
        "send",
        "web1",
        &dest(b),
        "--tls-dir",
        foreign.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Cannot connect"), "{err}");
    a.still_ticking("web1", Duration::from_secs(20));
    assert!(b.ps_names().unwrap().is_empty());
}

#[test]
fn a_taken_name_is_refused_and_same_pids_live_side_by_side() {
    let lab = NetLab::new("mig-name", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    b.run_vkload("web1", &["--mem", "8"]);
    a.run_vkload("web1", &["--mem", "8"]);
    a.run_vkload("web2", &["--mem", "8"]);
    a.wait_tick("web1", 3, Duration::from_secs(20));
    let out = a.send("web1", b, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused") && err.contains("already exists"),
        "{err}"
    );
    a.still_ticking("web1", Duration::from_secs(20));

    // Another name goes through and runs next to B's own vkload, both at pid 2 inside.
    let out = a.send("web2", b, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.still_ticking("web1", Duration::from_secs(20));
    b.still_ticking("web2", Duration::from_secs(20));
    let pid = |name: &str| {
        tick_lines(&b.console_log(name))
            .last()
            .and_then(|l| l.get("pid").cloned())
    };
    assert_eq!(pid("web1").as_deref(), Some("2"));
    assert_eq!(pid("web2").as_deref(), Some("2"));
}

#[test]
fn a_receiver_killed_during_precopy_leaves_the_vkernel_running_here() {
    let lab = NetLab::new("mig-kill", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    a.run_vkload("web1", &["--mem", "64"]);
    a.wait_tick("web1", 3, Duration::from_secs(20));
    // Slow link: pre-copy of 64 MiB takes seconds.
    lab.limit("a", "40mbit");
    let mut send = a.cmd(
        common::vkmigrate_bin(),
        &[
            "--state-dir",
            a.state_dir.to_str().unwrap(),
            "send",
            "web1",
            &dest(b),
            "--tls-dir",
            a.tls_dir.to_str().unwrap(),
        ],
    );
    send.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = send.spawn().unwrap();
    // The receiving shim appears once the offer is accepted: kill it in the middle.
    let t0 = Instant::now();
    let shim = loop {
        if let Some(&pid) = b.receiving_shims().first() {
            break pid;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no receiving shim");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY-free: plain kill of a process this test's lab started.
    let _ = std::process::Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps running here"), "{err}");
    a.still_ticking("web1", Duration::from_secs(20));
    assert!(a.ps_names().unwrap().contains(&"web1".to_string()));
    assert!(!b.ps_names().unwrap().contains(&"web1".to_string()));
}

#[test]
fn a_vkernel_whose_processes_come_and_go_moves_too() {
    // A shell forks a new `sleep` every 50 ms: the process tree the destination built its
    // skeleton from is gone by the time the vkernel freezes, so the receiver rebuilds it.
    let lab = NetLab::new("mig-tree", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    let script = "i=0; while :; do i=$((i+1)); echo tick=$i; sleep 0.05; done";
    a.ok(&["run", "--name", "sh1", "--", "sh", "-c", script]);
    let count = |h: &Host| -> u64 {
        h.console_log("sh1")
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("tick=")?.parse().ok())
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    while count(a) < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the shell does not tick"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = count(a);
    // A slow pre-copy makes sure the tree changes in between.
    let r = send_slowly(a, "sh1", b, "1MB/s");
    assert_eq!(r["rebuilt"], true, "{r}");
    let t0 = Instant::now();
    while count(b) < seen + 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the shell does not go on on B:\n{}",
            b.console_log("sh1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ticks: Vec<u64> = b
        .console_log("sh1")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick=")?.parse().ok())
        .collect();
    assert!(ticks[0] > seen, "{ticks:?}");
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
}

/// A Python program with 4 MiB of random data that checks the data's CRC every tick and
/// starts a second ticking thread once the file named by its argument exists.
const LATE_THREAD: &str = r#"
import os, sys, threading, time, zlib
data = bytearray(os.urandom(4 << 20))
crc = zlib.crc32(data)
def worker():
    n = 0
    while True:
        n += 1
        print(f"thread={n}", flush=True)
        time.sleep(0.05)
started = False
i = 0
while True:
    i += 1
    if not started and os.path.exists(sys.argv[1]):
        threading.Thread(target=worker, daemon=True).start()
        started = True
    print(f"tick={i} ok={int(zlib.crc32(data) == crc)}", flush=True)
    time.sleep(0.05)
"#;

#[test]
fn a_thread_started_during_precopy_gets_a_new_skeleton_before_the_pause() {
    // The thread appears during round 0: the skeleton no longer fits. Its address space
    // (some 10 MiB at 2 MB/s) would overrun the pause, so the destination builds a new
    // skeleton while the program runs, the pages go again, and the final freeze fits it.
    let lab = NetLab::new("mig-late", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    let trigger = a.dir.join("start-thread");
    let py = common::python3();
    a.ok(&[
        "run",
        "--name",
        "py1",
        "--",
        &py,
        "-c",
        LATE_THREAD,
        trigger.to_str().unwrap(),
    ]);
    // The values of `key=N` on a host's console, in order.
    let values = |h: &Host, key: &str| -> Vec<u64> {
        h.console_log("py1")
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            })
            .collect()
    };
    let last = |h: &Host, key: &str| values(h, key).last().copied().unwrap_or(0);
    let t0 = Instant::now();
    while last(a, "tick") < 5 {
        assert!(t0.elapsed() < Duration::from_secs(20), "py1 does not tick");
        std::thread::sleep(Duration::from_millis(50));
    }
    let starter = {
        let trigger = trigger.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::write(&trigger, b"").unwrap();
        })
    };
    let r = send_slowly(a, "py1", b, "2MB/s");
    starter.join().unwrap();
    let rounds = r["rounds"].as_array().unwrap();
    assert!(
        rounds.iter().skip(1).any(|x| x["full"] == true),
        "no new skeleton during pre-copy: {r}"
    );
    assert_eq!(
        r["rebuilt"], false,
        "the skeleton was rebuilt in the pause: {r}"
    );
    // On B: both threads go on from where they were (the second one's count did not start
    // again at 1: it ran on A), the data is intact.
    let t0 = Instant::now();
    let (tick, thread) = loop {
        let first = |key| values(b, key).first().copied();
        if let (Some(t), Some(th)) = (first("tick"), first("thread")) {
            break (t, th);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "py1 does not go on on B"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        thread > 1,
        "the thread did not come from A:\n{}",
        b.console_log("py1")
    );
    while last(b, "tick") < tick + 20 || last(b, "thread") < thread + 20 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "py1 does not go on on B:\n{}",
            b.console_log("py1")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = b.console_log("py1");
    assert!(!log.contains("ok=0"), "the data changed:\n{log}");
}
