//! `--net`: a minimal guest on a tap device, attached the way a vkernel such as UML attaches.
//!
//! vkload opens the existing tap itself and then holds nothing about the device but the
//! descriptor: a restore or live migration re-creates the tap elsewhere and puts a descriptor
//! attached to it back at the same number, so any cached ifindex or device state would be
//! stale. On it vkload answers ARP requests and ICMP echo requests for its own address and
//! ignores every other frame. What it did is published in the counters below, which the
//! console tick line prints.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::args::NetConfig;
use crate::check::{fail, OrFail};
use crate::sys;
use crate::workers::spawn;

/// Frames read from the tap, answered or not.
pub static RX: AtomicU64 = AtomicU64::new(0);
/// Frames written to the tap (ARP plus ICMP replies).
pub static TX: AtomicU64 = AtomicU64::new(0);
pub static ARP_REPLIES: AtomicU64 = AtomicU64::new(0);
pub static ECHO_REPLIES: AtomicU64 = AtomicU64::new(0);

/// The tick line's net fields, with a trailing space.
pub fn tick_fields() -> String {
    format!(
        "net_rx={} net_tx={} net_arp={} net_icmp={} ",
        RX.load(Ordering::Relaxed),
        TX.load(Ordering::Relaxed),
        ARP_REPLIES.load(Ordering::Relaxed),
        ECHO_REPLIES.load(Ordering::Relaxed),
    )
}

const ETH_HLEN: usize = 14;
/// Shortest Ethernet frame without FCS. A tap does not need padding, but replies then look
/// like a real NIC's to anything that captures them.
const ETH_ZLEN: usize = 60;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
const ARP_LEN: usize = 28;
const IPV4_HLEN: usize = 20;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const TTL: u8 = 64;
/// Larger than any tap MTU plus the Ethernet header: a shorter buffer would truncate frames.
const FRAME_MAX: usize = 65536 + ETH_HLEN;
/// Frames the single-threaded mode handles per tick, so that a flood cannot starve the tick.
const INLINE_FRAMES: usize = 64;
/// Retries of a reply the tap refuses with EAGAIN before it is dropped like a lost frame.
const SEND_TRIES: u32 = 10;

/// Who vkload is on the tap's segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Arp,
    Echo,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The Internet checksum (RFC 1071) of `data`; 0 over data that includes a correct one.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth_header(out: &mut Vec<u8>, dst: &[u8], src: &[u8; 6], ethertype: u16) {
    out.extend_from_slice(dst);
    out.extend_from_slice(src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// The reply `guest` owes to `frame`, if any.
pub fn respond(guest: &Guest, frame: &[u8]) -> Option<(Reply, Vec<u8>)> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let dst = &frame[0..6];
    let to_us = dst == guest.mac;
    if !to_us && dst != BROADCAST {
        return None;
    }
    let payload = &frame[ETH_HLEN..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => arp_reply(guest, payload).map(|f| (Reply::Arp, f)),
        // Echo requests to the broadcast MAC are not for us alone; Linux ignores them too.
        ETHERTYPE_IPV4 if to_us => {
            echo_reply(guest, &frame[6..12], payload).map(|f| (Reply::Echo, f))
        }
        _ => None,
    }
}

fn arp_reply(guest: &Guest, arp: &[u8]) -> Option<Vec<u8>> {
    if arp.len() < ARP_LEN {
        return None;
    }
    let ethernet_ipv4 = be16(arp, 0) == 1 && be16(arp, 2) == ETHERTYPE_IPV4;
    if !ethernet_ipv4 || arp[4] != 6 || arp[5] != 4 || be16(arp, 6) != 1 {
        return None;
    }
    let (sha, spa, tpa) = (&arp[8..14], &arp[14..18], &arp[24..28]);
    // The reply goes to the sender's hardware address, which must be one a station can have.
    if tpa != guest.ip.octets() || sha[0] & 1 != 0 || sha == [0; 6] {
        return None;
    }
    let mut out = Vec::with_capacity(ETH_ZLEN);
    eth_header(&mut out, sha, &guest.mac, ETHERTYPE_ARP);
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    out.extend_from_slice(&guest.mac);
    out.extend_from_slice(&guest.ip.octets());
    out.extend_from_slice(sha);
    out.extend_from_slice(spa);
    out.resize(ETH_ZLEN, 0);
    Some(out)
}

fn echo_reply(guest: &Guest, eth_src: &[u8], ip: &[u8]) -> Option<Vec<u8>> {
    if ip.len() < IPV4_HLEN || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < IPV4_HLEN || total < ihl || total > ip.len() || checksum(&ip[..ihl]) != 0 {
        return None;
    }
    // Fragments would need reassembly; a ping of up to the MTU never fragments.
    if be16(ip, 6) & 0x3fff != 0 || ip[9] != IPPROTO_ICMP || ip[16..20] != guest.ip.octets() {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    if src.is_unspecified() || src.is_broadcast() || src.is_multicast() {
        return None;
    }
    // Ethernet padding beyond the IP total length is not part of the ICMP message.
    let icmp = &ip[ihl..total];
    if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 || checksum(icmp) != 0 {
        return None;
    }
    let mut out = Vec::with_capacity((ETH_HLEN + IPV4_HLEN + icmp.len()).max(ETH_ZLEN));
    eth_header(&mut out, eth_src, &guest.mac, ETHERTYPE_IPV4);
    let h = out.len();
    // Options of the request (record route and the like) are not echoed: a plain header.
    let reply_total = u16::try_from(IPV4_HLEN + icmp.len()).ok()?;
    out.extend_from_slice(&[0x45, ip[1]]);
    out.extend_from_slice(&reply_total.to_be_bytes());
    out.extend_from_slice(&ip[4..6]);
    out.extend_from_slice(&[0, 0, TTL, IPPROTO_ICMP, 0, 0]);
    out.extend_from_slice(&guest.ip.octets());
    out.extend_from_slice(&src.octets());
    let sum = checksum(&out[h..h + IPV4_HLEN]);
    out[h + 10..h + 12].copy_from_slice(&sum.to_be_bytes());
    let i = out.len();
    out.extend_from_slice(icmp);
    out[i] = ICMP_ECHO_REPLY;
    out[i + 2..i + 4].copy_from_slice(&[0, 0]);
    let sum = checksum(&out[i..]);
    out[i + 2..i + 4].copy_from_slice(&sum.to_be_bytes());
    out.resize(out.len().max(ETH_ZLEN), 0);
    Some(out)
}

/// The tap descriptor and the guest that answers on it.
pub struct Responder {
    tap: File,
    guest: Guest,
    buf: Vec<u8>,
}

impl Responder {
    /// Attaches to the tap and announces the guest on stdout. The tap must exist already: it
    /// belongs to the operator (or vkmigrate), and one TUNSETIFF made would vanish with us.
    pub fn open(cfg: &NetConfig) -> Responder {
        let exists = sys::interface_exists(&cfg.tap).or_fail("looking up the tap");
        if !exists {
            fail(format_args!(
                "net: no interface '{}' in this network namespace (create the tap first, \
                 e.g. ip tuntap add dev {} mode tap)",
                cfg.tap, cfg.tap
            ));
        }
        let tap = sys::open_tap(&cfg.tap).or_fail(&format!("attaching to tap {}", cfg.tap));
        let line = format!(
            "vkload net tap={} ip={}/{} mac={} fd={}\n",
            cfg.tap,
            cfg.ip,
            cfg.prefix,
            cfg.mac_string(),
            tap.as_raw_fd()
        );
        let _ = sys::write_all_fd(1, line.as_bytes());
        Responder {
            tap,
            guest: Guest {
                mac: cfg.mac,
                ip: cfg.ip,
            },
            buf: vec![0; FRAME_MAX],
        }
    }

    /// Waits up to `timeout_ms` (-1: forever) for a frame and answers it. Returns whether a
    /// frame was read. The descriptor may be blocking or not (a restore reproduces whatever
    /// flags it had), hence poll first; EINTR and EAGAIN just mean "try again later".
    fn step(&mut self, timeout_ms: libc::c_int) -> bool {
        let fd = self.tap.as_raw_fd();
        let revents = match sys::poll_in(fd, timeout_ms) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Interrupted => return false,
            Err(e) => fail(format_args!("net: poll on tap fd {fd}: {e}")),
        };
        if revents & libc::POLLNVAL != 0 {
            fail(format_args!("net: tap fd {fd} is not open"));
        }
        if revents == 0 {
            return false;
        }
        // POLLERR (a tun descriptor detached from its device) is left to read to report.
        let n = match (&self.tap).read(&mut self.buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                return false
            }
            Err(e) => fail(format_args!("net: read from tap fd {fd}: {e}")),
        };
        RX.fetch_add(1, Ordering::Relaxed);
        if let Some((kind, frame)) = respond(&self.guest, &self.buf[..n]) {
            self.send(kind, &frame);
        }
        true
    }

    fn send(&self, kind: Reply, frame: &[u8]) {
        let fd = self.tap.as_raw_fd();
        let mut tries = 0;
        loop {
            match (&self.tap).write(frame) {
                Ok(n) if n == frame.len() => break,
                Ok(n) => fail(format_args!(
                    "net: short write to tap fd {fd}: {n} of {} bytes",
                    frame.len()
                )),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock && tries < SEND_TRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // A full tap queue is congestion, not a broken restore: the peer retries.
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => fail(format_args!("net: write to tap fd {fd}: {e}")),
            }
        }
        TX.fetch_add(1, Ordering::Relaxed);
        match kind {
            Reply::Arp => ARP_REPLIES.fetch_add(1, Ordering::Relaxed),
            Reply::Echo => ECHO_REPLIES.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// The threads mode: a thread that sleeps in poll on the tap, as a vkernel's would.
    pub fn spawn(mut self) {
        spawn("vkl-net", move || loop {
            self.step(-1);
        });
    }

    /// The single-threaded mode: what has arrived since the last tick.
    pub fn tick(&mut self) {
        for _ in 0..INLINE_FRAMES {
            if !self.step(0) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
            .collect()
    }

    const GUEST: Guest = Guest {
        mac: [0x02, 0x00, 0xc6, 0x12, 0x07, 0x02],
        ip: Ipv4Addr::new(198, 18, 7, 2),
    };
    const HOST_MAC: [u8; 6] = [0xea, 0xf2, 0xdf, 0xd4, 0x9b, 0x5d];

    /// Captured on a tap: Linux resolving 198.18.7.2 from 198.18.7.1.
    const ARP_REQUEST: &str = "ffffffffffffeaf2dfd49b5d08060001080006040001eaf2dfd49b5d\
                               c6120701000000000000c6120702";
    /// Captured on a tap: `ping -s 24 198.18.7.2` from 198.18.7.1 (id 0x4811, seq 1).
    const ECHO_REQUEST: &str = "0200c6120702eaf2dfd49b5d080045000034220c400040017e95c6120701\
                                c61207020800a8f048110001ab0d136b00000000fb330100000000001011\
                                121314151617";

    #[test]
    fn checksum_of_known_packets() {
        let f = hex(ECHO_REQUEST);
        let (ip, icmp) = (&f[14..34], &f[34..]);
        // Both captured checksums verify, and recomputing them gives the kernel's values.
        assert_eq!(checksum(ip), 0);
        assert_eq!(checksum(icmp), 0);
        let mut ip = ip.to_vec();
        ip[10..12].fill(0);
        assert_eq!(checksum(&ip), 0x7e95);
        let mut icmp = icmp.to_vec();
        icmp[2..4].fill(0);
        assert_eq!(checksum(&icmp), 0xa8f0);
        // RFC 1071's example, and an odd length (the last byte is the high half of a word).
        assert_eq!(
            !checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        assert_eq!(checksum(&[0x12, 0x34, 0x56]), !(0x1234u16 + 0x5600));
    }

    #[test]
    fn arp_reply_fields() {
        let (kind, r) = respond(&GUEST, &hex(ARP_REQUEST)).expect("a reply");
        assert_eq!(kind, Reply::Arp);
        assert_eq!(r.len(), ETH_ZLEN);
        // Unicast to the requester, from us.
        assert_eq!(r[0..6], HOST_MAC);
        assert_eq!(r[6..12], GUEST.mac);
        assert_eq!(be16(&r, 12), ETHERTYPE_ARP);
        let a = &r[14..14 + ARP_LEN];
        assert_eq!(a[0..8], [0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        assert_eq!(a[8..14], GUEST.mac);
        assert_eq!(a[14..18], [198, 18, 7, 2]);
        assert_eq!(a[18..24], HOST_MAC);
        assert_eq!(a[24..28], [198, 18, 7, 1]);
        assert!(r[14 + ARP_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn arp_ignored() {
        let req = hex(ARP_REQUEST);
        let other_ip = Guest {
            ip: Ipv4Addr::new(198, 18, 7, 3),
            ..GUEST
        };
        assert!(respond(&other_ip, &req).is_none());
        let mut reply = req.clone();
        reply[21] = 2;
        assert!(
            respond(&GUEST, &reply).is_none(),
            "an ARP reply is not answered"
        );
        let mut elsewhere = req.clone();
        elsewhere[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        assert!(
            respond(&GUEST, &elsewhere).is_none(),
            "unicast to someone else"
        );
        assert!(respond(&GUEST, &req[..40]).is_none(), "truncated");
        // A unicast request to our MAC (the kernel's NUD probe) is answered.
        let mut probe = req;
        probe[0..6].copy_from_slice(&GUEST.mac);
        assert!(respond(&GUEST, &probe).is_some());
    }

    #[test]
    fn echo_reply_of_known_packet() {
        let (kind, r) = respond(&GUEST, &hex(ECHO_REQUEST)).expect("a reply");
        assert_eq!(kind, Reply::Echo);
        // Worked out by hand: the same IP id, no DF, TTL 64, addresses swapped, ICMP type 0
        // whose checksum is the request's plus 0x0800.
        let want = hex(
            "eaf2dfd49b5d0200c6120702080045000034220c00004001be95c6120702c6120701\
             0000b0f048110001ab0d136b00000000fb330100000000001011121314151617",
        );
        assert_eq!(r, want);
        assert_eq!(checksum(&r[14..34]), 0);
        assert_eq!(checksum(&r[34..]), 0);
    }

    #[test]
    fn echo_with_options_and_padding() {
        // The captured request with a 4-byte IP option (NOP x4) and Ethernet padding.
        let f = hex(ECHO_REQUEST);
        let mut ip = f[14..34].to_vec();
        ip[0] = 0x46;
        ip[2..4].copy_from_slice(&(0x34u16 + 4).to_be_bytes());
        ip.extend_from_slice(&[1, 1, 1, 1]);
        ip[10..12].fill(0);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut req = f[..14].to_vec();
        req.extend_from_slice(&ip);
        req.extend_from_slice(&f[34..]);
        req.extend_from_slice(&[0xaa; 6]);
        let (_, r) = respond(&GUEST, &req).expect("a reply");
        assert_eq!(r[14], 0x45);
        assert_eq!(be16(&r, 16), 0x34);
        assert_eq!(checksum(&r[14..34]), 0);
        assert_eq!(
            r[34..],
            hex(ECHO_REQUEST)[34..]
                .iter()
                .enumerate()
                .map(|(i, &b)| match i {
                    0 => 0,
                    2 => 0xb0,
                    _ => b,
                })
                .collect::<Vec<_>>()[..]
        );
    }

    #[test]
    fn echo_ignored() {
        let req = hex(ECHO_REQUEST);
        let check = |f: &[u8], why: &str| assert!(respond(&GUEST, f).is_none(), "{why}");
        let mut bcast = req.clone();
        bcast[0..6].fill(0xff);
        check(&bcast, "broadcast MAC");
        let mut bad_ip_sum = req.clone();
        bad_ip_sum[24] ^= 1;
        check(&bad_ip_sum, "bad IP checksum");
        let mut bad_icmp_sum = req.clone();
        bad_icmp_sum[40] ^= 1;
        check(&bad_icmp_sum, "bad ICMP checksum");
        let other_ip = Guest {
            ip: Ipv4Addr::new(198, 18, 7, 3),
            ..GUEST
        };
        assert!(respond(&other_ip, &req).is_none(), "other IP");
        check(&req[..req.len() - 1], "shorter than the IP total length");
        // An echo reply (type 0) with a correct checksum.
        let mut reply = req.clone();
        reply[34] = 0;
        reply[36..38].copy_from_slice(&0xb0f0u16.to_be_bytes());
        check(&reply, "echo reply");
        // A fragment (MF set), with the IP checksum fixed up.
        let mut frag = req.clone();
        frag[20] |= 0x20;
        frag[24..26].fill(0);
        let sum = checksum(&frag[14..34]);
        frag[24..26].copy_from_slice(&sum.to_be_bytes());
        check(&frag, "fragment");
        let mut v6 = req.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        check(&v6, "IPv6 ethertype");
        check(&req[..13], "runt");
    }
}
