//! The L2 announcement after a move: RARP as QEMU's `qemu_announce_self` sends it, gratuitous
//! ARP and unsolicited neighbour advertisements, written into the tap as if the guest sent
//! them, so that the bridge learns the guest MAC on the new port and floods it to the LAN.
//!
//! The frames are built by hand: they are three fixed layouts of 60 and 86 bytes with one
//! checksum, small enough that a frame-building dependency (etherparse) was not worth adding;
//! the unit tests pin every offset and the checksum against an independently computed value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use vkm_common::net::{tun_flags, NetDev};

use crate::{NetconfError, Result};

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_RARP: u16 = 0x8035;
const ETH_P_IPV6: u16 = 0x86dd;
/// Frames shorter than this are padded, as a NIC would (and as QEMU does).
const ETH_ZLEN: usize = 60;

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_ZLEN);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// An Ethernet/IPv4 ARP body (RFC 826, RFC 903 for RARP).
fn arp(
    ethertype: u16,
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut f = eth(BROADCAST, sha, ethertype);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f.resize(ETH_ZLEN, 0);
    f
}

/// RARP "request reverse" (op 3) with sender = target = `mac` and zero IPs, QEMU's frame.
pub(crate) fn rarp(mac: [u8; 6]) -> Vec<u8> {
    arp(
        ETH_P_RARP,
        3,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    )
}

/// Gratuitous ARP request: sender = target = `ip`, broadcast.
pub(crate) fn garp(ip: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    arp(ETH_P_ARP, 1, mac, ip, [0; 6], ip)
}

/// The Internet checksum of the IPv6 pseudo-header and `icmp` (RFC 4443 §2.3).
pub(crate) fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let len = u32::try_from(icmp.len()).unwrap_or(u32::MAX);
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let hi = u32::from(c[0]) << 8;
            let lo = c.get(1).copied().map_or(0, u32::from);
            sum = sum.wrapping_add(hi | lo);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&len.to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Unsolicited neighbour advertisement (RFC 4861 §7.2.6): from `ip` to all-nodes, override
/// flag, target link-layer address option.
pub(crate) fn unsolicited_na(ip: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum below
    icmp.extend_from_slice(&0x2000_0000u32.to_be_bytes()); // O (override), not R, not S
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&mac);
    let ck = icmpv6_checksum(ip, all_nodes, &icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());

    let mut f = eth([0x33, 0x33, 0, 0, 0, 1], mac, ETH_P_IPV6);
    f.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // version 6, no class or flow
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]); // ICMPv6; hop limit 255 as RFC 4861 requires
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// The frames that announce `dev`'s guest: one RARP per guest MAC, then a gratuitous ARP per
/// IPv4 guest IP and an unsolicited NA per IPv6 guest IP, each from the MAC it belongs to.
pub fn announce_frames(dev: &NetDev) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = dev.guest_macs.iter().map(|m| rarp(*m)).collect();
    for (ip, mac) in &dev.guest_ips {
        out.push(match ip {
            IpAddr::V4(v4) => garp(*v4, *mac),
            IpAddr::V6(v6) => unsolicited_na(*v6, *mac),
        });
    }
    out
}

/// Pause before each round: QEMU-like growing back-off (rounds start at 0, 50, 150, 300,
/// 500 ms, then every 200 ms).
const BACKOFF_MS: [u64; 5] = [0, 50, 100, 150, 200];

/// Write [`announce_frames`] `rounds` times into the tap fd. A write to a tap fd is a frame
/// coming from the guest: the bridge learns the guest MAC on the tap's port and floods the
/// frame. `tun_flags` and `vnet_hdr_sz` describe the fd: a `struct tun_pi` prefix unless
/// `IFF_NO_PI`, a zeroed virtio-net header (no offloads) of `vnet_hdr_sz` bytes with
/// `IFF_VNET_HDR`.
pub fn announce(
    fd: BorrowedFd<'_>,
    tun_flags: u16,
    vnet_hdr_sz: i32,
    dev: &NetDev,
    rounds: u32,
) -> Result<()> {
    let frames = announce_frames(dev);
    let err = |source| NetconfError::Announce {
        ifname: dev.name.clone(),
        source,
    };
    let hdr = if tun_flags & tun_flags::IFF_VNET_HDR != 0 {
        usize::try_from(vnet_hdr_sz).unwrap_or(0)
    } else {
        0
    };
    for round in 0..rounds {
        let pause = BACKOFF_MS[usize::try_from(round)
            .unwrap_or(usize::MAX)
            .min(BACKOFF_MS.len() - 1)];
        std::thread::sleep(Duration::from_millis(pause));
        for frame in &frames {
            let mut buf = Vec::with_capacity(4 + hdr + frame.len());
            if tun_flags & tun_flags::IFF_NO_PI == 0 {
                buf.extend_from_slice(&[0, 0]); // tun_pi.flags
                buf.extend_from_slice(&frame[12..14]); // tun_pi.proto, the ethertype
            }
            buf.resize(buf.len() + hdr, 0);
            buf.extend_from_slice(frame);
            let n = nix::unistd::write(fd, &buf).map_err(|e| err(std::io::Error::from(e)))?;
            if n != buf.len() {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!(
                        "short write of {n} of {} bytes on fd {}",
                        buf.len(),
                        fd.as_raw_fd()
                    ),
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    #[test]
    fn rarp_is_qemus_frame() {
        let f = rarp(MAC);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &MAC);
        assert_eq!(&f[38..42], &[0; 4]);
        assert!(f[42..].iter().all(|b| *b == 0));
    }

    #[test]
    fn garp_has_sender_equal_target() {
        let ip = Ipv4Addr::new(198, 18, 0, 7);
        let f = garp(ip, MAC);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &MAC);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[38..42], &ip.octets());
    }

    #[test]
    fn na_layout_and_checksum() {
        let ip: Ipv6Addr = "2001:2::5".parse().expect("v6");
        let f = unsolicited_na(ip, MAC);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[0..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(&f[18..20], &[0, 32]);
        assert_eq!(f[20], 58);
        assert_eq!(f[21], 255);
        assert_eq!(&f[22..38], &ip.octets());
        assert_eq!(
            &f[38..54],
            &"ff02::1".parse::<Ipv6Addr>().expect("v6").octets()
        );
        let icmp = &f[54..];
        assert_eq!(icmp[0], 136);
        assert_eq!(icmp[4], 0x20, "only the override flag");
        assert_eq!(&icmp[8..24], &ip.octets());
        assert_eq!(&icmp[24..26], &[2, 1]);
        assert_eq!(&icmp[26..32], &MAC);
        // A correct checksum makes the sum over pseudo-header and message come out as zero.
        assert_eq!(icmpv6_checksum(ip, "ff02::1".parse().expect("v6"), icmp), 0);
        // The value computed independently (a 10-line Python sum over the same bytes).
        assert_eq!(&icmp[2..4], &[0x14, 0x4e]);
    }

    #[test]
    fn frames_cover_every_guest_mac_and_ip() {
        let dev = NetDev {
            name: "tap0".into(),
            tun_flags: tun_flags::IFF_TAP | tun_flags::IFF_NO_PI,
            persist: false,
            owner: None,
            group: None,
            mac: None,
            mtu: 1500,
            up: true,
            addrs: vec![],
            routes: vec![],
            bridge: None,
            guest_macs: vec![MAC, [2, 0, 0, 0, 0, 0x43]],
            guest_ips: vec![
                ("198.18.0.9".parse().expect("v4"), MAC),
                ("2001:2::9".parse().expect("v6"), MAC),
            ],
            owned: false,
        };
        let f = announce_frames(&dev);
        let types: Vec<[u8; 2]> = f.iter().map(|f| [f[12], f[13]]).collect();
        assert_eq!(
            types,
            vec![[0x80, 0x35], [0x80, 0x35], [0x08, 0x06], [0x86, 0xdd]]
        );
        assert_eq!(&f[1][6..12], &[2, 0, 0, 0, 0, 0x43]);
    }
}
