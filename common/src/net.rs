//! The host-side network configuration that follows a vkernel: the tun/tap devices it holds
//! open, their addresses and routes, the bridge each is enslaved to, and the guest MAC
//! addresses learned behind them (for the announcement after a move).
//!
//! Pure data: `netconf` reads it from the kernel (rtnetlink) and recreates it; the image and
//! the live protocol carry it in [`crate::model::Vkernel::net`] and the offer.
//!
//! What is recreated where (the rule both sides follow):
//! - the tap itself (name, tun/tap flags, persistence, owner, group, MAC, MTU, up), its
//!   addresses and the routes through it: they belong to the vkernel and move with it;
//! - the bridge: the destination must have one of the same name, unless the vkernel owns it
//!   (created by `vkmigrate run --tap NAME@BRIDGE --bridge-create`), in which case it is
//!   created when absent, with the recorded MTU and addresses. A bridge the vkernel does not
//!   own is the host's: its addresses are recorded (for `inspect`) but never copied, since they
//!   are the other host's addresses;
//! - the guest MACs and IPs are not configuration: they say which frames to announce.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// `IFF_TUN`, `IFF_TAP`, `IFF_NO_PI`, `IFF_MULTI_QUEUE`, `IFF_VNET_HDR` (linux/if_tun.h): the
/// bits of [`NetDev::tun_flags`] that describe the device (`IFF_PERSIST` is
/// [`NetDev::persist`]; `IFF_ATTACH_QUEUE`/`IFF_DETACH_QUEUE` are per-queue requests).
pub mod tun_flags {
    pub const IFF_TUN: u16 = 0x0001;
    pub const IFF_TAP: u16 = 0x0002;
    pub const IFF_NAPI: u16 = 0x0010;
    pub const IFF_NAPI_FRAGS: u16 = 0x0020;
    pub const IFF_NO_CARRIER: u16 = 0x0040;
    pub const IFF_NO_PI: u16 = 0x1000;
    pub const IFF_ONE_QUEUE: u16 = 0x2000;
    pub const IFF_VNET_HDR: u16 = 0x4000;
    pub const IFF_TUN_EXCL: u16 = 0x8000;
    pub const IFF_MULTI_QUEUE: u16 = 0x0100;
    pub const IFF_PERSIST: u16 = 0x0800;
}

/// An interface address with its prefix length (`198.18.5.1/24`, `fd00::1/64`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfAddr {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for IfAddr {
    type Err = String;

    /// `ADDR/PREFIX`; the prefix must fit the family (≤ 32 for IPv4, ≤ 128 for IPv6).
    fn from_str(s: &str) -> Result<IfAddr, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDR/PREFIX (e.g. 198.18.5.1/24)"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IP address"))?;
        let prefix_len: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("prefix /{prefix_len} is longer than {max} bits"));
        }
        Ok(IfAddr { addr, prefix_len })
    }
}

/// A route through the tap that is not implied by one of its addresses (the kernel adds the
/// prefix routes of addresses by itself).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IfAddr,
    pub gateway: Option<IpAddr>,
    /// `RTA_PRIORITY`, when set.
    pub metric: Option<u32>,
}

/// The bridge a tap is enslaved to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    pub mtu: u32,
    /// The bridge's own addresses (recreated only when [`Bridge::owned`]).
    pub addrs: Vec<IfAddr>,
    /// Created by vkmigrate for this vkernel: recreated when absent on the destination, and
    /// removed from the source after a move once no other port is enslaved to it.
    pub owned: bool,
}

/// A tun/tap device the vkernel holds open, with its host-side configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetDev {
    /// Interface name (`tap0`), the same on every host.
    pub name: String,
    /// [`tun_flags`] bits as `TUNGETIFF` reports them, without `IFF_PERSIST`.
    pub tun_flags: u16,
    /// `TUNSETPERSIST`: the device outlives its last fd.
    pub persist: bool,
    /// `TUNSETOWNER` / `TUNSETGROUP`, when set.
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// The host side's MAC (taps only; `None` for a tun device).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    pub addrs: Vec<IfAddr>,
    pub routes: Vec<Route>,
    pub bridge: Option<Bridge>,
    /// MAC addresses learned behind the tap (the bridge FDB's non-local entries on its port,
    /// or the neighbours reached through the tap): the guest's.
    pub guest_macs: Vec<[u8; 6]>,
    /// IP addresses the host's neighbour tables map to a guest MAC, for gratuitous ARP and
    /// unsolicited neighbour advertisements after a move.
    pub guest_ips: Vec<(IpAddr, [u8; 6])>,
    /// Created by vkmigrate (`run --tap`): removed from the source after a move.
    pub owned: bool,
}

/// What vkmigrate created on a host for one vkernel (`run --tap`, or recreated from an owned
/// [`NetDev`] by a restore or a move): removed when the vkernel ends there or moves away.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnedNet {
    pub tap: String,
    /// The bridge, when vkmigrate created that too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}

impl OwnedNet {
    /// What of `devs` this host owns and must remove when the vkernel ends here.
    pub fn of(devs: &[NetDev]) -> Vec<OwnedNet> {
        devs.iter()
            .filter(|d| d.owned)
            .map(|d| OwnedNet {
                tap: d.name.clone(),
                bridge: d
                    .bridge
                    .as_ref()
                    .filter(|b| b.owned)
                    .map(|b| b.name.clone()),
            })
            .collect()
    }
}

impl NetDev {
    /// Mark what `owned` says vkmigrate created for this vkernel.
    pub fn set_owned(&mut self, owned: &[OwnedNet]) {
        let o = owned.iter().find(|o| o.tap == self.name);
        self.owned = o.is_some();
        if let Some(b) = self.bridge.as_mut() {
            b.owned = o.and_then(|o| o.bridge.as_deref()) == Some(b.name.as_str());
        }
    }

    pub fn is_tap(&self) -> bool {
        self.tun_flags & tun_flags::IFF_TAP != 0
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff` (case-insensitive).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print() {
        let a: IfAddr = "198.18.5.1/24".parse().expect("v4");
        assert_eq!(a.to_string(), "198.18.5.1/24");
        let b: IfAddr = "fd00::1/64".parse().expect("v6");
        assert_eq!(b.prefix_len, 64);
        assert!("198.18.5.1/33".parse::<IfAddr>().is_err());
        assert!("198.18.5.1".parse::<IfAddr>().is_err());
        assert!("x/24".parse::<IfAddr>().is_err());
    }

    #[test]
    fn macs_parse_and_print() {
        let m = parse_mac("02:AB:00:00:00:0f").expect("mac");
        assert_eq!(fmt_mac(&m), "02:ab:00:00:00:0f");
        assert!(parse_mac("02:ab:00:00:00").is_none());
        assert!(parse_mac("02:ab:00:00:00:0f:10").is_none());
        assert!(parse_mac("02:ab:00:00:00:0").is_none());
    }
}
