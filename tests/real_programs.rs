//! End-to-end: programs nobody here wrote go through checkpoint and restore and carry on:
//! Debian's stress-ng with `--verify` on several stressors, a python3 process holding state in
//! memory, and sleep.

mod common;

use std::time::{Duration, Instant};

use common::{ConsoleTail, Lab};

/// Checkpoint `name` (the vkernel stops), then restore it under the same name.
fn checkpoint_and_restore(lab: &mut Lab, name: &str) {
    let img = lab.path(&format!("{name}.vkimg"));
    lab.ok(&["checkpoint", name, "-o", img.to_str().expect("utf-8")]);
    lab.forget(name);
    lab.restore(&img, name);
}

/// Wait until the vkernel has ended (its shim removes it from `ps`).
fn wait_ended(lab: &Lab, name: &str, timeout: Duration) {
    let t0 = Instant::now();
    while lab.state_dir().join(name).exists() {
        assert!(
            t0.elapsed() < timeout,
            "{name} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stress(stressor: &[&str]) {
    let name = format!("sng-{}", stressor[0].trim_start_matches("--"));
    let mut lab = Lab::new();
    let log = lab.path("stress-ng.log");
    let log_s = log.to_str().expect("utf-8").to_string();
    let mut cmd = vec!["stress-ng"];
    cmd.extend_from_slice(stressor);
    cmd.extend_from_slice(&["--verify", "-t", "6", "--log-file", &log_s]);
    lab.run(&name, &cmd);
    std::thread::sleep(Duration::from_secs(2));
    checkpoint_and_restore(&mut lab, &name);
    wait_ended(&lab, &name, Duration::from_secs(60));
    lab.forget(&name);
    let out = std::fs::read_to_string(&log).expect("stress-ng log");
    assert!(
        out.contains("successful run completed"),
        "stress-ng {stressor:?} did not succeed after restore:\n{out}"
    );
    for bad in ["fail", "error", "unsuccessful"] {
        assert!(
            !out.to_lowercase().contains(bad),
            "stress-ng {stressor:?} reported {bad}:\n{out}"
        );
    }
}

#[test]
fn stress_ng_vm() {
    stress(&["--vm", "1", "--vm-bytes", "32M"]);
}

#[test]
fn stress_ng_mmap() {
    stress(&["--mmap", "1", "--mmap-bytes", "16M"]);
}

#[test]
fn stress_ng_memfd() {
    stress(&["--memfd", "1", "--memfd-bytes", "16M"]);
}

#[test]
fn stress_ng_pipe() {
    stress(&["--pipe", "1"]);
}

#[test]
fn stress_ng_timer() {
    stress(&["--timer", "1"]);
}

#[test]
fn stress_ng_sigq() {
    stress(&["--sigq", "1"]);
}

#[test]
fn stress_ng_futex() {
    stress(&["--futex", "1"]);
}

#[test]
fn stress_ng_clone() {
    stress(&["--clone", "1"]);
}

/// A python3 interpreter with a large dict: the counter it prints goes on, and its check of
/// the dict's contents keeps passing.
#[test]
fn python_keeps_its_memory() {
    let mut lab = Lab::new();
    let script = r#"
import time
d = {i: i * i for i in range(200000)}
n = 0
while True:
    n += 1
    ok = all(d[i] == i * i for i in range(0, 200000, 101))
    print('py', n, 'ok' if ok else 'FAIL', flush=True)
    time.sleep(0.1)
"#;
    lab.run("py", &["python3", "-c", script]);
    wait_for(&lab, "py", |l| count(l) >= 5);
    let tail = ConsoleTail::start(&lab, "py");
    checkpoint_and_restore(&mut lab, "py");
    let before = count(&tail.finish());
    let log = wait_for(&lab, "py", |l| count(l) >= before + 10);
    assert!(
        !log.contains("FAIL"),
        "python's dict check failed after restore:\n{log}"
    );
    let first = log
        .lines()
        .filter_map(|l| l.strip_prefix("py "))
        .next()
        .expect("a line");
    let first: u64 = first
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count");
    assert!(
        first > before && first <= before + 2,
        "counter restarted: {before} then {first}"
    );
}

/// `sleep` restored in the middle of its sleep still ends by itself, with success.
#[test]
fn sleep_finishes_after_restore() {
    let mut lab = Lab::new();
    let mark = lab.path("slept");
    let script = format!("sleep 2 && touch {}", mark.display());
    lab.run("sl", &["sh", "-c", &script]);
    std::thread::sleep(Duration::from_millis(700));
    checkpoint_and_restore(&mut lab, "sl");
    wait_ended(&lab, "sl", Duration::from_secs(20));
    lab.forget("sl");
    assert!(
        mark.exists(),
        "sleep did not complete successfully after restore"
    );
}

fn count(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix("py "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_for(lab: &Lab, name: &str, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let log = lab.console_log(name);
        if pred(&log) {
            return log;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{name}: condition not met; console:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
