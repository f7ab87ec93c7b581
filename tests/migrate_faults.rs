//! Live migration when the destination fails at each step of the commit protocol (injected
//! with `VKMIGRATE_FAULT` in the environment of the destination's `listen`, see
//! `src/fault.rs`), and when the vkernel dirties memory faster than the link carries it.
//! Whatever happens, exactly one copy of the vkernel runs afterwards, and it passes its checks.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::netlab::{Host, Listener, NetLab, LISTEN_PORT};

const TICKS: Duration = Duration::from_secs(20);

/// `listen` on `host` with `VKMIGRATE_FAULT=fault`, which its receiving shims inherit.
fn listen_with_fault(host: &Host, fault: &str) -> Listener {
    let addr = SocketAddrV4::new(host.addr, LISTEN_PORT).to_string();
    let tls = host.tls_dir.to_str().unwrap();
    let mut cmd = host.vkm_command(&["listen", "--addr", &addr, "--tls-dir", tls]);
    cmd.env("VKMIGRATE_FAULT", fault);
    host.spawn_ready("listen", cmd, "listening on ")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn report(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The init pids of the vkernels `ps` lists on `host`.
fn init_pids(host: &Host) -> Vec<i32> {
    let out = host.vkm(&["ps", "--json"]);
    assert!(out.status.success(), "ps failed: {}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| r["init_pid"].as_i64().unwrap() as i32)
        .collect()
}

/// Processes of this lab (told apart by the `VKLOAD_DIR` of a lab host in their environment)
/// that live in a PID namespace other than ours and not in `known`: (pid, command line).
fn lab_processes_elsewhere(
    lab: &NetLab,
    known: &[Option<std::path::PathBuf>],
) -> Vec<(i32, String)> {
    let pidns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let ours = pidns("self");
    let marks: Vec<Vec<u8>> = lab
        .hosts
        .iter()
        .map(|h| format!("VKLOAD_DIR={}", h.dir.display()).into_bytes())
        .collect();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.parse::<u32>().is_ok()) else {
            continue;
        };
        // Unreadable: gone meanwhile, or a zombie.
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env
            .split(|&b| b == 0)
            .any(|v| marks.iter().any(|m| v == &m[..]))
        {
            continue;
        }
        let ns = pidns(pid);
        if ns.is_some() && ns != ours && !known.contains(&ns) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if let Ok(pid) = pid.parse() {
                found.push((pid, cmd.trim_end().to_owned()));
            }
        }
    }
    found
}

/// Processes of this lab that live in a PID namespace of their own which is not that of a
/// vkernel `ps` lists on some host: what a failed migration could leave behind (skeletons, or
/// a second copy).
fn strays(lab: &NetLab) -> Vec<String> {
    let pidns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let mut known = Vec::new();
    for h in &lab.hosts {
        known.extend(init_pids(h).iter().map(|p| pidns(&p.to_string())));
    }
    lab_processes_elsewhere(lab, &known)
        .into_iter()
        .map(|(pid, cmd)| format!("{pid} {cmd}"))
        .collect()
}

/// Kills, when dropped (after a failed assertion too), every process of the lab outside our
/// PID namespace: a copy of a vkernel whose shim died outlives the lab otherwise. Declare it
/// after the lab, so that it runs first.
struct KillLeftovers<'a>(&'a NetLab);

impl Drop for KillLeftovers<'_> {
    fn drop(&mut self) {
        for (pid, _) in lab_processes_elsewhere(self.0, &[]) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The receiver dies at `fault`, before `go`: the migration fails, the vkernel goes on here
/// and nothing of it is left on the destination.
fn receiver_dies(tag: &str, fault: &str) {
    let lab = NetLab::new(tag, &["a", "b"]);
    let _leftovers = KillLeftovers(&lab);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let mut listener = listen_with_fault(b, fault);
    a.run_vkload("web1", &["--mem", "8"]);
    a.wait_tick("web1", 3, TICKS);
    let report_path = a.dir.join("report.json");
    let out = a.send("web1", b, &["--report", report_path.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "send succeeded: {err}");
    assert!(err.contains("keeps running here"), "{err}");
    let r = report(&report_path);
    assert_eq!(r["outcome"], "failed; the vkernel runs on here", "{r}");

    // It runs on here, thawed, and its checks pass across the freeze.
    a.still_ticking("web1", TICKS);
    assert_eq!(a.ps_names().unwrap(), ["web1"]);
    assert!(b.ps_names().unwrap().is_empty());
    assert_eq!(b.receiving_shims(), Vec::<u32>::new());
    assert_eq!(strays(&lab), Vec::<String>::new());
    // B's daemon outlives the shim it started.
    assert!(listener.exited().is_none(), "{}", listener.stderr());
}

#[test]
fn a_receiver_that_dies_after_the_final_state_leaves_the_vkernel_running_here() {
    receiver_dies("flt-final", "receiver-dies-after-final");
}

#[test]
fn a_receiver_that_dies_before_ready_leaves_the_vkernel_running_here() {
    receiver_dies("flt-ready", "receiver-dies-before-ready");
}

#[test]
fn a_link_lost_after_go_is_settled_by_asking_the_destination() {
    let lab = NetLab::new("flt-go", &["a", "b"]);
    let _leftovers = KillLeftovers(&lab);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = listen_with_fault(b, "receiver-silent-after-go");
    a.run_vkload("web1", &["--mem", "8"]);
    a.wait_tick("web1", 3, TICKS);
    let seen = a.last_tick("web1");
    let report_path = a.dir.join("report.json");
    let out = a.send("web1", b, &["--report", report_path.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(out.status.success(), "send failed: {err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("migrated web1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // It did not hear `running`: it asked B's daemon, which knows this migration's vkernel.
    assert!(err.contains("was lost after go"), "{err}");
    let r = report(&report_path);
    assert_eq!(
        r["outcome"], "migrated (confirmed after the link was lost)",
        "{r}"
    );

    // Exactly one copy: on B, going on from where it was on A.
    assert!(a.ps_names().unwrap().is_empty());
    assert_eq!(b.ps_names().unwrap(), ["web1"]);
    b.still_ticking("web1", TICKS);
    let ticks = b.ticks("web1");
    assert!(
        ticks.first().is_some_and(|&t| t > seen),
        "B's console must go on from A's ticks (last seen {seen}): {ticks:?}"
    );
    assert_eq!(strays(&lab), Vec::<String>::new());
}

/// Directories of throttle cgroups for vkernel `name` anywhere under /sys/fs/cgroup.
fn throttle_cgroups(name: &str) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: u32, found: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(prefix) {
                found.push(path.display().to_string());
            }
            if depth > 0 {
                walk(&path, prefix, depth - 1, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!("vkm-throttle-{name}-"),
        6,
        &mut found,
    );
    found
}

#[test]
fn a_vkernel_that_dirties_memory_faster_than_the_link_is_throttled_and_moves() {
    // A vkernel name of its own: its throttle cgroup is looked for by that name.
    let name = "hot-dirtier";
    let lab = NetLab::new("flt-throttle", &["a", "b"]);
    let _leftovers = KillLeftovers(&lab);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    // Rewrites its 8 MiB region about four times a second; A's link carries 5 MB/s, so
    // every pre-copy round finds most of the region written again.
    a.run_vkload(name, &["--mem", "8", "--dirty-mbps", "32"]);
    a.wait_tick(name, 3, TICKS);
    lab.limit("a", "40mbit");
    let seen = a.last_tick(name);
    let report_path = a.dir.join("report.json");
    let out = a.send(name, b, &["--report", report_path.to_str().unwrap()]);
    assert!(out.status.success(), "send failed: {}", stderr(&out));
    let r = report(&report_path);
    assert_eq!(r["outcome"], "migrated", "{r}");
    let percent = r["throttle_percent"].as_f64().unwrap();
    assert!(percent < 100.0, "the vkernel was not throttled: {r}");

    // On B it goes on, and not throttled: the throttle's cgroup is gone with the migration.
    assert!(a.ps_names().unwrap().is_empty());
    assert_eq!(b.ps_names().unwrap(), [name]);
    b.still_ticking(name, TICKS);
    assert!(b.last_tick(name) > seen);
    assert_eq!(throttle_cgroups(name), Vec::<String>::new());
    assert_eq!(strays(&lab), Vec::<String>::new());
}

/// The value a shell vkernel last wrote to `path` (0 before the first).
fn count_in(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_receiver_that_dies_after_go_leaves_exactly_one_copy_running_there() {
    let lab = NetLab::new("flt-gone", &["a", "b"]);
    let _leftovers = KillLeftovers(&lab);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = listen_with_fault(b, "receiver-dies-after-go");
    // Not vkload: it ends when its console hangs up, which a shim's death does; a vkernel that
    // ignores that shows whether a copy runs.
    let counter = a.dir.join("count");
    let script = format!(
        "trap '' HUP; i=0; while :; do i=$((i+1)); echo $i > {}; sleep 0.1; done",
        counter.display()
    );
    a.ok(&["run", "--name", "sh1", "--", "sh", "-c", &script]);
    let wait_count = |above: u64| {
        let t0 = std::time::Instant::now();
        while count_in(&counter) <= above {
            assert!(t0.elapsed() < TICKS, "the counter stays at {above}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_count(3);
    let report_path = a.dir.join("report.json");
    let out = a.send("sh1", b, &["--report", report_path.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(out.status.success(), "send failed: {err}");
    let r = report(&report_path);
    assert_eq!(
        r["outcome"], "migrated (confirmed after the link was lost)",
        "{r}"
    );

    // A's copy is gone; B's runs on without its shim (nothing lists it), in one namespace.
    assert!(a.ps_names().unwrap().is_empty());
    let copies = strays(&lab);
    let namespaces: std::collections::BTreeSet<_> = copies
        .iter()
        .filter_map(|l| l.split(' ').next())
        .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok())
        .collect();
    assert_eq!(namespaces.len(), 1, "copies: {copies:?}");
    wait_count(count_in(&counter) + 5);

    // It has no shim to end it: `_leftovers` does, by pid.
}

#[test]
fn a_vkernel_that_ends_during_precopy_fails_the_migration_and_leaves_nothing_there() {
    let lab = NetLab::new("flt-ends", &["a", "b"]);
    let _leftovers = KillLeftovers(&lab);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    a.run_vkload("web1", &["--mem", "64"]);
    a.wait_tick("web1", 3, TICKS);
    // Slow link: pre-copy of 64 MiB takes seconds.
    lab.limit("a", "40mbit");
    let dest = SocketAddrV4::new(b.addr, LISTEN_PORT).to_string();
    let tls = a.tls_dir.to_str().unwrap().to_owned();
    let mut send = a.vkm_command(&["send", "web1", &dest, "--tls-dir", &tls]);
    send.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = send.spawn().unwrap();
    // Once pre-copy runs (the destination started its shim), the vkernel ends.
    let t0 = std::time::Instant::now();
    while b.receiving_shims().is_empty() {
        assert!(t0.elapsed() < TICKS, "no receiving shim");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    a.ok(&["kill", "web1"]);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "send succeeded: {err}");
    assert!(
        err.contains("Cannot migrate vkernel web1")
            && err.contains("the vkernel ended here during the migration"),
        "{err}"
    );

    // Gone from A as asked, and nothing of it on B: no vkernel, no shim, no sandbox.
    let t0 = std::time::Instant::now();
    while !a.ps_names().unwrap().is_empty() || !b.receiving_shims().is_empty() {
        assert!(
            t0.elapsed() < TICKS,
            "A: {:?}, shims on B: {:?}",
            a.ps_names(),
            b.receiving_shims()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.ps_names().unwrap().is_empty());
    assert_eq!(strays(&lab), Vec::<String>::new());
}
