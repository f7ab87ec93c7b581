//! `NETLINK_SOCK_DIAG` for AF_UNIX sockets: what a socket is connected to, whether it has a
//! name, its shutdown state. One exact request per socket inode (`unix_diag_req` with
//! `udiag_ino`), answered by one `unix_diag_msg` and its attributes. Written by hand: the
//! request is 40 bytes and the answer a handful of attributes, where a netlink crate would
//! bring a transport and a message framework along.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

use crate::{Result, SysError};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

pub const UDIAG_SHOW_NAME: u32 = 0x01;
pub const UDIAG_SHOW_PEER: u32 = 0x04;
pub const UDIAG_SHOW_RQLEN: u32 = 0x10;

const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// `TCP_ESTABLISHED`, `TCP_CLOSE`, `TCP_LISTEN` as unix sockets use them in `sk_state`.
pub const STATE_ESTABLISHED: u8 = 1;
pub const STATE_CLOSE: u8 = 7;
pub const STATE_LISTEN: u8 = 10;

/// What sock_diag tells about one AF_UNIX socket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnixDiag {
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub sock_type: u8,
    /// `sk_state` ([`STATE_ESTABLISHED`], [`STATE_CLOSE`], [`STATE_LISTEN`]).
    pub state: u8,
    pub ino: u32,
    /// Inode of the peer socket; 0 when there is none (never connected, or closed).
    pub peer: u32,
    /// The bound address (`sun_path` bytes; abstract names start with a NUL), if any.
    pub name: Option<Vec<u8>>,
    /// Bytes (stream, seqpacket) or the first message's length (dgram) queued for reading, and
    /// bytes sent but not yet read by the peer.
    pub rqueue: u32,
    pub wqueue: u32,
    /// `sk_shutdown`: 1 = RCV_SHUTDOWN, 2 = SEND_SHUTDOWN.
    pub shutdown: u8,
}

/// A sock_diag netlink socket in the network namespace of some process.
pub struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

impl SockDiag {
    /// A diag socket for the network namespace `pid` is in: unix sockets are looked up per
    /// namespace, so a vkernel in its own netns needs a socket made there.
    pub fn for_pid(pid: i32) -> Result<SockDiag> {
        let theirs = format!("/proc/{pid}/ns/net");
        let ino = |p: &str| {
            std::fs::metadata(p)
                .map(|m| m.ino())
                .map_err(|e| SysError::path(p, e))
        };
        let fd = if ino(&theirs)? == ino("/proc/self/ns/net")? {
            diag_socket()?
        } else {
            let ns = std::fs::File::open(&theirs).map_err(|e| SysError::path(&theirs, e))?;
            // setns affects only the calling thread: do it in a thread of its own, whose
            // socket stays in that namespace after the thread is gone.
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| SysError::errno("setns(net)", pid, e as i32))?;
                    diag_socket()
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(SysError::Unexpected {
                        pid,
                        what: "netns helper thread panicked".into(),
                    })
                })
            })?
        };
        Ok(SockDiag { fd, seq: 0 })
    }

    /// Everything about the unix socket with inode `ino`.
    pub fn unix(&mut self, ino: u32) -> Result<UnixDiag> {
        self.seq = self.seq.wrapping_add(1);
        let req = unix_request(
            ino,
            UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN,
            self.seq,
        );
        socket::send(self.fd.as_raw_fd(), &req, MsgFlags::empty())
            .map_err(|e| SysError::errno("send(sock_diag)", 0, e as i32))?;
        let mut buf = vec![0u8; 16384];
        let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| SysError::errno("recv(sock_diag)", 0, e as i32))?;
        match parse_unix_reply(&buf[..n]) {
            Ok(d) => Ok(d),
            Err(Reply::Errno(e)) => Err(SysError::errno("sock_diag(unix)", 0, e)),
            Err(Reply::Malformed(what)) => Err(SysError::Unexpected {
                pid: 0,
                what: format!("sent a malformed sock_diag answer ({what})"),
            }),
        }
    }
}

fn diag_socket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| SysError::errno("socket(NETLINK_SOCK_DIAG)", 0, e as i32))
}

/// `nlmsghdr` + `unix_diag_req` for one inode.
pub fn unix_request(ino: u32, show: u32, seq: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(&40u32.to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(libc::AF_UNIX as u8);
    m.push(0);
    m.extend_from_slice(&0u16.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(&ino.to_ne_bytes());
    m.extend_from_slice(&show.to_ne_bytes());
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    m.extend_from_slice(&u32::MAX.to_ne_bytes());
    m
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The kernel answered with an error (positive errno).
    Errno(i32),
    Malformed(&'static str),
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parses the answer to [`unix_request`]: one netlink message, an error or a `unix_diag_msg`
/// (16 bytes) followed by `nlattr`s.
pub fn parse_unix_reply(b: &[u8]) -> std::result::Result<UnixDiag, Reply> {
    let bad = Reply::Malformed;
    let len = u32_at(b, 0).ok_or(bad("short header"))? as usize;
    let ty = u16_at(b, 4).ok_or(bad("short header"))?;
    let msg = b.get(..len).ok_or(bad("truncated message"))?;
    if len < NLMSG_HDRLEN {
        return Err(bad("short header"));
    }
    if ty == NLMSG_ERROR {
        let err = u32_at(msg, NLMSG_HDRLEN).ok_or(bad("short error"))? as i32;
        return Err(Reply::Errno(if err < 0 { -err } else { libc::EIO }));
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return Err(bad("unexpected message type"));
    }
    let body = &msg[NLMSG_HDRLEN..];
    if body.len() < 16 || body[0] != libc::AF_UNIX as u8 {
        return Err(bad("not a unix_diag_msg"));
    }
    let mut d = UnixDiag {
        sock_type: body[1],
        state: body[2],
        ino: u32_at(body, 4).ok_or(bad("short unix_diag_msg"))?,
        ..UnixDiag::default()
    };
    let mut off = 16;
    while off + 4 <= body.len() {
        let alen = u16_at(body, off).ok_or(bad("short attribute"))? as usize;
        let aty = u16_at(body, off + 2).ok_or(bad("short attribute"))? & 0x3fff;
        if alen < 4 {
            return Err(bad("attribute shorter than its header"));
        }
        let payload = body
            .get(off + 4..off + alen)
            .ok_or(bad("attribute overruns the message"))?;
        match aty {
            UNIX_DIAG_NAME => d.name = Some(payload.to_vec()),
            UNIX_DIAG_PEER => d.peer = u32_at(payload, 0).ok_or(bad("short peer"))?,
            UNIX_DIAG_RQLEN => {
                d.rqueue = u32_at(payload, 0).ok_or(bad("short rqlen"))?;
                d.wqueue = u32_at(payload, 4).ok_or(bad("short rqlen"))?;
            }
            UNIX_DIAG_SHUTDOWN => d.shutdown = *payload.first().ok_or(bad("short shutdown"))?,
            _ => {}
        }
        off += (alen + 3) & !3;
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&(4 + payload.len() as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn reply(body: &[u8], ty: u16) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn request_layout() {
        let r = unix_request(0x1234, 0x15, 9);
        assert_eq!(r.len(), 40);
        assert_eq!(u32_at(&r, 0), Some(40));
        assert_eq!(u16_at(&r, 4), Some(20));
        assert_eq!(u32_at(&r, 8), Some(9));
        assert_eq!(r[16], 1);
        assert_eq!(u32_at(&r, 24), Some(0x1234));
        assert_eq!(u32_at(&r, 28), Some(0x15));
        assert_eq!(u32_at(&r, 32), Some(u32::MAX));
    }

    #[test]
    fn parses_a_socketpair_end() {
        let mut body = vec![1, 1, 1, 0];
        body.extend_from_slice(&777u32.to_ne_bytes());
        body.extend_from_slice(&[0xff; 8]);
        body.extend(attr(UNIX_DIAG_PEER, &778u32.to_ne_bytes()));
        let mut rq = 5u32.to_ne_bytes().to_vec();
        rq.extend_from_slice(&9u32.to_ne_bytes());
        body.extend(attr(UNIX_DIAG_RQLEN, &rq));
        body.extend(attr(UNIX_DIAG_SHUTDOWN, &[2]));
        let d = parse_unix_reply(&reply(&body, SOCK_DIAG_BY_FAMILY)).expect("parses");
        assert_eq!(
            d,
            UnixDiag {
                sock_type: 1,
                state: 1,
                ino: 777,
                peer: 778,
                name: None,
                rqueue: 5,
                wqueue: 9,
                shutdown: 2,
            }
        );
    }

    #[test]
    fn parses_a_name_and_odd_lengths() {
        let mut body = vec![1, 2, 7, 0];
        body.extend_from_slice(&5u32.to_ne_bytes());
        body.extend_from_slice(&[0xff; 8]);
        body.extend(attr(UNIX_DIAG_NAME, b"\0abc"));
        body.extend(attr(UNIX_DIAG_NAME + 100, b"x"));
        body.extend(attr(UNIX_DIAG_SHUTDOWN, &[3]));
        let d = parse_unix_reply(&reply(&body, SOCK_DIAG_BY_FAMILY)).expect("parses");
        assert_eq!(d.name.as_deref(), Some(&b"\0abc"[..]));
        assert_eq!(d.shutdown, 3);
        assert_eq!(d.sock_type, 2);
    }

    #[test]
    fn errors_and_garbage() {
        let mut body = (-libc::ENOENT).to_ne_bytes().to_vec();
        body.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse_unix_reply(&reply(&body, NLMSG_ERROR)),
            Err(Reply::Errno(libc::ENOENT))
        );
        assert!(matches!(
            parse_unix_reply(&[1, 2, 3]),
            Err(Reply::Malformed(_))
        ));
        let mut body = vec![1, 1, 1, 0];
        body.extend_from_slice(&[0; 12]);
        body.extend_from_slice(&200u16.to_ne_bytes());
        body.extend_from_slice(&2u16.to_ne_bytes());
        assert!(matches!(
            parse_unix_reply(&reply(&body, SOCK_DIAG_BY_FAMILY)),
            Err(Reply::Malformed(_))
        ));
    }
}
