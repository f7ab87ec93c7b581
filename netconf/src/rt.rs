//! The blocking bridge to rtnetlink, and small async queries over it.
//!
//! Callers are plain threads and tokio tasks (`spawn_blocking`, or a runtime's own thread), so
//! we never block on a future on the caller's thread (that would panic inside a runtime).
//! Each call instead runs on a short-lived scoped thread with its own current-thread runtime.
//! A new thread starts in the network namespace of the thread that spawns it (clone copies
//! the caller's nsproxy), and the netlink socket is opened on it: every request acts in the
//! caller's namespace, which is what a caller that did `setns` on its thread expects.

use std::future::Future;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::{NetconfError, Result};

/// Run `f` with a fresh rtnetlink handle on a dedicated thread in the caller's namespace.
pub(crate) fn with_handle<T, F, Fut>(f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("vkm-netconf".into())
            .spawn_scoped(s, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(NetconfError::Runtime)?;
                rt.block_on(async move {
                    let (conn, handle, _) =
                        rtnetlink::new_connection().map_err(NetconfError::Socket)?;
                    let driver = tokio::spawn(conn);
                    let r = f(handle).await;
                    driver.abort();
                    r
                })
            })
            .map_err(NetconfError::Runtime)?;
        worker.join().unwrap_or(Err(NetconfError::Panicked))
    })
}

/// The negative-free errno of a netlink NACK.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

pub(crate) fn nl(
    step: &'static str,
    ifname: &str,
) -> impl FnOnce(rtnetlink::Error) -> NetconfError {
    let ifname = ifname.to_string();
    move |source| NetconfError::Netlink {
        step,
        ifname,
        source: Box::new(source),
    }
}

/// Every link in the namespace.
pub(crate) async fn links(h: &Handle) -> Result<Vec<LinkMessage>> {
    h.link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the interfaces of", "this namespace"))
}

/// The link called `name`, if any.
pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    match h.link().get().match_name(name).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl("look up", name)(e)),
    }
}

pub(crate) async fn link_by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>> {
    match h.link().get().match_index(index).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl("look up", &format!("interface #{index}"))(e)),
    }
}

pub(crate) fn name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", l.header.index))
}

pub(crate) fn kind(l: &LinkMessage) -> Option<&InfoKind> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

pub(crate) fn mtu(l: &LinkMessage) -> u32 {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

pub(crate) fn controller(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    })
}

pub(crate) fn is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

pub(crate) fn mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

/// Every address in the namespace.
pub(crate) async fn addresses(h: &Handle) -> Result<Vec<AddressMessage>> {
    h.address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the addresses of", "this namespace"))
}

/// The IP of an address message: `IFA_LOCAL` for IPv4 (`IFA_ADDRESS` is the peer on
/// point-to-point links), `IFA_ADDRESS` for IPv6.
pub(crate) fn addr_ip(a: &AddressMessage) -> Option<IpAddr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    match a.header.family {
        AddressFamily::Inet => local.or(address),
        _ => address.or(local),
    }
}

/// Every main-table route of both families.
pub(crate) async fn routes(h: &Handle) -> Result<Vec<RouteMessage>> {
    let mut all: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the IPv4 routes of", "this namespace"))?;
    let v6: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the IPv6 routes of", "this namespace"))?;
    all.extend(v6);
    Ok(all)
}

pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The neighbour entries of one family (`AF_BRIDGE` = the bridges' FDBs).
pub(crate) async fn neighbours(h: &Handle, family: AddressFamily) -> Result<Vec<NeighbourMessage>> {
    h.neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect()
        .await
        .map_err(nl("list the neighbour entries of", "this namespace"))
}
