//! Transport settings for bulk transfer on a LAN.
//!
//! quinn's defaults are sized for the Internet: 1.25 MB of stream receive window, 10 MB of
//! send window, 1200-byte packets growing at most to 1452 bytes, a congestion window starting
//! at about 14 KB, and the kernel's default socket buffers. On a LAN or loopback a migration
//! sends gigabytes at several GB/s, so each of those is raised (see `Tuning::bulk` and the
//! `quic` benchmark for what each one is worth).
//!
//! What mattered, measured on loopback (2 cores, both sides on one machine):
//! - datagram size: 64 KB datagrams (the loopback MTU) instead of 1452 bytes, with GSO off
//!   for them (quinn-udp silently drops GSO sends over 64 KB in all);
//! - windows of a few MB, not more: bigger windows let tens of MB queue in the receiver's
//!   socket buffer, the data leaves the CPU caches before it is decrypted, and throughput
//!   falls by half (128 MB windows: ~1.3 GB/s; 16 MB: ~2.5 GB/s);
//! - socket buffers that hold a full window, so that nothing is dropped (a loss also cuts
//!   the congestion window and can make quinn fall back to small datagrams).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

/// The congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

/// Settings of a QUIC endpoint and its connections. Both sides should use the same.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Receive window of each stream: how much a stream may run ahead of the reader.
    pub stream_receive_window: u64,
    /// Receive window of the whole connection (all streams).
    pub receive_window: u64,
    /// Bytes the sender buffers for unacknowledged data (all streams).
    pub send_window: u64,
    pub congestion: Congestion,
    /// Initial congestion window in bytes (`None`: RFC 9002's, 14720 bytes or two datagrams);
    /// never less than two datagrams.
    pub initial_window: Option<u64>,
    /// Largest UDP payload we send or accept (advertised to the peer). A connection starts
    /// with the largest datagram the kernel's route to the peer allows, up to this (1472
    /// bytes on Ethernet, about 9 KB with jumbo frames, 64 KB on loopback), and falls back to
    /// 1200 bytes and path MTU discovery if those are lost on the way.
    pub max_udp_payload: u16,
    /// SO_SNDBUF and SO_RCVBUF of the UDP socket in bytes (0: the kernel's default). Above
    /// net.core.[rw]mem_max this needs CAP_NET_ADMIN (the FORCE variants); without it the
    /// kernel's maximum is used.
    pub socket_buffer: usize,
    /// Segmentation offload (GSO): one send call for up to 10 datagrams, on paths whose
    /// datagrams are small enough for it (see `Tuning::plan`).
    pub gso: bool,
    /// How many unidirectional (bulk) streams the peer may open at once.
    pub max_uni_streams: u32,
    /// A connection without a packet from the peer for this long is lost.
    pub idle_timeout: Duration,
    /// Ping the peer this often when otherwise idle, so that the idle timeout only fires when
    /// the peer or the link is gone.
    pub keep_alive: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning::bulk()
    }
}

impl Tuning {
    /// For bulk transfer on a LAN or loopback (the default).
    pub fn bulk() -> Tuning {
        Tuning {
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 16 << 20,
            congestion: Congestion::Cubic,
            initial_window: Some(4 << 20),
            max_udp_payload: 65527,
            socket_buffer: 32 << 20,
            gso: true,
            max_uni_streams: 64,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(1),
        }
    }

    /// quinn's own defaults, for comparison (the benchmark's baseline).
    pub fn quinn_defaults() -> Tuning {
        Tuning {
            stream_receive_window: 1_250_000,
            receive_window: VarInt::MAX.into_inner(),
            send_window: 10_000_000,
            congestion: Congestion::Cubic,
            initial_window: None,
            max_udp_payload: 1452,
            socket_buffer: 0,
            gso: true,
            max_uni_streams: 100,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(1),
        }
    }

    /// The transport configuration of a connection to or from `peer`: datagram size and GSO
    /// follow the MTU of the kernel's route to it (see `PathPlan`).
    pub(crate) fn transport_config(&self, peer: SocketAddr) -> TransportConfig {
        self.transport_config_for(self.plan(route_mtu(peer).map(|m| udp_payload(m, peer))))
    }

    pub(crate) fn transport_config_for(&self, plan: PathPlan) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.stream_receive_window(varint(self.stream_receive_window))
            .receive_window(varint(self.receive_window))
            .send_window(self.send_window)
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams))
            .max_concurrent_bidi_streams(VarInt::from_u32(4))
            .enable_segmentation_offload(plan.gso)
            .initial_mtu(plan.initial_mtu)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        let mut mtud = MtuDiscoveryConfig::default();
        mtud.upper_bound(plan.upper_bound)
            .black_hole_cooldown(Duration::from_secs(10));
        t.mtu_discovery_config(Some(mtud));
        // quinn's controllers start at 14720 bytes whatever the datagram size: less than one
        // 64 KB datagram, and then nothing but keep-alives is ever sent. At least two
        // datagrams (RFC 9002, 7.2).
        let mtu = u64::from(plan.initial_mtu);
        let window = self
            .initial_window
            .unwrap_or_else(|| (10 * mtu).min(14720.max(2 * mtu)))
            .max(2 * mtu);
        match self.congestion {
            Congestion::Cubic => {
                let mut c = CubicConfig::default();
                c.initial_window(window);
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::NewReno => {
                let mut c = NewRenoConfig::default();
                c.initial_window(window);
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::Bbr => {
                let mut c = BbrConfig::default();
                c.initial_window(window);
                t.congestion_controller_factory(Arc::new(c));
            }
        }
        t
    }

    /// Datagram size and GSO for a path whose largest UDP payload is `link_payload` (from the
    /// route's MTU; `None` if unknown).
    ///
    /// quinn sends up to 10 datagrams per GSO call, and Linux refuses (EMSGSIZE, which
    /// quinn-udp ignores: the packets are silently lost) a GSO send of more than 65507 bytes
    /// in all. So with GSO a datagram may carry at most 6550 bytes. On paths that carry 32 KB
    /// or more (loopback: 64 KB), GSO is turned off instead: one large datagram per send call
    /// costs less than ten small ones. Jumbo frames (9000) keep GSO with 6550-byte datagrams,
    /// which measured faster on loopback than 8972-byte datagrams sent one by one.
    pub(crate) fn plan(&self, link_payload: Option<u16>) -> PathPlan {
        let limit = self.max_udp_payload.clamp(MIN_MTU, MAX_UDP_PAYLOAD);
        match link_payload.map(|p| p.clamp(MIN_MTU, limit)) {
            Some(p) if p >= LARGE_DATAGRAM => PathPlan {
                initial_mtu: p,
                upper_bound: p,
                gso: false,
            },
            Some(p) => {
                let p = if self.gso { p.min(GSO_MAX_PAYLOAD) } else { p };
                PathPlan {
                    initial_mtu: p,
                    upper_bound: p,
                    gso: self.gso,
                }
            }
            // Unknown: start small and discover.
            None => PathPlan {
                initial_mtu: MIN_MTU,
                upper_bound: if self.gso {
                    limit.min(GSO_MAX_PAYLOAD)
                } else {
                    limit
                },
                gso: self.gso,
            },
        }
    }

    pub(crate) fn endpoint_config(&self) -> EndpointConfig {
        let mut e = EndpointConfig::default();
        // Cannot fail: 1200 ≤ max_udp_payload ≤ 65527 is all quinn asks, and we clamp.
        let _ = e.max_udp_payload_size(self.max_udp_payload.clamp(1200, 65527));
        e
    }

    /// A UDP socket bound to `addr` with the buffers asked for.
    pub(crate) fn udp_socket(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            // `[::]:port` also takes IPv4, as a daemon listening on all addresses expects.
            let _ = sock.set_only_v6(false);
        }
        if self.socket_buffer > 0 {
            set_buffers(&sock, self.socket_buffer);
        }
        sock.bind(&addr.into())?;
        Ok(sock.into())
    }
}

/// The smallest datagram QUIC allows, and the largest UDP payload.
const MIN_MTU: u16 = 1200;
const MAX_UDP_PAYLOAD: u16 = 65527;
/// The largest datagram that 10 GSO segments can carry (65507 / 10).
const GSO_MAX_PAYLOAD: u16 = 6550;
/// From this datagram size on, GSO is left off (see `Tuning::plan`).
const LARGE_DATAGRAM: u16 = 32768;

/// How a connection sends datagrams on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathPlan {
    /// The datagram size to start with (quinn's "MTU": UDP payload bytes).
    pub initial_mtu: u16,
    /// The largest size MTU discovery probes for.
    pub upper_bound: u16,
    pub gso: bool,
}

/// The MTU of the kernel's route to `peer`, from a UDP socket connected to it (nothing is
/// sent). IPv4 only; `None` for IPv6 or on error.
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    use nix::sys::socket::{getsockopt, sockopt};
    if !peer.is_ipv4() {
        return None;
    }
    let sock = UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    sock.connect(peer).ok()?;
    let mtu = getsockopt(&sock, sockopt::IpMtu).ok()?;
    u32::try_from(mtu).ok()
}

/// The largest UDP payload in an IP packet of `mtu` bytes to `peer`.
fn udp_payload(mtu: u32, peer: SocketAddr) -> u16 {
    let (headers, max) = if peer.is_ipv4() {
        (28, 65507)
    } else {
        (48, 65527)
    };
    u16::try_from(mtu.saturating_sub(headers).min(max)).unwrap_or(u16::MAX)
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

/// SO_SNDBUF/SO_RCVBUF of `bytes`: the FORCE variants when we may (CAP_NET_ADMIN), else the
/// plain ones, which the kernel caps at net.core.[rw]mem_max. Best effort: a small buffer
/// costs speed, not correctness.
fn set_buffers(sock: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let fd = sock.as_fd();
    if setsockopt(&fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    if setsockopt(&fd, sockopt::SndBufForce, &bytes).is_err() {
        let _ = sock.set_send_buffer_size(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_size_and_gso_follow_the_path() {
        let t = Tuning::bulk();
        let plan = |p| t.plan(p);
        // Ethernet: full-size datagrams, GSO.
        assert_eq!(
            plan(Some(1472)),
            PathPlan {
                initial_mtu: 1472,
                upper_bound: 1472,
                gso: true
            }
        );
        // Between: capped so that 10 GSO segments fit in one send.
        assert_eq!(plan(Some(7000)).initial_mtu, GSO_MAX_PAYLOAD);
        assert!(plan(Some(7000)).gso);
        // Jumbo frames: GSO still beats 9 KB datagrams one by one.
        assert_eq!(plan(Some(8972)).initial_mtu, GSO_MAX_PAYLOAD);
        // Loopback: one 64 KB datagram per send, no GSO.
        assert_eq!(
            plan(Some(65507)),
            PathPlan {
                initial_mtu: 65507,
                upper_bound: 65507,
                gso: false
            }
        );
        // Unknown path: discover, within what GSO allows.
        assert_eq!(
            plan(None),
            PathPlan {
                initial_mtu: 1200,
                upper_bound: GSO_MAX_PAYLOAD,
                gso: true
            }
        );
        assert_eq!(
            udp_payload(65536, "127.0.0.1:1".parse().expect("addr")),
            65507
        );
        assert_eq!(udp_payload(1500, "10.0.0.1:1".parse().expect("addr")), 1472);
        assert_eq!(udp_payload(1500, "[::1]:1".parse().expect("addr")), 1452);
    }

    #[test]
    fn loopback_route_mtu_is_known() {
        let mtu = route_mtu("127.0.0.1:9".parse().expect("addr"));
        assert!(mtu.is_some_and(|m| m >= 1280), "{mtu:?}");
    }
}
