//! Root tests of vkm-netconf in private network namespaces (198.18.0.0/15 for IPv4 and its
//! IPv6 twin 2001:2::/48, RFC 5180; nothing leaves the namespaces).

mod common;

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use common::{unique, Netns};
use vkm_common::net::{tun_flags, IfAddr, NetDev, Route};
use vkm_netconf::{announce, capture, check, create, remove, NetconfError};

const GUEST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

fn a(s: &str) -> IfAddr {
    s.parse().expect("address")
}

/// A persistent tap `tap` (TAP | NO_PI) in `ns`, the fd kept open like a vkernel would.
fn tap_in(ns: &Netns, tap: &str, flags: u16) -> OwnedFd {
    ns.run(|| {
        let fd = vkm_sys::tun::open_tun(tap, flags).expect("open_tun");
        vkm_sys::tun::set_persist(fd.as_fd(), true).expect("persist");
        fd
    })
}

fn error_text(e: &NetconfError) -> String {
    e.to_string()
}

/// A bare NetDev for `tap` with nothing but the flags.
fn plain(tap: &str) -> NetDev {
    NetDev {
        name: tap.into(),
        tun_flags: tun_flags::IFF_TAP | tun_flags::IFF_NO_PI,
        persist: true,
        owner: None,
        group: None,
        mac: Some([0x02, 0, 0, 0, 0x11, 0x11]),
        mtu: 1500,
        up: true,
        addrs: vec![],
        routes: vec![],
        bridge: None,
        guest_macs: vec![],
        guest_ips: vec![],
        owned: false,
    }
}

#[test]
fn round_trip_between_namespaces() {
    let x = Netns::new("rtx");
    let y = Netns::new("rty");
    let br = unique("br");
    let tap = unique("tp");
    x.ip(&["link", "add", &br, "type", "bridge"]);
    x.ip(&["addr", "add", "198.18.1.1/24", "dev", &br]);
    x.ip(&["link", "set", &br, "up"]);
    let _fd = tap_in(&x, &tap, tun_flags::IFF_TAP | tun_flags::IFF_NO_PI);
    x.ip(&[
        "link",
        "set",
        &tap,
        "address",
        "02:00:00:00:01:01",
        "mtu",
        "1400",
        "master",
        &br,
    ]);
    x.ip(&["addr", "add", "198.18.2.1/24", "dev", &tap]);
    x.ip(&["addr", "add", "198.18.3.1/24", "dev", &tap]);
    x.ip(&[
        "-6",
        "addr",
        "add",
        "2001:2:0:1::1/64",
        "dev",
        &tap,
        "nodad",
    ]);
    x.ip(&["link", "set", &tap, "up"]);
    x.ip(&[
        "route",
        "add",
        "198.19.5.0/24",
        "via",
        "198.18.2.254",
        "dev",
        &tap,
    ]);

    let first = x.run(|| capture(&tap)).expect("capture in x");
    assert_eq!(first.tun_flags, tun_flags::IFF_TAP | tun_flags::IFF_NO_PI);
    assert!(first.persist);
    assert_eq!(first.mac, Some([2, 0, 0, 0, 1, 1]));
    assert_eq!(first.mtu, 1400);
    assert!(first.up);
    assert_eq!(
        first.addrs,
        vec![
            a("198.18.2.1/24"),
            a("198.18.3.1/24"),
            a("2001:2:0:1::1/64")
        ]
    );
    assert_eq!(
        first.routes,
        vec![Route {
            dst: a("198.19.5.0/24"),
            gateway: Some("198.18.2.254".parse().expect("ip")),
            metric: None,
        }]
    );
    let b = first.bridge.clone().expect("bridge");
    assert_eq!(b.name, br);
    assert_eq!(b.addrs, vec![a("198.18.1.1/24")]);
    assert_eq!(b.mtu, 1400, "a bridge follows its smallest port");

    let mut moved = first.clone();
    if let Some(b) = moved.bridge.as_mut() {
        b.owned = true;
    }
    y.run(|| check(&moved)).expect("check in y");
    let created = y.run(|| create(&moved)).expect("create in y");
    assert_eq!(created.created_bridge(), Some(br.as_str()));
    let second = y.run(|| capture(&tap)).expect("capture in y");
    // Everything is equal: ownership is not in the kernel, so capture reports false on both.
    assert_eq!(second, first);
    y.run(|| created.undo()).expect("undo");
    assert!(!y.has_link(&tap) && !y.has_link(&br));
}

#[test]
fn check_names_what_clashes() {
    let ns = Netns::new("chk");
    let taken = unique("tk");
    let dummy = unique("dm");
    let _fd = tap_in(&ns, &taken, tun_flags::IFF_TAP | tun_flags::IFF_NO_PI);
    ns.ip(&["tuntap", "add", "dev", &dummy, "mode", "tap"]);
    ns.ip(&["addr", "add", "198.18.9.1/24", "dev", &dummy]);

    let e = ns
        .run(|| check(&plain(&taken)))
        .expect_err("taken tap name");
    assert!(matches!(e, NetconfError::TapExists { .. }), "{e:?}");
    assert!(error_text(&e).contains(&taken), "{e}");

    let free = unique("fr");
    let missing = unique("mb");
    let mut dev = plain(&free);
    dev.bridge = Some(vkm_common::net::Bridge {
        name: missing.clone(),
        mtu: 1500,
        addrs: vec![],
        owned: false,
    });
    let e = ns.run(|| check(&dev)).expect_err("missing bridge");
    assert!(matches!(e, NetconfError::BridgeMissing { .. }), "{e:?}");
    assert!(error_text(&e).contains(&missing), "{e}");
    // The same bridge, owned, would be created: fine.
    if let Some(b) = dev.bridge.as_mut() {
        b.owned = true;
    }
    ns.run(|| check(&dev)).expect("owned absent bridge");

    let mut dev = plain(&free);
    dev.addrs = vec![a("198.18.9.1/32")];
    let e = ns.run(|| check(&dev)).expect_err("address clash");
    assert!(matches!(e, NetconfError::AddressInUse { .. }), "{e:?}");
    let text = error_text(&e);
    assert!(
        text.contains("198.18.9.1") && text.contains(&dummy),
        "{text}"
    );

    // An owned, absent bridge's addresses count too.
    let mut dev = plain(&free);
    dev.bridge = Some(vkm_common::net::Bridge {
        name: missing,
        mtu: 1500,
        addrs: vec![a("198.18.9.1/24")],
        owned: true,
    });
    assert!(matches!(
        ns.run(|| check(&dev)),
        Err(NetconfError::AddressInUse { .. })
    ));

    // A non-bridge under the bridge's name.
    let mut dev = plain(&free);
    dev.bridge = Some(vkm_common::net::Bridge {
        name: dummy.clone(),
        mtu: 1500,
        addrs: vec![],
        owned: true,
    });
    let e = ns.run(|| check(&dev)).expect_err("not a bridge");
    assert!(
        matches!(e, NetconfError::NotABridge { .. }) && error_text(&e).contains(&dummy),
        "{e:?}"
    );

    ns.run(|| check(&plain(&free))).expect("a free name");
}

#[test]
fn create_failure_leaves_nothing_and_undo_removes_everything() {
    let ns = Netns::new("cre");
    let dummy = unique("dm");
    ns.ip(&["tuntap", "add", "dev", &dummy, "mode", "tap"]);

    // The bridge name is taken by a non-bridge: fails after the tap exists.
    let tap = unique("tp");
    let mut dev = plain(&tap);
    dev.addrs = vec![a("198.18.4.1/24")];
    dev.bridge = Some(vkm_common::net::Bridge {
        name: dummy.clone(),
        mtu: 1500,
        addrs: vec![],
        owned: true,
    });
    let e = ns.run(|| create(&dev)).expect_err("not a bridge");
    assert!(matches!(e, NetconfError::NotABridge { .. }), "{e:?}");
    assert!(!ns.has_link(&tap), "tap left behind");
    assert!(ns.has_link(&dummy), "the host's interface was touched");

    // An owned bridge is created, then a route fails (its gateway is not on any link).
    let br = unique("br");
    let mut dev = plain(&tap);
    dev.addrs = vec![a("198.18.4.1/24")];
    dev.routes = vec![Route {
        dst: a("198.19.7.0/24"),
        gateway: Some("198.19.200.1".parse().expect("ip")),
        metric: None,
    }];
    dev.bridge = Some(vkm_common::net::Bridge {
        name: br.clone(),
        mtu: 1500,
        addrs: vec![a("198.18.5.1/24")],
        owned: true,
    });
    let e = ns.run(|| create(&dev)).expect_err("unreachable gateway");
    assert!(
        matches!(
            e,
            NetconfError::Netlink {
                step: "add a route through",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(error_text(&e).contains(&tap), "{e}");
    assert!(
        !ns.has_link(&tap) && !ns.has_link(&br),
        "left behind after a failure"
    );
    let addrs = ns.ip_out(&["addr"]).expect("ip addr");
    assert!(
        !addrs.contains("198.18.4.1") && !addrs.contains("198.18.5.1"),
        "{addrs}"
    );

    // Success, then undo.
    dev.routes.clear();
    let created = ns.run(|| create(&dev)).expect("create");
    assert!(ns.has_link(&tap) && ns.has_link(&br));
    ns.run(|| created.undo()).expect("undo");
    assert!(
        !ns.has_link(&tap) && !ns.has_link(&br),
        "undo left something"
    );
}

#[test]
fn remove_deletes_tap_and_empty_owned_bridge_only() {
    let ns = Netns::new("rm");
    let tap = unique("tp");
    let br = unique("br");
    let mut dev = plain(&tap);
    dev.bridge = Some(vkm_common::net::Bridge {
        name: br.clone(),
        mtu: 1500,
        addrs: vec![],
        owned: true,
    });
    // The vkernel took the fd and died: the persistent tap and the bridge remain.
    let created = ns.run(|| create(&dev)).expect("create");
    drop(created.into_fd());
    assert!(ns.has_link(&tap) && ns.has_link(&br));
    ns.run(|| remove(&tap, Some(&br))).expect("remove");
    assert!(!ns.has_link(&tap) && !ns.has_link(&br));
    ns.run(|| remove(&tap, Some(&br)))
        .expect("missing things are not errors");

    // A bridge with another port stays.
    let created = ns.run(|| create(&dev)).expect("create again");
    drop(created.into_fd());
    let other = unique("dm");
    ns.ip(&["tuntap", "add", "dev", &other, "mode", "tap"]);
    ns.ip(&["link", "set", &other, "master", &br]);
    ns.run(|| remove(&tap, Some(&br))).expect("remove");
    assert!(!ns.has_link(&tap));
    assert!(ns.has_link(&br), "a bridge with another port was deleted");
    // Not owned: never deleted, even when empty.
    ns.ip(&["link", "del", &other]);
    ns.run(|| remove(&tap, None)).expect("remove");
    assert!(ns.has_link(&br), "a bridge not owned was deleted");
}

/// A frame a guest would send: broadcast, from GUEST, a local experimental ethertype.
fn guest_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(60, 0);
    f
}

/// A bridge (up) with a tap port (up) whose fd we hold as the guest.
fn bridged_tap(ns: &Netns, flags: u16) -> (String, String, OwnedFd) {
    let br = unique("br");
    let tap = unique("tp");
    ns.ip(&["link", "add", &br, "type", "bridge"]);
    ns.ip(&["link", "set", &br, "up"]);
    let fd = ns.run(|| vkm_sys::tun::open_tun(&tap, flags).expect("open_tun"));
    ns.ip(&["link", "set", &tap, "master", &br, "up"]);
    (br, tap, fd)
}

#[test]
fn guest_macs_are_learned_from_the_fdb() {
    let ns = Netns::new("gm");
    let (br, tap, fd) = bridged_tap(&ns, tun_flags::IFF_TAP | tun_flags::IFF_NO_PI);
    let before = ns.run(|| capture(&tap)).expect("capture");
    assert!(before.guest_macs.is_empty(), "{:?}", before.guest_macs);
    nix::unistd::write(fd.as_fd(), &guest_frame()).expect("write a guest frame");
    ns.ip(&[
        "neigh",
        "add",
        "198.18.20.5",
        "lladdr",
        "02:00:00:00:00:42",
        "dev",
        &br,
        "nud",
        "reachable",
    ]);
    // A neighbour with another MAC is not the guest's.
    ns.ip(&[
        "neigh",
        "add",
        "198.18.20.6",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        &br,
        "nud",
        "reachable",
    ]);
    let after = ns.run(|| capture(&tap)).expect("capture");
    assert_eq!(after.guest_macs, vec![GUEST]);
    assert_eq!(
        after.guest_ips,
        vec![("198.18.20.5".parse::<IpAddr>().expect("ip"), GUEST)]
    );
}

#[test]
fn announce_reaches_the_bridge_and_teaches_the_fdb() {
    use nix::sys::socket::{
        recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    let ns = Netns::new("ann");
    // With PI and a vnet header, so that both prefixes must be right for the frames to parse.
    let flags = tun_flags::IFF_TAP | tun_flags::IFF_VNET_HDR;
    let (br, tap, fd) = bridged_tap(&ns, flags);
    let hdr = vkm_sys::tun::get_vnet_hdr_sz(fd.as_fd()).expect("vnet hdr size");
    let (iff_name, iff_flags) = vkm_sys::tun::get_iff(fd.as_fd()).expect("get_iff");
    assert_eq!(iff_name, tap);
    assert_eq!(
        iff_flags & (tun_flags::IFF_TAP | tun_flags::IFF_VNET_HDR),
        flags
    );
    let mut dev = ns.run(|| capture(&tap)).expect("capture");
    assert_eq!(dev.tun_flags, flags, "netlink sees PI on and a vnet header");
    dev.guest_macs = vec![GUEST];
    dev.guest_ips = vec![
        ("198.18.30.5".parse().expect("ip"), GUEST),
        ("2001:2:0:30::5".parse().expect("ip"), GUEST),
    ];
    let br_index: usize = ns
        .ip_out(&["-o", "link", "show", "dev", &br])
        .and_then(|s| s.split(':').next().and_then(|i| i.trim().parse().ok()))
        .expect("bridge index");

    let seen = ns.run(|| {
        let sock = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .expect("packet socket");
        setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .expect("timeout");
        std::thread::scope(|s| {
            let writer = s.spawn(|| announce(fd.as_fd(), flags, hdr, &dev, 2));
            let mut seen: Vec<Vec<u8>> = Vec::new();
            let mut buf = [0u8; 2048];
            let end = Instant::now() + Duration::from_secs(2);
            use std::os::fd::AsRawFd;
            while Instant::now() < end {
                if let Ok((n, Some(addr))) = recvfrom::<LinkAddr>(sock.as_raw_fd(), &mut buf) {
                    if addr.ifindex() == br_index && buf[6..12] == GUEST {
                        seen.push(buf[..n].to_vec());
                    }
                }
            }
            writer.join().expect("writer").expect("announce");
            seen
        })
    });
    let expected = vkm_netconf::announce_frames(&dev);
    for f in &expected {
        let n = seen.iter().filter(|s| s.starts_with(f)).count();
        assert_eq!(
            n, 2,
            "frame of type {:02x}{:02x} seen {n} times, not once per round",
            f[12], f[13]
        );
    }
    let learned = ns.run(|| capture(&tap)).expect("capture");
    assert_eq!(
        learned.guest_macs,
        vec![GUEST],
        "the FDB did not learn the guest on {tap}"
    );
}

#[test]
fn blocking_api_works_inside_a_tokio_runtime() {
    let ns = Netns::new("tok");
    let tap = unique("tp");
    let _fd = tap_in(&ns, &tap, tun_flags::IFF_TAP | tun_flags::IFF_NO_PI);
    let got = ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        // Called straight from the runtime's own thread: must not try to nest a runtime.
        rt.block_on(async { capture(&tap) })
    });
    assert_eq!(got.expect("capture").name, tap);
}
