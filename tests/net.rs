//! A vkernel's network follows it (issue 4): its tap, the tap's addresses and its bridge port
//! are recreated where it moves or is restored, the LAN learns the guest's new port at once,
//! and a destination that cannot wire the vkernel refuses it before anything moves.
//!
//! The guest is vkload in `--net` mode: it answers ARP and ICMP echo for its address on its
//! tap. The client pings it from the lab's `lan` namespace.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::netlab::{output_within, Host, NetLab, BRIDGE};
use common::{field_u64, last_tick_line, vkload_bin, COMMAND_TIMEOUT};

/// The guest's address on the lab's LAN, and its MAC.
const GUEST_IP: &str = "198.18.0.200";
const GUEST_MAC: &str = "02:00:00:00:02:00";
/// An address of the tap's host side (its own subnet, so it clashes with nothing).
const TAP_ADDR: &str = "198.18.9.1/24";

/// `vkmigrate run` of a networked vkload on `host`: `taps` are the `--tap`/`--tap-addr`/...
/// options, `net` vkload's `--net` value.
fn run_guest(host: &Host, name: &str, taps: &[&str], net: &str) -> std::process::Output {
    let bin = vkload_bin();
    let mut args = vec!["run", "--name", name];
    args.extend_from_slice(taps);
    args.extend(["--", bin.to_str().unwrap(), "--mem", "8", "--net", net]);
    host.vkm(&args)
}

fn guest_net() -> String {
    format!("tap0,{GUEST_IP}/24,{GUEST_MAC}")
}

/// Pings from the client that must all be answered.
fn client_pings(lab: &NetLab, count: u32) {
    let out = output_within(
        &mut lab.client_cmd(
            "ping",
            &["-c", &count.to_string(), "-i", "0.2", "-W", "2", GUEST_IP],
        ),
        COMMAND_TIMEOUT,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "the guest does not answer the client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The port (lan-side veth) the lan bridge's FDB has the guest's MAC on.
fn lan_port_of_guest(lab: &NetLab) -> Option<String> {
    let out = output_within(
        Command::new("bridge").args(["-n", &lab.lan, "fdb", "show", "br", BRIDGE]),
        COMMAND_TIMEOUT,
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(GUEST_MAC))
        .and_then(|l| {
            let mut w = l.split_whitespace();
            w.find(|&t| t == "dev").and(w.next()).map(str::to_owned)
        })
}

/// `ip -o link show dev tap0` fields on a host: (MAC, master).
fn tap_link(host: &Host) -> (String, String) {
    let line = host.ip("-o link show dev tap0");
    let word_after = |key: &str| {
        let mut w = line.split_whitespace();
        w.find(|&t| t == key)
            .and(w.next())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    (word_after("link/ether"), word_after("master"))
}

fn net_rx(host: &Host, name: &str) -> u64 {
    last_tick_line(&host.console_log(name))
        .map(|l| field_u64(&l, "net_rx"))
        .unwrap_or(0)
}

#[test]
fn the_guest_stays_reachable_at_its_address_through_a_move() {
    let lab = NetLab::bridged("net-move", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let listener = b.spawn_listen();
    let taps = ["--tap", "tap0@br0", "--tap-addr", TAP_ADDR];
    let out = run_guest(a, "g1", &taps, &guest_net());
    assert!(
        out.status.success(),
        "run --tap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_tick("g1", 3, Duration::from_secs(20));
    client_pings(&lab, 3);
    let (mac_a, master_a) = tap_link(a);
    assert_eq!(master_a, BRIDGE);

    // The client pings every 10 ms through the whole move.
    let mut ping = lab
        .client_cmd("ping", &["-c", "700", "-i", "0.01", "-W", "1", GUEST_IP])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = a.send("g1", b, &[]);
    let ping_out = output_of(&mut ping);
    assert!(
        out.status.success(),
        "send failed: {}\nthe listener's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        listener.stderr()
    );

    // The tap left A with the vkernel and is on B as it was: MAC, bridge, address, up.
    assert!(!a.has_link("tap0"), "tap0 is still on A");
    let (mac_b, master_b) = tap_link(b);
    assert_eq!(mac_b, mac_a, "the tap's MAC changed");
    assert_eq!(master_b, BRIDGE);
    let addrs = b.ip("-o addr show dev tap0");
    assert!(
        addrs.contains(TAP_ADDR),
        "tap0 on B lacks {TAP_ADDR}: {addrs}"
    );
    assert!(
        b.ip("-o link show dev tap0").contains(",UP"),
        "tap0 is down"
    );

    // The LAN learnt the guest's new port from the announcement, and the guest answers.
    assert_eq!(lan_port_of_guest(&lab).as_deref(), Some("vh1"));
    let (sent, received) = ping_summary(&ping_out);
    assert!(sent > 300, "ping ran too short: {ping_out}");
    let lost = sent - received;
    eprintln!("pings lost during the move: {lost} of {sent} (10 ms apart)");
    // Without the announcement the LAN would keep sending to A until the bridge's FDB ages
    // out (300 s): every ping after the move would be lost.
    assert!(
        lost < sent / 3,
        "{lost} of {sent} pings lost: the LAN did not learn the move\n{ping_out}"
    );
    let rx = net_rx(b, "g1");
    client_pings(&lab, 3);
    let t0 = std::time::Instant::now();
    while net_rx(b, "g1") <= rx && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        net_rx(b, "g1") > rx,
        "the guest's counters on B do not show the client's pings"
    );
}

#[test]
fn a_destination_that_cannot_wire_the_vkernel_refuses_it_and_an_owned_bridge_moves() {
    let lab = NetLab::bridged("net-refuse", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();

    // B already has a device of that name.
    b.ip("tuntap add dev tap0 mode tap");
    let out = run_guest(a, "g1", &["--tap", "tap0@br0"], &guest_net());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_tick("g1", 2, Duration::from_secs(20));
    let out = a.send("g1", b, &[]);
    assert!(
        !out.status.success(),
        "send to a host with tap0 taken succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused") && err.contains("tap0"), "{err}");
    let t = last_tick_line(&a.console_log("g1")).map(|l| field_u64(&l, "tick"));
    a.wait_tick("g1", t.unwrap_or(0) + 3, Duration::from_secs(20));
    assert!(a.has_link("tap0"), "A lost its tap on a refused move");
    assert!(b.ps_names().unwrap().is_empty());

    // A bridge that B does not have, and that is not the vkernel's: refused, naming it.
    a.ip("link add brx type bridge");
    let out = run_guest(
        a,
        "g2",
        &["--tap", "tap2@brx"],
        "tap2,198.18.0.201/24,02:00:00:00:02:01",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_tick("g2", 2, Duration::from_secs(20));
    let err = String::from_utf8_lossy(&a.send("g2", b, &[]).stderr).into_owned();
    assert!(err.contains("refused") && err.contains("brx"), "{err}");
    assert!(a.ps_names().unwrap().contains(&"g2".to_string()));

    // A bridge the vkernel owns is created on B and leaves A with it.
    let out = run_guest(
        a,
        "g3",
        &[
            "--tap",
            "tap3@bry",
            "--bridge-create",
            "--tap-addr",
            "198.18.10.1/24",
        ],
        "tap3,198.18.10.2/24,02:00:00:00:02:02",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a.has_link("bry"), "run --bridge-create made no bridge");
    a.wait_tick("g3", 2, Duration::from_secs(20));
    let out = a.send("g3", b, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !a.has_link("tap3") && !a.has_link("bry"),
        "tap3/bry left on A"
    );
    assert!(b.has_link("tap0"), "B's own tap0 was touched");
    let master = {
        let line = b.ip("-o link show dev tap3");
        line.split_whitespace()
            .skip_while(|&t| t != "master")
            .nth(1)
            .map(str::to_owned)
    };
    assert_eq!(master.as_deref(), Some("bry"));
    assert!(b.ip("-o addr show dev tap3").contains("198.18.10.1/24"));
    assert!(b.ip("-o link show dev bry").contains(",UP"), "bry is down");

    // When it ends on B, what it owned goes with it.
    b.ok(&["kill", "g3"]);
    assert!(
        !b.has_link("tap3") && !b.has_link("bry"),
        "tap3/bry left on B"
    );
}

#[test]
fn run_tap_refuses_a_missing_bridge_and_leaves_nothing() {
    let lab = NetLab::bridged("net-run", &["a"]);
    let a = lab.host("a");
    let out = run_guest(a, "g1", &["--tap", "tap0@nobr"], &guest_net());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobr") && err.contains("--bridge-create"),
        "{err}"
    );
    assert!(!a.has_link("tap0"));
    assert!(a.ps_names().unwrap().is_empty());
    // A tap given an address without saying which one among two.
    let out = run_guest(
        a,
        "g1",
        &["--tap", "tap0", "--tap", "tap1", "--tap-addr", TAP_ADDR],
        &guest_net(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("say which tap"));
    assert!(!a.has_link("tap0") && !a.has_link("tap1"));
}

#[test]
fn checkpoint_and_restore_bring_the_tap_back() {
    let lab = NetLab::bridged("net-ckpt", &["a"]);
    let a = lab.host("a");
    let taps = ["--tap", "tap0@br0", "--tap-addr", TAP_ADDR];
    let out = run_guest(a, "g1", &taps, &guest_net());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.wait_tick("g1", 3, Duration::from_secs(20));
    client_pings(&lab, 2);
    let (mac, _) = tap_link(a);
    let img = a.dir.join("g1.vkimg");
    a.ok(&["checkpoint", "g1", "-o", img.to_str().unwrap()]);
    assert!(!a.has_link("tap0"), "the checkpointed vkernel's tap stayed");
    a.ok(&["restore", img.to_str().unwrap()]);
    assert_eq!(tap_link(a), (mac, BRIDGE.to_string()));
    assert!(a.ip("-o addr show dev tap0").contains(TAP_ADDR));
    client_pings(&lab, 3);
    a.ok(&["kill", "g1"]);
    assert!(!a.has_link("tap0"), "the killed vkernel's tap stayed");
}

fn output_of(child: &mut std::process::Child) -> String {
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut out);
    }
    let _ = child.wait();
    out
}

/// `N packets transmitted, M received` of ping's summary.
fn ping_summary(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {out}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    (nums[0], nums[1])
}
