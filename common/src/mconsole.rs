//! A client of User-Mode Linux's management console ("mconsole").
//!
//! UML listens on a datagram socket (`<uml_dir>/<umid>/mconsole`) for requests of the form
//! `{magic 0xcafebabe, version 2, len, data[512]}` (native endianness) and answers each to the
//! sender's address with `{err, more, len, data[512]}`, possibly in several parts (`more`).
//! vkmigrate uses `stop` and `go` to quiesce a UML at a consistent point: once `stop` has been
//! answered every guest process's state is in guest memory and the UML kernel process only
//! waits for the next request (see `research/uml-inventory.md` §4).
//!
//! Written by hand because it is 40 lines and no crate speaks this protocol.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::error::{CommonError, Result};

const MAGIC: u32 = 0xcafe_babe;
const VERSION: u32 = 2;
const MAX_DATA: usize = 512;
const HEADER: usize = 12;

/// How long a UML may take to answer one request. `stop` is answered from a kernel worker
/// once the guest has switched to it, which takes microseconds on an idle guest and up to a
/// scheduler tick on a busy one.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Send `command` to the mconsole socket at `socket` and return the reply's text. A reply with
/// its error flag set becomes [`CommonError::Mconsole`].
pub fn request(socket: &Path, command: &str) -> Result<String> {
    Client::connect(socket)?.request(command)
}

/// A client connected to one UML's mconsole socket. Connected, it reaches that socket by the
/// socket itself, not by its file's name: whatever becomes of the file (moved aside during a
/// migration, removed by another UML that cleans up the same umid directory), a UML stopped
/// through a client can always be told `go` through it.
#[derive(Debug)]
pub struct Client {
    sock: UnixDatagram,
    socket: String,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client> {
        let io = |step| CommonError::io(step);
        // UML replies to the sender's address, so the socket needs a name: an abstract one,
        // which leaves no file behind. Unique per process and client, since clients may run
        // in parallel.
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vkmigrate-mconsole-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let addr =
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(io("naming a socket"))?;
        let sock =
            UnixDatagram::bind_addr(&addr).map_err(io("binding an mconsole client socket"))?;
        sock.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io("setting a socket timeout"))?;
        let name = socket.display().to_string();
        sock.connect(socket)
            .map_err(|source| CommonError::MconsoleIo {
                socket: name.clone(),
                step: "connect to",
                source,
            })?;
        Ok(Client { sock, socket: name })
    }

    /// Send `command` and return the reply's text. A reply with its error flag set becomes
    /// [`CommonError::Mconsole`].
    pub fn request(&self, command: &str) -> Result<String> {
        if command.len() >= MAX_DATA {
            return Err(CommonError::InvalidArgument {
                reason: format!("mconsole command of {} bytes", command.len()),
            });
        }
        let mut req = Vec::with_capacity(HEADER + MAX_DATA);
        req.extend_from_slice(&MAGIC.to_ne_bytes());
        req.extend_from_slice(&VERSION.to_ne_bytes());
        req.extend_from_slice(&(command.len() as u32).to_ne_bytes());
        req.extend_from_slice(command.as_bytes());
        req.resize(HEADER + MAX_DATA, 0);
        self.sock
            .send(&req)
            .map_err(|source| CommonError::MconsoleIo {
                socket: self.socket.clone(),
                step: "send to",
                source,
            })?;
        let mut text = String::new();
        loop {
            let mut buf = [0u8; HEADER + MAX_DATA];
            let n = self
                .sock
                .recv(&mut buf)
                .map_err(|source| CommonError::MconsoleIo {
                    socket: self.socket.clone(),
                    step: "wait for the reply of",
                    source,
                })?;
            let (err, more, data) = parse_reply(&buf[..n])?;
            text.push_str(&String::from_utf8_lossy(data));
            if err != 0 {
                return Err(CommonError::Mconsole {
                    command: command.to_owned(),
                    reply: text,
                });
            }
            if more == 0 {
                return Ok(text);
            }
        }
    }
}

/// `(err, more, data)` of one reply datagram.
fn parse_reply(b: &[u8]) -> Result<(u32, u32, &[u8])> {
    let word = |i: usize| {
        b.get(i * 4..i * 4 + 4)
            .and_then(|w| <[u8; 4]>::try_from(w).ok())
            .map(u32::from_ne_bytes)
    };
    let (Some(err), Some(more), Some(len)) = (word(0), word(1), word(2)) else {
        return Err(CommonError::BadFrame {
            kind: 0,
            reason: format!("mconsole reply of {} bytes", b.len()),
        });
    };
    let len = (len as usize).min(MAX_DATA);
    let data = b
        .get(HEADER..HEADER + len)
        .unwrap_or(&b[HEADER.min(b.len())..]);
    // The data is NUL-terminated inside its length.
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    Ok((err, more, &data[..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(err: u32, more: u32, text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&err.to_ne_bytes());
        b.extend_from_slice(&more.to_ne_bytes());
        b.extend_from_slice(&(text.len() as u32 + 1).to_ne_bytes());
        b.extend_from_slice(text.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn parses_replies() {
        let b = reply(0, 0, "stopped");
        assert_eq!(parse_reply(&b).expect("test"), (0, 0, &b"stopped"[..]));
        let b = reply(1, 1, "Already stopped");
        assert_eq!(
            parse_reply(&b).expect("test"),
            (1, 1, &b"Already stopped"[..])
        );
        assert!(parse_reply(&[0; 8]).is_err());
    }

    /// A fake UML that answers one request: the client names itself and gets the answer.
    #[test]
    fn talks_to_a_listener() {
        let dir = std::env::temp_dir().join(format!("vkm-mconsole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test");
        let path = dir.join("mconsole");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("test");
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; HEADER + MAX_DATA];
            let (n, from) = server.recv_from(&mut buf).expect("test");
            assert_eq!(n, HEADER + MAX_DATA);
            assert_eq!(
                u32::from_ne_bytes(buf[0..4].try_into().expect("test")),
                MAGIC
            );
            let len = u32::from_ne_bytes(buf[8..12].try_into().expect("test")) as usize;
            assert_eq!(&buf[HEADER..HEADER + len], b"stop");
            let name = from.as_abstract_name().expect("test").to_vec();
            let to = SocketAddr::from_abstract_name(&name).expect("test");
            server
                .send_to_addr(&reply(0, 0, "stopped"), &to)
                .expect("test");
        });
        assert_eq!(request(&path, "stop").expect("test"), "stopped");
        t.join().expect("test");
        std::fs::remove_dir_all(&dir).expect("test");
    }

    /// Connected before the socket's file goes, a client still reaches it (what lets a
    /// migration that failed resume a UML whose file another UML's clean-up removed).
    #[test]
    fn a_client_reaches_the_socket_after_its_file_is_removed() {
        let dir = std::env::temp_dir().join(format!("vkm-mconsole-rm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test");
        let path = dir.join("mconsole");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).expect("test");
        let client = Client::connect(&path).expect("test");
        std::fs::remove_dir_all(&dir).expect("test");
        assert!(request(&path, "go").is_err(), "the path is gone");
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; HEADER + MAX_DATA];
            let (_, from) = server.recv_from(&mut buf).expect("test");
            let len = u32::from_ne_bytes(buf[8..12].try_into().expect("test")) as usize;
            let to = SocketAddr::from_abstract_name(from.as_abstract_name().expect("test"))
                .expect("test");
            let answer = format!(
                "got {}",
                String::from_utf8_lossy(&buf[HEADER..HEADER + len])
            );
            server
                .send_to_addr(&reply(0, 0, &answer), &to)
                .expect("test");
        });
        assert_eq!(client.request("go").expect("test"), "got go");
        t.join().expect("test");
    }
}
