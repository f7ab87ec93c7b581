//! Host evacuation in the three-host lab: vkloads on hostA are placed on hostB and hostC by
//! their capacity and moved; a target that dies on the way loses its vkernels to the other;
//! a plan that cannot fit is refused before anything moves; `--at` waits and Ctrl-C cancels;
//! a drained host's `listen` refuses arrivals until `undrain`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use common::netlab::{Host, Listener, NetLab, LISTEN_PORT};
use common::COMMAND_TIMEOUT;

const MIB: u64 = 1 << 20;

/// The pause the tests' migrations may take: these tests are about where vkernels go, not
/// about downtime, and on a busy 2-core machine running debug builds a round can take
/// longer than a vkload needs to rewrite its memory, so pre-copy would not converge with a
/// tight target.
const TEST_MIGRATION: [&str; 4] = ["--downtime-ms", "1000", "--max-rounds", "4"];

/// Held by the tests that move several vkernels, one such test at a time: run side by side
/// on two cores they starve each other's pre-copy.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn dest(h: &Host) -> String {
    format!("{}:{LISTEN_PORT}", h.addr)
}

fn targets(hosts: &[&Host]) -> String {
    hosts.iter().map(|h| dest(h)).collect::<Vec<_>>().join(",")
}

/// `vkmigrate evacuate --to TARGETS` on `from` with its certificate, and `extra`.
fn evacuate_args(from: &Host, to: &[&Host], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "evacuate".into(),
        "--to".into(),
        targets(to),
        "--tls-dir".into(),
        from.tls_dir.to_str().unwrap().into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn evacuate(from: &Host, to: &[&Host], extra: &[&str]) -> Output {
    let args = evacuate_args(from, to, extra);
    from.vkm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn draining_marker(h: &Host) -> bool {
    h.state_dir.join(".draining").exists()
}

/// Start `loads` (name, vkload args) on `host` and wait until each ticks.
fn start_loads(host: &Host, loads: &[(&str, &[&str])]) {
    for (name, args) in loads {
        host.run_vkload(name, args);
    }
    for (name, _) in loads {
        host.wait_tick(name, 3, Duration::from_secs(30));
    }
}

/// Memory each vkernel on `from` needs, as a dry run against `to` (unlimited listeners
/// there) reports it.
fn sizes(from: &Host, to: &[&Host]) -> BTreeMap<String, u64> {
    let listeners: Vec<Listener> = to.iter().map(|h| h.spawn_listen()).collect();
    let plan = from.dir.join("sizes.json");
    let out = evacuate(from, to, &["--dry-run", "--report", plan.to_str().unwrap()]);
    assert!(out.status.success(), "dry run: {}", text(&out.stderr));
    drop(listeners);
    read_json(&plan)["vkernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["mem_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn max_memory(bytes: u64) -> [String; 2] {
    ["--max-memory".into(), bytes.to_string()]
}

fn listen_with_max(h: &Host, bytes: u64) -> Listener {
    let a = max_memory(bytes);
    h.spawn_listen_with(&[a[0].as_str(), a[1].as_str()])
}

/// The report's entry for vkernel `name`.
fn entry<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["vkernels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the report: {report}"))
}

#[test]
fn four_vkloads_are_placed_by_capacity_and_all_move_on() {
    let _heavy = heavy();
    let lab = NetLab::new("evac-four", &["a", "b", "c"]);
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let loads: [(&str, &[&str]); 4] = [
        (
            "v1",
            &[
                "--mem",
                "16",
                "--dirty-mbps",
                "4",
                "--children",
                "0",
                "--verify-s",
                "30",
            ],
        ),
        (
            "v2",
            &[
                "--mem",
                "12",
                "--dirty-mbps",
                "1",
                "--children",
                "0",
                "--verify-s",
                "30",
            ],
        ),
        ("v3", &["--mem", "8", "--children", "0", "--verify-s", "30"]),
        (
            "v4",
            &[
                "--mem",
                "6",
                "--dirty-mbps",
                "2",
                "--children",
                "0",
                "--verify-s",
                "30",
            ],
        ),
    ];
    start_loads(a, &loads);
    let sizes = sizes(a, &[b, c]);
    let mut by_size: Vec<(&String, &u64)> = sizes.iter().collect();
    by_size.sort_by(|x, y| y.1.cmp(x.1));
    // Room on each target for exactly the two largest: largest first, best fit fills B with
    // them and leaves the two smallest for C.
    let room = by_size[0].1 + by_size[1].1 + 2 * MIB;
    assert!(*by_size[3].1 > 2 * MIB);
    let _lb = listen_with_max(b, room);
    let _lc = listen_with_max(c, room);

    let seen: BTreeMap<&str, u64> = loads.iter().map(|l| (l.0, a.last_tick(l.0))).collect();
    let report_path = a.dir.join("evacuate.json");
    let out = evacuate(
        a,
        &[b, c],
        &[
            &[
                "--parallel",
                "2",
                "--max-bandwidth",
                "400MB/s",
                "--report",
                report_path.to_str().unwrap(),
            ][..],
            &TEST_MIGRATION,
        ]
        .concat(),
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "evacuate failed:\n{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("evacuated 4 vkernels"), "{stdout}");

    // None left on A; each on the target the plan chose, going on with its checks passing.
    assert!(a.ps_names().unwrap().is_empty(), "{:?}", a.ps_names());
    let on_b = sorted(b.ps_names().unwrap());
    let on_c = sorted(c.ps_names().unwrap());
    assert_eq!(
        on_b,
        sorted(vec![by_size[0].0.clone(), by_size[1].0.clone()])
    );
    assert_eq!(
        on_c,
        sorted(vec![by_size[2].0.clone(), by_size[3].0.clone()])
    );
    for (host, names) in [(b, &on_b), (c, &on_c)] {
        for name in names {
            let line = host.wait_tick(name, seen[name.as_str()] + 5, Duration::from_secs(30));
            assert_eq!(line.get("pid").map(String::as_str), Some("2"));
            host.still_ticking(name, Duration::from_secs(30));
        }
    }
    assert!(
        !draining_marker(a),
        "the draining marker outlived the evacuation"
    );

    let r = read_json(&report_path);
    assert_eq!(r["left_behind"], serde_json::json!([]));
    for (host, names) in [(b, &on_b), (c, &on_c)] {
        for name in names {
            let v = entry(&r, name);
            assert_eq!(v["outcome"], "migrated", "{v}");
            assert_eq!(v["target"], dest(host), "{v}");
            assert_eq!(v["planned_target"], dest(host), "{v}");
            assert!(v["total_ms"].as_f64().unwrap() > 0.0, "{v}");
            assert!(v["downtime_ms"].as_f64().unwrap() > 0.0, "{v}");
            assert_eq!(v["attempts"].as_array().unwrap().len(), 1, "{v}");
        }
    }
    // The fastest writers went first: the order of the "moving" lines is by sampled rate.
    let started: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("moving ")?.split_whitespace().next())
        .collect();
    let rate = |n: &str| entry(&r, n)["dirty_bytes_per_s"].as_f64().unwrap();
    assert_eq!(started.len(), 4, "{stdout}");
    assert!(
        started.windows(2).all(|w| rate(w[0]) >= rate(w[1])),
        "{started:?} is not by write rate: {r}"
    );
    assert!(
        rate("v1") > rate("v3"),
        "v1 writes 4 MiB/s, v3 next to nothing: {r}"
    );
}

#[test]
fn a_target_killed_during_the_evacuation_loses_its_vkernels_to_the_other() {
    let _heavy = heavy();
    let lab = NetLab::new("evac-kill", &["a", "b", "c"]);
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    // v1 is larger than the three others together and writes fastest: it goes first, to B;
    // the others fit only together on C. (Small: debug builds on a busy 2-core machine move
    // a few MB/s.)
    const SMALL: &[&str] = &[
        "--mem",
        "1",
        "--children",
        "0",
        "--without",
        "threads",
        "--ram-file-mib",
        "1",
    ];
    let loads: [(&str, &[&str]); 4] = [
        (
            "v1",
            &[
                "--mem",
                "24",
                "--dirty-mbps",
                "2",
                "--children",
                "0",
                "--without",
                "threads",
                "--verify-s",
                "30",
            ],
        ),
        ("v2", SMALL),
        ("v3", SMALL),
        ("v4", SMALL),
    ];
    start_loads(a, &loads);
    let sizes = sizes(a, &[b, c]);
    let small: u64 = ["v2", "v3", "v4"].iter().map(|n| sizes[*n]).sum();
    assert!(
        sizes["v1"] > small + 4 * MIB,
        "the test needs v1 larger than the rest: {sizes:?}"
    );
    let _lb = b.spawn_listen();
    let mut lc = listen_with_max(c, small + 2 * MIB);

    let report_path = a.dir.join("evacuate.json");
    let args = evacuate_args(
        a,
        &[b, c],
        &[
            &["--parallel", "1", "--report", report_path.to_str().unwrap()][..],
            &TEST_MIGRATION,
        ]
        .concat(),
    );
    let mut cmd = a.vkm_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = Child::new(cmd.spawn().unwrap());
    // C dies once the first vkernel has arrived on B, before the rest are all on C.
    let t0 = Instant::now();
    while !b.ps_names().unwrap().contains(&"v1".to_string()) {
        assert!(
            t0.elapsed() < COMMAND_TIMEOUT,
            "v1 never arrived on B; evacuate: {}",
            child.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    lc.kill();
    let out = child.wait(COMMAND_TIMEOUT * 2);
    assert!(
        out.status.success(),
        "evacuate failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    assert!(a.ps_names().unwrap().is_empty(), "{:?}", a.ps_names());
    let on_b = b.ps_names().unwrap();
    let on_c = c.ps_names().unwrap();
    let mut all: Vec<String> = on_b.iter().chain(&on_c).cloned().collect();
    all.sort();
    assert_eq!(all, ["v1", "v2", "v3", "v4"], "B {on_b:?}, C {on_c:?}");
    for n in &on_b {
        b.still_ticking(n, Duration::from_secs(30));
    }
    for n in &on_c {
        c.still_ticking(n, Duration::from_secs(30));
    }
    let r = read_json(&report_path);
    let rerouted: Vec<&String> = on_b
        .iter()
        .filter(|n| entry(&r, n)["planned_target"] == dest(c))
        .collect();
    assert!(
        !rerouted.is_empty(),
        "no vkernel planned for C went to B: B {on_b:?}, C {on_c:?}; {r}"
    );
    for n in &rerouted {
        let v = entry(&r, n);
        assert_eq!(v["outcome"], "migrated", "{v}");
        assert_eq!(v["target"], dest(b), "{v}");
    }
    assert_eq!(entry(&r, "v1")["target"], dest(b));
    assert!(!draining_marker(a));
}

#[test]
fn a_plan_that_cannot_fit_is_shown_by_dry_run_and_refused_before_anything_moves() {
    let lab = NetLab::new("evac-nofit", &["a", "b", "c"]);
    let (a, b, c) = (lab.host("a"), lab.host("b"), lab.host("c"));
    let loads: [(&str, &[&str]); 2] = [
        (
            "big",
            &["--mem", "48", "--children", "0", "--verify-s", "30"],
        ),
        (
            "small",
            &["--mem", "2", "--children", "0", "--threads", "1"],
        ),
    ];
    start_loads(a, &loads);
    let sizes = sizes(a, &[b, c]);
    assert!(sizes["big"] > sizes["small"] + 4 * MIB, "{sizes:?}");
    // Each target has room for the small one only.
    let room = sizes["small"] + MIB;
    let _lb = listen_with_max(b, room);
    let _lc = listen_with_max(c, room);

    let plan_path = a.dir.join("plan.json");
    let out = evacuate(
        a,
        &[b, c],
        &["--dry-run", "--report", plan_path.to_str().unwrap()],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("cannot place big"), "{stdout}");
    assert!(stdout.contains("MiB left"), "{stdout}");
    assert!(stdout.contains("small ("), "{stdout}");
    assert!(
        stderr.contains("does not fit") && stderr.contains("big"),
        "{stderr}"
    );
    let plan = read_json(&plan_path);
    assert_eq!(plan["dry_run"], true);
    assert_eq!(entry(&plan, "big")["outcome"], "cannot be placed");
    assert_eq!(entry(&plan, "small")["outcome"], "planned");

    let report_path = a.dir.join("evacuate.json");
    let out = evacuate(a, &[b, c], &["--report", report_path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("no place for big") && stderr.contains("nothing was moved"),
        "{stderr}"
    );
    // Nothing moved: both run on A as before, the targets have nothing, A is not drained.
    assert_eq!(sorted(a.ps_names().unwrap()), ["big", "small"]);
    a.still_ticking("big", Duration::from_secs(30));
    a.still_ticking("small", Duration::from_secs(30));
    assert!(b.ps_names().unwrap().is_empty());
    assert!(c.ps_names().unwrap().is_empty());
    assert!(!draining_marker(a));
    let r = read_json(&report_path);
    assert_eq!(
        sorted(
            r["left_behind"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        ),
        ["big", "small"]
    );
}

#[test]
fn at_waits_and_ctrl_c_before_then_cancels_cleanly() {
    let lab = NetLab::new("evac-at", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _lb = b.spawn_listen();
    start_loads(a, &[("v1", &["--mem", "2", "--children", "0"])]);
    let at = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(600));
    let args = evacuate_args(a, &[b], &["--at", &at.to_string()]);
    let mut cmd = a.vkm_command(&args.iter().map(String::as_str).collect::<Vec<_>>());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = Child::new(cmd.spawn().unwrap());
    let first = child.first_line(Duration::from_secs(30));
    assert!(first.starts_with("waiting until "), "{first}");
    assert!(first.contains(&at.to_string()), "{first}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait(Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Cancelled") && stderr.contains("nothing"),
        "{stderr}"
    );
    assert_eq!(a.ps_names().unwrap(), ["v1"]);
    a.still_ticking("v1", Duration::from_secs(30));
    assert!(b.ps_names().unwrap().is_empty());
    assert!(!draining_marker(a));
}

#[test]
fn a_drained_host_refuses_arrivals_until_undrain() {
    let lab = NetLab::new("evac-drain", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _la = a.spawn_listen();
    start_loads(b, &[("w", &["--mem", "2", "--children", "0"])]);
    // Nothing runs on A: the evacuation only drains it, and it stays so.
    let out = evacuate(a, &[b], &["--stay-drained"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("stays drained"),
        "{}",
        text(&out.stdout)
    );
    assert!(draining_marker(a));

    let send = |from: &Host, to: &Host| {
        from.vkm(&[
            "send",
            "w",
            &dest(to),
            "--tls-dir",
            from.tls_dir.to_str().unwrap(),
        ])
    };
    let out = send(b, a);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("refused") && stderr.contains("drained") && stderr.contains("undrain"),
        "{stderr}"
    );
    b.still_ticking("w", Duration::from_secs(30));

    assert!(a.ok(&["undrain"]).contains("accepts vkernels again"));
    assert!(!draining_marker(a));
    let out = send(b, a);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(a.ps_names().unwrap(), ["w"]);
    a.still_ticking("w", Duration::from_secs(30));
}

/// A vkmigrate process the test watches: its stdout lines as they come, its stderr drained;
/// killed on Drop if it still runs.
struct Child {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Child {
    fn new(mut child: std::process::Child) -> Child {
        let (tx, lines) = mpsc::channel();
        let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (so, se) = (stdout.clone(), stderr.clone());
        let threads = vec![
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    so.lock().unwrap().push_str(&format!("{l}\n"));
                    let _ = tx.send(l);
                }
            }),
            std::thread::spawn(move || {
                for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                    se.lock().unwrap().push_str(&format!("{l}\n"));
                }
            }),
        ];
        Child {
            child,
            lines,
            stdout,
            stderr,
            threads,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn first_line(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("no output ({e}); stderr: {}", self.stderr_so_far()))
    }

    fn stderr_so_far(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait for it to end (a hang fails the test); its output.
    fn wait(mut self, timeout: Duration) -> Output {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < timeout,
                "still running after {timeout:?}; stderr: {}",
                self.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        Output {
            status,
            stdout: self.stdout.lock().unwrap().clone().into_bytes(),
            stderr: self.stderr.lock().unwrap().clone().into_bytes(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
