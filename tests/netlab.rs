//! The network-namespace lab itself: hosts reach each other and the client, vkernels run per
//! host, links can be shaped and cut, parallel labs stay apart, and nothing is left behind.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netlab::{must, output_within, NetLab, CLIENT_ADDR};

fn pings(mut cmd: Command) -> bool {
    output_within(&mut cmd, Duration::from_secs(10))
        .expect("ping runs")
        .status
        .success()
}

fn ping_from(lab: &NetLab, host: &str, to: impl ToString) -> bool {
    pings(lab.host(host).cmd("ping", &["-c1", "-W1", &to.to_string()]))
}

/// Retries for up to 10 s: a link that just came up may take a moment.
fn ping_soon(lab: &NetLab, host: &str, to: impl ToString + Copy) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if ping_from(lab, host, to) {
            return true;
        }
    }
    false
}

fn netns_list() -> Vec<String> {
    must(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

fn assert_gone(namespaces: &[String]) {
    let left = netns_list();
    for ns in namespaces {
        assert!(!left.contains(ns), "{ns} is still there: {left:?}");
    }
}

#[test]
fn hosts_talk_run_vkernels_and_links_can_be_shaped_and_cut() {
    let lab = NetLab::new("basic", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    assert_eq!(
        (a.addr.octets(), b.addr.octets()),
        ([198, 18, 0, 1], [198, 18, 0, 2])
    );
    assert!(ping_from(&lab, "a", b.addr), "a cannot reach b");
    assert!(
        ping_from(&lab, "a", CLIENT_ADDR),
        "a cannot reach the client"
    );
    assert!(
        ping_from(&lab, "b", CLIENT_ADDR),
        "b cannot reach the client"
    );
    assert!(pings(
        lab.client_cmd("ping", &["-c1", "-W1", &a.addr.to_string()])
    ));

    // Certificates: the fleet's for every host, and a foreign one on request.
    vkm_transport::TlsDir::load(&a.tls_dir).expect("a's TLS dir");
    let foreign = lab.foreign_tls("a");
    vkm_transport::TlsDir::load(&foreign).expect("a's foreign TLS dir");
    let ca = |d: &std::path::Path| std::fs::read(d.join("ca.pem")).expect("ca.pem");
    assert_eq!(ca(&a.tls_dir), ca(&b.tls_dir), "one fleet CA");
    assert_ne!(
        ca(&a.tls_dir),
        ca(&foreign),
        "the foreign CA is another one"
    );

    // A vkernel on a is a's alone.
    a.run_vkload("t1", &["--mem", "16"]);
    a.wait_tick("t1", 3, Duration::from_secs(30));
    assert_eq!(a.ps_names().expect("ps on a"), ["t1"]);
    assert!(b.ps_names().expect("ps on b").is_empty());
    let rows: serde_json::Value =
        serde_json::from_str(&a.ok(&["ps", "--json"])).expect("ps --json");
    let init = rows[0]["init_pid"].as_i64().expect("init_pid");

    lab.limit("a", "10mbit");
    let qdisc = must(&mut a.cmd("tc", &["qdisc", "show", "dev", "eth0"]));
    assert!(qdisc.contains("tbf") && qdisc.contains("10Mbit"), "{qdisc}");
    assert!(
        ping_from(&lab, "a", b.addr),
        "a shaped link still carries pings"
    );

    lab.cut("a");
    assert!(!ping_from(&lab, "a", b.addr), "a reaches b over a cut link");
    assert!(!ping_from(&lab, "b", a.addr), "b reaches a over a cut link");
    lab.restore_link("a");
    assert!(
        ping_soon(&lab, "a", b.addr),
        "a cannot reach b after restore"
    );
    assert!(
        ping_soon(&lab, "b", a.addr),
        "b cannot reach a after restore"
    );

    let (namespaces, dir) = (lab.namespaces().to_vec(), lab.dir.path().to_path_buf());
    assert_eq!(namespaces.len(), 3);
    let listed = netns_list();
    assert!(namespaces.iter().all(|n| listed.contains(n)), "{listed:?}");
    drop(lab);
    assert_gone(&namespaces);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !std::path::Path::new(&format!("/proc/{init}")).exists(),
        "the vkernel's init {init} outlived the lab"
    );
}

#[test]
fn parallel_labs_do_not_collide_and_clean_up_on_panic() {
    // Same test name, built at the same moment in two threads.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let labs: Vec<NetLab> = (0..2)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                NetLab::new("par", &["a", "b"])
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("lab built"))
        .collect();
    let all: Vec<String> = labs.iter().flat_map(|l| l.namespaces().to_vec()).collect();
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "{all:?}");

    // Same addresses, separate networks: cutting one lab's host leaves the other alone.
    labs[0].cut("a");
    assert!(!ping_from(&labs[0], "a", labs[0].host("b").addr));
    assert!(ping_from(&labs[1], "a", labs[1].host("b").addr));
    drop(labs);
    assert_gone(&all);

    // A failing test still removes its lab.
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        let lab = NetLab::new("panics", &["a"]);
        tx.send(lab.namespaces().to_vec()).expect("send");
        panic!("the test fails (on purpose)");
    })
    .join();
    assert!(failed.is_err());
    let namespaces = rx.recv().expect("namespaces");
    assert_eq!(namespaces.len(), 2);
    assert_gone(&namespaces);
}

#[test]
fn daemons_are_ready_on_their_first_line_and_killed_on_drop() {
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    };
    let lab = NetLab::new("daemons", &["a"]);
    let a = lab.host("a");
    let script = "echo oops >&2; echo 'listening on 198.18.0.1:4433'; exec sleep 600";
    let start = |tag| a.spawn_ready(tag, a.cmd("sh", &["-c", script]), "listening on ");

    let term = start("term");
    let pid = term.pid();
    assert!(alive(pid));
    drop(term);
    assert!(!alive(pid), "SIGTERM on drop");

    let mut killed = start("killed");
    killed.kill();
    assert!(!alive(killed.pid()));
    assert!(killed
        .stdout()
        .starts_with("listening on 198.18.0.1:4433\n"));
    assert_eq!(killed.stderr(), "oops\n");

    let mut orphan = start("orphan");
    drop(lab);
    let t0 = Instant::now();
    while orphan.exited().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the lab left its listener"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
