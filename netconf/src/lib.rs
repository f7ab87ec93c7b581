//! Host network configuration of a vkernel: read a tun/tap device with its addresses, routes,
//! bridge and guest MACs ([`capture`]), check a destination ([`check`]), recreate it there
//! ([`create`]), clean up the source ([`remove`]) and announce the guest's new location
//! ([`announce`]).
//!
//! Everything goes through rtnetlink except creating the device: the kernel refuses
//! `RTM_NEWLINK` of kind `tun`, so [`create`] opens `/dev/net/tun` with `TUNSETIFF`
//! ([`vkm_sys::tun`]). Every call is blocking and acts in the network namespace of the calling
//! thread (see `rt.rs` for how that holds inside a tokio runtime too).

mod announce;
mod error;
mod rt;

use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use netlink_packet_core::Nla;
use netlink_packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};
use vkm_common::net::{tun_flags, Bridge, IfAddr, NetDev, Route};

pub use announce::{announce, announce_frames};
pub use error::{NetconfError, Result};
use rt::{nl, with_handle};

// IFLA_TUN_* (linux/if_link.h); netlink-packet-route 0.34 leaves them as raw attributes.
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_GROUP: u16 = 2;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PI: u16 = 4;
const IFLA_TUN_VNET_HDR: u16 = 5;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_TUN_MULTI_QUEUE: u16 = 7;

fn is_link_local_v6(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The addresses of link `index`, sorted, without the IPv6 link-local ones (the kernel makes
/// those itself from the MAC).
fn addrs_of(all: &[netlink_packet_route::address::AddressMessage], index: u32) -> Vec<IfAddr> {
    let mut v: Vec<IfAddr> = all
        .iter()
        .filter(|a| a.header.index == index)
        .filter_map(|a| {
            rt::addr_ip(a).map(|addr| IfAddr {
                addr,
                prefix_len: a.header.prefix_len,
            })
        })
        .filter(|a| !is_link_local_v6(&a.addr))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `IFLA_TUN_*` of a tun link: (flags without `IFF_PERSIST`, persist, owner, group).
///
/// The netlink view has the type, `IFF_NO_PI`, `IFF_VNET_HDR` and `IFF_MULTI_QUEUE`, but not
/// `IFF_NAPI`/`IFF_NAPI_FRAGS`/`IFF_ONE_QUEUE`; a caller holding a tun fd gets those from
/// `TUNGETIFF` ([`vkm_sys::tun::get_iff`]). We do not read /sys/class/net: sysfs shows the
/// namespace of whoever mounted it, not the calling thread's.
fn tun_info(l: &LinkMessage) -> Option<(u16, bool, Option<u32>, Option<u32>)> {
    let data = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Tun(d)) => Some(d),
            _ => None,
        }),
        _ => None,
    })?;
    let (mut flags, mut persist, mut owner, mut group) = (0u16, false, None, None);
    let mut pi = true;
    for nla in data {
        let mut v = vec![0u8; nla.value_len()];
        nla.emit_value(&mut v);
        let byte = v.first().copied().unwrap_or(0);
        let word = <[u8; 4]>::try_from(v.get(..4).unwrap_or_default())
            .ok()
            .map(u32::from_ne_bytes);
        match nla.kind() {
            IFLA_TUN_OWNER => owner = word,
            IFLA_TUN_GROUP => group = word,
            IFLA_TUN_TYPE => flags |= u16::from(byte),
            IFLA_TUN_PI => pi = byte != 0,
            IFLA_TUN_VNET_HDR if byte != 0 => flags |= tun_flags::IFF_VNET_HDR,
            IFLA_TUN_MULTI_QUEUE if byte != 0 => flags |= tun_flags::IFF_MULTI_QUEUE,
            IFLA_TUN_PERSIST => persist = byte != 0,
            _ => {}
        }
    }
    if !pi {
        flags |= tun_flags::IFF_NO_PI;
    }
    Some((flags, persist, owner, group))
}

/// Everything [`NetDev`] holds about the existing tun/tap interface `tap`. `owned` (of the
/// device and of its bridge) is left false: ownership is the caller's knowledge.
pub fn capture(tap: &str) -> Result<NetDev> {
    with_handle(|h| async move { capture_async(&h, tap).await })
}

async fn capture_async(h: &Handle, tap: &str) -> Result<NetDev> {
    let link = rt::link_by_name(h, tap)
        .await?
        .ok_or_else(|| NetconfError::NotFound { ifname: tap.into() })?;
    if rt::kind(&link) != Some(&InfoKind::Tun) {
        return Err(NetconfError::NotTun { ifname: tap.into() });
    }
    let (flags, persist, owner, group) =
        tun_info(&link).ok_or_else(|| NetconfError::NotTun { ifname: tap.into() })?;
    let index = link.header.index;
    let is_tap = flags & tun_flags::IFF_TAP != 0;
    let all_addrs = rt::addresses(h).await?;
    let addrs = addrs_of(&all_addrs, index);

    let mut routes: Vec<Route> = rt::routes(h)
        .await?
        .iter()
        .filter(|r| {
            r.header.protocol != RouteProtocol::Kernel
                && r.header.kind == RouteType::Unicast
                && rt::route_table(r)
                    == u32::from(netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN)
                && r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        })
        .filter_map(|r| {
            let v4 = r.header.address_family == AddressFamily::Inet;
            let dst = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Destination(d) => route_ip(d),
                    _ => None,
                })
                .unwrap_or(if v4 {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                });
            if is_link_local_v6(&dst) || dst.is_multicast() {
                return None;
            }
            let gateway = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => route_ip(g),
                _ => None,
            });
            let metric = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            Some(Route {
                dst: IfAddr {
                    addr: dst,
                    prefix_len: r.header.destination_prefix_length,
                },
                gateway,
                metric,
            })
        })
        .collect();
    routes.sort();
    routes.dedup();

    let bridge_link = match rt::controller(&link) {
        Some(i) => rt::link_by_index(h, i).await?,
        None => None,
    };
    let bridge = bridge_link.as_ref().map(|b| Bridge {
        name: rt::name(b),
        mtu: rt::mtu(b),
        addrs: addrs_of(&all_addrs, b.header.index),
        owned: false,
    });

    let own_mac = rt::mac(&link);
    let mut guest_macs: Vec<[u8; 6]> = Vec::new();
    if bridge_link.is_some() {
        for n in rt::neighbours(h, AddressFamily::Bridge).await? {
            // Permanent entries are the bridge's and the ports' own addresses; NTF_SELF ones
            // are the device's own unicast/multicast list, not learned.
            if n.header.ifindex != index
                || n.header.state == NeighbourState::Permanent
                || n.header.flags.contains(NeighbourFlags::Own)
            {
                continue;
            }
            if let Some(m) = lladdr(&n.attributes) {
                if Some(m) != own_mac && m[0] & 1 == 0 {
                    guest_macs.push(m);
                }
            }
        }
    }
    let mut ip_neigh = rt::neighbours(h, AddressFamily::Inet).await?;
    ip_neigh.extend(rt::neighbours(h, AddressFamily::Inet6).await?);
    let bridge_index = bridge_link.as_ref().map(|b| b.header.index);
    let usable = |s: &NeighbourState| {
        !matches!(
            s,
            NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
        )
    };
    if bridge_link.is_none() {
        // Without a bridge there is no FDB: the neighbours reached through the tap are the guest.
        for n in &ip_neigh {
            if n.header.ifindex == index && usable(&n.header.state) {
                if let Some(m) = lladdr(&n.attributes) {
                    guest_macs.push(m);
                }
            }
        }
    }
    guest_macs.sort();
    guest_macs.dedup();
    let mut guest_ips: Vec<(IpAddr, [u8; 6])> = ip_neigh
        .iter()
        .filter(|n| {
            (n.header.ifindex == index || Some(n.header.ifindex) == bridge_index)
                && usable(&n.header.state)
        })
        .filter_map(|n| {
            let m = lladdr(&n.attributes)?;
            let ip = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    Some(IpAddr::V6(*v6))
                }
                _ => None,
            })?;
            guest_macs.contains(&m).then_some((ip, m))
        })
        .collect();
    guest_ips.sort();
    guest_ips.dedup();

    Ok(NetDev {
        name: tap.into(),
        tun_flags: flags,
        persist,
        owner,
        group,
        mac: if is_tap { own_mac } else { None },
        mtu: rt::mtu(&link),
        up: rt::is_up(&link),
        addrs,
        routes,
        bridge,
        guest_macs,
        guest_ips,
        owned: false,
    })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn lladdr(attrs: &[NeighbourAttribute]) -> Option<[u8; 6]> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

/// Pre-flight on a destination host: the tap name is free, the bridge exists and is a bridge
/// (or is owned and its name free), and no address `dev` (or an owned, absent bridge) brings
/// is assigned here already.
pub fn check(dev: &NetDev) -> Result<()> {
    with_handle(|h| async move { check_async(&h, dev).await })
}

async fn check_async(h: &Handle, dev: &NetDev) -> Result<()> {
    let links = rt::links(h).await?;
    let by_name = |n: &str| links.iter().find(|l| rt::name(l) == n);
    if by_name(&dev.name).is_some() {
        return Err(NetconfError::TapExists {
            ifname: dev.name.clone(),
        });
    }
    let mut wanted: Vec<(IfAddr, &str)> =
        dev.addrs.iter().map(|a| (*a, dev.name.as_str())).collect();
    if let Some(b) = &dev.bridge {
        match by_name(&b.name) {
            Some(l) => check_bridge(l, dev)?,
            None if b.owned => wanted.extend(b.addrs.iter().map(|a| (*a, b.name.as_str()))),
            None => {
                return Err(NetconfError::BridgeMissing {
                    bridge: b.name.clone(),
                    tap: dev.name.clone(),
                })
            }
        }
    }
    let present = rt::addresses(h).await?;
    for (want, owner) in wanted {
        if let Some(held) = present.iter().find(|a| rt::addr_ip(a) == Some(want.addr)) {
            let held_by = links
                .iter()
                .find(|l| l.header.index == held.header.index)
                .map_or_else(|| format!("#{}", held.header.index), rt::name);
            return Err(NetconfError::AddressInUse {
                addr: want,
                wanted_by: owner.into(),
                held_by,
            });
        }
    }
    Ok(())
}

fn check_bridge(l: &LinkMessage, dev: &NetDev) -> Result<()> {
    if rt::kind(l) == Some(&InfoKind::Bridge) {
        Ok(())
    } else {
        Err(NetconfError::NotABridge {
            ifname: rt::name(l),
            tap: dev.name.clone(),
        })
    }
}

/// What [`create`] made: the tap with its attached fd and, when it had to create it, the
/// owned bridge. [`Created::undo`] removes exactly that; dropping a `Created` that was neither
/// undone nor [`Created::into_fd`]-ed undoes it too (best effort, errors lost).
#[derive(Debug)]
pub struct Created {
    fd: Option<OwnedFd>,
    tap: String,
    tap_index: u32,
    bridge: Option<(String, u32)>,
}

impl Created {
    /// The tun fd attached to the tap, to hand to the restored process.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// The bridge this call created, if any.
    pub fn created_bridge(&self) -> Option<&str> {
        self.bridge.as_ref().map(|(n, _)| n.as_str())
    }

    /// Keep everything: the configuration now belongs to the restored vkernel. Returns the
    /// attached tun fd.
    pub fn into_fd(mut self) -> Option<OwnedFd> {
        self.bridge = None;
        self.tap_index = 0;
        self.fd.take()
    }

    /// Delete the tap (also when persistent) and the bridge this call created.
    pub fn undo(mut self) -> Result<()> {
        self.undo_mut()
    }

    fn undo_mut(&mut self) -> Result<()> {
        // Deleting the link first, while our fd still holds it, so that a persistent or
        // non-persistent tap alike is gone before the fd closes.
        let tap = (self.tap_index != 0).then(|| (self.tap.clone(), self.tap_index));
        let bridge = self.bridge.take();
        self.tap_index = 0;
        let r = with_handle(|h| async move {
            let mut first = Ok(());
            for (name, index) in tap.into_iter().chain(bridge) {
                if let Err(e) = h.link().del(index).execute().await {
                    if rt::errno(&e) != Some(libc::ENODEV) && first.is_ok() {
                        first = Err(nl("delete", &name)(e));
                    }
                }
            }
            first
        });
        self.fd = None;
        r
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.tap_index != 0 || self.bridge.is_some() {
            let _ = self.undo_mut();
        }
    }
}

/// Create the tap of `dev` (with `TUNSETIFF`, persistence, owner and group as recorded) and
/// configure it over rtnetlink: MAC, MTU, the bridge (created when owned and absent),
/// addresses, up, routes. On error everything made so far is removed again.
pub fn create(dev: &NetDev) -> Result<Created> {
    let exists = with_handle(|h| async move { rt::link_by_name(&h, &dev.name).await })?;
    // TUNSETIFF on an existing (persistent) tap attaches to it instead of failing, so the
    // name must be checked first.
    if exists.is_some() {
        return Err(NetconfError::TapExists {
            ifname: dev.name.clone(),
        });
    }
    let tun_err = |step| {
        let ifname = dev.name.clone();
        move |source| NetconfError::Tun {
            step,
            ifname,
            source: Box::new(source),
        }
    };
    let fd = vkm_sys::tun::open_tun(&dev.name, dev.tun_flags & !tun_flags::IFF_PERSIST)
        .map_err(tun_err("create the tun device"))?;
    let mut created = Created {
        fd: Some(fd),
        tap: dev.name.clone(),
        tap_index: 0,
        bridge: None,
    };
    let r = setup(dev, &mut created);
    match r {
        Ok(()) => Ok(created),
        Err(e) => {
            // The first error is the one to report; the undo is best effort.
            let _ = created.undo_mut();
            Err(e)
        }
    }
}

fn bad_route(r: &Route, ifname: &str) -> NetconfError {
    NetconfError::BadRoute {
        route: format!("{} via {:?}", r.dst, r.gateway),
        ifname: ifname.into(),
    }
}

fn setup(dev: &NetDev, created: &mut Created) -> Result<()> {
    let tun_err = |step| {
        let ifname = dev.name.clone();
        move |source| NetconfError::Tun {
            step,
            ifname,
            source: Box::new(source),
        }
    };
    if let Some(fd) = created.fd.as_ref().map(AsFd::as_fd) {
        if dev.persist {
            vkm_sys::tun::set_persist(fd, true).map_err(tun_err("make persistent"))?;
        }
        if let Some(uid) = dev.owner {
            vkm_sys::tun::set_owner(fd, uid).map_err(tun_err("set the owner of"))?;
        }
        if let Some(gid) = dev.group {
            vkm_sys::tun::set_group(fd, gid).map_err(tun_err("set the group of"))?;
        }
    }
    with_handle(|h| async move { configure(&h, dev, created).await })
}

/// One `RTM_SETLINK`; `step` and `ifname` name it in the error.
async fn set_link(h: &Handle, msg: LinkMessage, step: &'static str, ifname: &str) -> Result<()> {
    h.link().set(msg).execute().await.map_err(nl(step, ifname))
}

async fn configure(h: &Handle, dev: &NetDev, created: &mut Created) -> Result<()> {
    let name = dev.name.as_str();
    let link = rt::link_by_name(h, name)
        .await?
        .ok_or_else(|| NetconfError::NotFound {
            ifname: name.into(),
        })?;
    let index = link.header.index;
    created.tap_index = index;
    if let (true, Some(mac)) = (dev.is_tap(), dev.mac) {
        set_link(
            h,
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
            "set the MAC address of",
            name,
        )
        .await?;
    }
    if dev.mtu != 0 {
        set_link(
            h,
            LinkUnspec::new_with_index(index).mtu(dev.mtu).build(),
            "set the MTU of",
            name,
        )
        .await?;
    }
    if let Some(b) = &dev.bridge {
        let (br_index, made) = match rt::link_by_name(h, &b.name).await? {
            Some(l) => {
                check_bridge(&l, dev)?;
                (l.header.index, false)
            }
            None if b.owned => {
                h.link()
                    .add(LinkBridge::new(&b.name).mtu(b.mtu).build())
                    .execute()
                    .await
                    .map_err(nl("create the bridge", &b.name))?;
                let l =
                    rt::link_by_name(h, &b.name)
                        .await?
                        .ok_or_else(|| NetconfError::NotFound {
                            ifname: b.name.clone(),
                        })?;
                created.bridge = Some((b.name.clone(), l.header.index));
                for a in &b.addrs {
                    h.address()
                        .add(l.header.index, a.addr, a.prefix_len)
                        .execute()
                        .await
                        .map_err(nl("add an address to", &b.name))?;
                }
                set_link(
                    h,
                    LinkUnspec::new_with_index(l.header.index).up().build(),
                    "bring up",
                    &b.name,
                )
                .await?;
                (l.header.index, true)
            }
            None => {
                return Err(NetconfError::BridgeMissing {
                    bridge: b.name.clone(),
                    tap: name.into(),
                })
            }
        };
        // A Linux bridge without an address of its own takes its lowest port's MAC. The
        // tap's MAC is the same on every host the vkernel visits, so enslaving it could give
        // two hosts' bridges one MAC (and the host's neighbours a stale one): pin the
        // bridge's MAC to what it is now first.
        if let Some(mac) = rt::link_by_index(h, br_index)
            .await?
            .as_ref()
            .and_then(rt::mac)
        {
            set_link(
                h,
                LinkUnspec::new_with_index(br_index)
                    .address(mac.to_vec())
                    .build(),
                "pin the MAC address of",
                &b.name,
            )
            .await?;
        }
        set_link(
            h,
            LinkUnspec::new_with_index(index)
                .controller(br_index)
                .build(),
            "enslave to its bridge",
            name,
        )
        .await?;
        if made && b.mtu != 0 {
            // A bridge follows its smallest port's MTU until one is set explicitly, so set the
            // recorded one again now that the tap is a port.
            set_link(
                h,
                LinkUnspec::new_with_index(br_index).mtu(b.mtu).build(),
                "set the MTU of",
                &b.name,
            )
            .await?;
        }
    }
    for a in &dev.addrs {
        h.address()
            .add(index, a.addr, a.prefix_len)
            .execute()
            .await
            .map_err(nl("add an address to", name))?;
    }
    if dev.up {
        set_link(
            h,
            LinkUnspec::new_with_index(index).up().build(),
            "bring up",
            name,
        )
        .await?;
    }
    for r in &dev.routes {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(r.dst.addr, r.dst.prefix_len)
            .map_err(|_| bad_route(r, name))?
            .output_interface(index);
        if let Some(g) = r.gateway {
            b = b.gateway(g).map_err(|_| bad_route(r, name))?;
        }
        if let Some(m) = r.metric {
            b = b.priority(m);
        }
        h.route()
            .add(b.build())
            .execute()
            .await
            .map_err(nl("add a route through", name))?;
    }
    Ok(())
}

/// On the source after a move: delete the tap if it still exists (a persistent or owned one
/// outlives the vkernel), and an owned bridge once no port is left on it. Missing things are
/// not errors.
pub fn remove(tap: &str, owned_bridge: Option<&str>) -> Result<()> {
    with_handle(|h| async move {
        if let Some(l) = rt::link_by_name(&h, tap).await? {
            del(&h, l.header.index, tap).await?;
        }
        if let Some(b) = owned_bridge {
            if let Some(l) = rt::link_by_name(&h, b).await? {
                let br = l.header.index;
                let ports = rt::links(&h).await?;
                if rt::kind(&l) == Some(&InfoKind::Bridge)
                    && !ports.iter().any(|p| rt::controller(p) == Some(br))
                {
                    del(&h, br, b).await?;
                }
            }
        }
        Ok(())
    })
}

async fn del(h: &Handle, index: u32, name: &str) -> Result<()> {
    match h.link().del(index).execute().await {
        Err(e) if rt::errno(&e) != Some(libc::ENODEV) => Err(nl("delete", name)(e)),
        _ => Ok(()),
    }
}
