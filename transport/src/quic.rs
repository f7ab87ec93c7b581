//! QUIC endpoints and connections: a server (`listen`) and a client (`send`), both
//! authenticated by certificates of the fleet CA, one control stream per connection and any
//! number of unidirectional bulk streams.
//!
//! Establishing a connection has two steps. The TLS 1.3 handshake verifies both certificates:
//! a client without one, or with one of another CA, fails the server's verification and the
//! server closes the connection with a TLS alert before it has read any application data
//! (quinn delivers no stream of a connection whose handshake has not completed). Then the client
//! opens the control stream with a hello and the server answers it. The answer is what tells
//! the client that the *server* accepted its certificate: in TLS 1.3 the client finishes its
//! half of the handshake one round trip before the server has checked the client certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};

use crate::tls::TlsDir;
use crate::tuning::Tuning;
use crate::Error;

/// The control stream's first bytes, in both directions: magic and transport version.
const HELLO: [u8; 8] = *b"VKMT\x00\x01\x00\x00";
/// The first bytes of every bulk stream, followed by the stream's index (u32, little endian).
const BULK_MAGIC: [u8; 4] = *b"VKMB";
/// Control messages go before queued bulk data (quinn sends higher priorities first).
const CONTROL_PRIORITY: i32 = 1;
/// How long the server waits for the client's hello after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest control message `Control::recv` accepts.
pub const MAX_CONTROL_MESSAGE: usize = 64 << 20;

/// Application close code for a normal end of a connection.
pub const CLOSE_OK: u32 = 0;

/// A QUIC server: the `listen` side.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    /// The configuration of each incoming connection, before its path is known.
    config: quinn::ServerConfig,
    tuning: Tuning,
}

impl Server {
    /// Listen on `addr` (port 0: any free port; see `local_addr`). Must be called inside a
    /// tokio runtime.
    pub fn bind(addr: SocketAddr, tls: &TlsDir, tuning: &Tuning) -> Result<Server, Error> {
        let crypto = QuicServerConfig::try_from(tls.server_config()?)
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(tuning.transport_config_for(tuning.plan(None))));
        let socket = tuning
            .udp_socket(addr)
            .map_err(|source| Error::Bind { addr, source })?;
        let runtime = quinn::default_runtime().ok_or(Error::NoRuntime)?;
        let endpoint = quinn::Endpoint::new(
            tuning.endpoint_config(),
            Some(config.clone()),
            socket,
            runtime,
        )
        .map_err(|source| Error::Bind { addr, source })?;
        Ok(Server {
            endpoint,
            config,
            tuning: tuning.clone(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })
    }

    /// The next connection attempt, before its handshake; `None` once the server is closed.
    /// Complete it with `Incoming::accept` (in a task of its own, so that a slow or hostile
    /// peer does not hold up the others).
    pub async fn incoming(&self) -> Option<Incoming> {
        let inner = self.endpoint.accept().await?;
        // Datagram size and GSO for this client's path.
        let mut config = self.config.clone();
        config.transport_config(Arc::new(
            self.tuning.transport_config(inner.remote_address()),
        ));
        Some(Incoming { inner, config })
    }

    /// The next connection whose handshake and hello succeed; `None` once the server is
    /// closed. Attempts that fail are returned as errors (the caller logs them and goes on).
    pub async fn accept(&self) -> Option<Result<Session, Error>> {
        let incoming = self.incoming().await?;
        Some(incoming.accept().await)
    }

    /// Refuse new connections and close the open ones.
    pub fn close(&self) {
        self.endpoint
            .close(VarInt::from_u32(CLOSE_OK), b"server closing");
    }

    /// Wait until every connection is closed and its peer has been told.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// A connection attempt to a server, before the handshake.
#[derive(Debug)]
pub struct Incoming {
    inner: quinn::Incoming,
    config: quinn::ServerConfig,
}

impl Incoming {
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Complete the handshake (verifying the client's certificate) and answer the client's
    /// hello on the control stream.
    pub async fn accept(self) -> Result<Session, Error> {
        let peer = self.inner.remote_address();
        let connecting = self
            .inner
            .accept_with(Arc::new(self.config))
            .map_err(|e| handshake_error(peer, e))?;
        let conn = connecting.await.map_err(|e| handshake_error(peer, e))?;
        let hello = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| lost(peer, e))?;
            let mut buf = [0u8; HELLO.len()];
            recv.read_exact(&mut buf)
                .await
                .map_err(|e| read_exact_error(peer, "read the hello", e))?;
            Ok::<_, Error>((send, recv, buf))
        };
        let (mut send, recv, buf) = match tokio::time::timeout(HELLO_TIMEOUT, hello).await {
            Ok(r) => r?,
            Err(_) => {
                conn.close(VarInt::from_u32(1), b"no hello");
                return Err(Error::NoHello { peer });
            }
        };
        if buf != HELLO {
            conn.close(VarInt::from_u32(1), b"bad hello");
            return Err(Error::BadHello { peer });
        }
        let _ = send.set_priority(CONTROL_PRIORITY);
        send.write_all(&HELLO)
            .await
            .map_err(|e| stream_error(peer, "send the hello", e))?;
        Ok(Session {
            control: Control { send, recv, peer },
            conn: Connection {
                inner: conn,
                endpoint: None,
            },
        })
    }
}

/// Connect to the server at `addr`, whose certificate must carry `server_name` (its host name
/// or IP address, as given to `pki issue`) and be signed by the fleet CA; present our own.
/// Returns once the server has accepted our certificate too. Must be called inside a tokio
/// runtime.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    tls: &TlsDir,
    tuning: &Tuning,
) -> Result<Session, Error> {
    let crypto = QuicClientConfig::try_from(tls.client_config()?)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config(addr)));
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = tuning.udp_socket(local).map_err(|source| Error::Bind {
        addr: local,
        source,
    })?;
    let runtime = quinn::default_runtime().ok_or(Error::NoRuntime)?;
    let endpoint = quinn::Endpoint::new(tuning.endpoint_config(), None, socket, runtime).map_err(
        |source| Error::Bind {
            addr: local,
            source,
        },
    )?;
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|source| Error::Connect { peer: addr, source })?;
    let conn = connecting.await.map_err(|e| handshake_error(addr, e))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(addr, e))?;
    let _ = send.set_priority(CONTROL_PRIORITY);
    send.write_all(&HELLO)
        .await
        .map_err(|e| stream_error(addr, "send the hello", e))?;
    let mut buf = [0u8; HELLO.len()];
    recv.read_exact(&mut buf)
        .await
        .map_err(|e| read_exact_error(addr, "read the hello", e))?;
    if buf != HELLO {
        conn.close(VarInt::from_u32(1), b"bad hello");
        return Err(Error::BadHello { peer: addr });
    }
    Ok(Session {
        control: Control {
            send,
            recv,
            peer: addr,
        },
        conn: Connection {
            inner: conn,
            endpoint: Some(endpoint),
        },
    })
}

/// An established, mutually authenticated connection and its control stream.
#[derive(Debug)]
pub struct Session {
    pub conn: Connection,
    pub control: Control,
}

/// An established connection.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    /// The client's own endpoint, kept so that `wait_closed` can flush the close.
    endpoint: Option<quinn::Endpoint>,
}

impl Connection {
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// The peer's certificate chain (DER), as verified in the handshake.
    pub fn peer_certificates(&self) -> Vec<Vec<u8>> {
        self.inner
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .map(|chain| chain.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default()
    }

    /// The current estimate of the round-trip time.
    pub fn rtt(&self) -> std::time::Duration {
        self.inner.rtt()
    }

    /// The common name of the peer's certificate: the host name it was issued for.
    pub fn peer_name(&self) -> Option<String> {
        let chain = self.peer_certificates();
        let der = chain.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?;
        cn.as_str().ok().map(str::to_owned)
    }

    /// Open bulk stream number `index`: a unidirectional stream whose first bytes tell the
    /// peer its index. Write with `write_chunk` (no copy) or `write_all`; `finish` it at the
    /// end.
    pub async fn open_bulk(&self, index: u32) -> Result<SendStream, Error> {
        let peer = self.remote_address();
        let mut s = self.inner.open_uni().await.map_err(|e| lost(peer, e))?;
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&BULK_MAGIC);
        header[4..].copy_from_slice(&index.to_le_bytes());
        s.write_all(&header)
            .await
            .map_err(|e| stream_error(peer, "open a bulk stream", e))?;
        Ok(s)
    }

    /// Open bulk streams `0..n`.
    pub async fn open_bulk_streams(&self, n: u32) -> Result<Vec<SendStream>, Error> {
        let mut v = Vec::with_capacity(n as usize);
        for i in 0..n {
            v.push(self.open_bulk(i).await?);
        }
        Ok(v)
    }

    /// The next bulk stream the peer opened, with its index. `Ok(None)` when the peer closed
    /// the connection normally (`close(CLOSE_OK, ..)`).
    pub async fn accept_bulk(&self) -> Result<Option<(u32, RecvStream)>, Error> {
        let peer = self.remote_address();
        let mut s = match self.inner.accept_uni().await {
            Ok(s) => s,
            Err(ConnectionError::ApplicationClosed(c))
                if c.error_code == VarInt::from_u32(CLOSE_OK) =>
            {
                return Ok(None)
            }
            Err(ConnectionError::LocallyClosed) => return Ok(None),
            Err(e) => return Err(lost(peer, e)),
        };
        let mut header = [0u8; 8];
        s.read_exact(&mut header)
            .await
            .map_err(|e| read_exact_error(peer, "read a bulk stream header", e))?;
        if header[..4] != BULK_MAGIC {
            return Err(Error::BadBulkStream { peer });
        }
        let mut idx = [0u8; 4];
        idx.copy_from_slice(&header[4..]);
        Ok(Some((u32::from_le_bytes(idx), s)))
    }

    /// Close the connection (`CLOSE_OK` for a normal end); streams end at once, so finish and
    /// wait for what must arrive first.
    pub fn close(&self, code: u32, reason: &str) {
        self.inner.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Wait until the connection is closed, by either side; returns why.
    pub async fn closed(&self) -> ConnectionError {
        self.inner.closed().await
    }

    /// After `close`: wait until the peer has been told (client side; a server waits with
    /// `Server::wait_idle`).
    pub async fn wait_closed(&self) {
        if let Some(e) = &self.endpoint {
            e.wait_idle().await;
        }
    }

    /// Round-trip time, congestion window, bytes and packets so far.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.inner.stats()
    }

    /// The quinn connection, for what this wrapper does not offer.
    pub fn quinn(&self) -> &quinn::Connection {
        &self.inner
    }
}

/// The control stream: length-prefixed messages both ways (u32 little endian length, then
/// the message; the migration protocol decides what a message holds).
#[derive(Debug)]
pub struct Control {
    pub send: SendStream,
    pub recv: RecvStream,
    peer: SocketAddr,
}

impl Control {
    /// Send one message.
    pub async fn send(&mut self, msg: &[u8]) -> Result<(), Error> {
        let len = u32::try_from(msg.len())
            .ok()
            .filter(|&l| l as usize <= MAX_CONTROL_MESSAGE)
            .ok_or(Error::MessageTooLarge {
                len: msg.len(),
                max: MAX_CONTROL_MESSAGE,
            })?;
        self.send
            .write_all(&len.to_le_bytes())
            .await
            .map_err(|e| stream_error(self.peer, "send a control message", e))?;
        self.send
            .write_all(msg)
            .await
            .map_err(|e| stream_error(self.peer, "send a control message", e))
    }

    /// Receive one message; `Ok(None)` if the peer finished the stream between messages.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let mut len = [0u8; 4];
        // A clean end of stream is only allowed before the first byte of a length.
        match self.recv.read(&mut len[..1]).await {
            Ok(None) => return Ok(None),
            Ok(Some(_)) => {}
            Err(e) => return Err(stream_error(self.peer, "read a control message", e)),
        }
        self.recv
            .read_exact(&mut len[1..])
            .await
            .map_err(|e| read_exact_error(self.peer, "read a control message", e))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_CONTROL_MESSAGE {
            return Err(Error::MessageTooLarge {
                len,
                max: MAX_CONTROL_MESSAGE,
            });
        }
        let mut msg = vec![0u8; len];
        self.recv
            .read_exact(&mut msg)
            .await
            .map_err(|e| read_exact_error(self.peer, "read a control message", e))?;
        Ok(Some(msg))
    }

    /// End our direction of the control stream (the peer's `recv` then returns `None`).
    pub fn finish(&mut self) -> Result<(), Error> {
        self.send.finish().map_err(|e| Error::Stream {
            peer: self.peer,
            step: "finish the control stream",
            source: Box::new(e),
        })
    }
}

/// Why a TLS handshake ended, as the user should read it.
fn handshake_error(peer: SocketAddr, e: ConnectionError) -> Error {
    match &e {
        // Our verification of the peer failed; rustls's reason is in the text.
        ConnectionError::TransportError(te) => {
            if let Some(alert) = tls_alert(te.code.into()) {
                return Error::RefusedPeer {
                    peer,
                    alert: alert_name(alert),
                    reason: te.reason.clone(),
                    hint: refusal_hint(&te.reason),
                };
            }
        }
        // The peer's verification of us failed: it closed with a TLS alert.
        ConnectionError::ConnectionClosed(cc) => {
            if let Some(alert) = tls_alert(cc.error_code.into()) {
                return Error::RefusedByPeer {
                    peer,
                    alert: alert_name(alert),
                    reason: String::from_utf8_lossy(&cc.reason).into_owned(),
                };
            }
        }
        ConnectionError::TimedOut => return Error::NoAnswer { peer },
        _ => {}
    }
    Error::Handshake { peer, source: e }
}

fn refusal_hint(reason: &str) -> &'static str {
    if reason.contains("not valid for name") {
        "Connect with a host name or address that the peer's certificate carries (`vkmigrate \
         pki issue --name/--ip/--dns`)"
    } else if reason.contains("Expired") || reason.contains("NotValidYet") {
        "Check the clocks of both hosts, or issue a new certificate (`vkmigrate pki issue`)"
    } else {
        "Both hosts need certificates issued by the same fleet CA (`vkmigrate pki issue`)"
    }
}

/// The connection ended: classified like a handshake failure when a TLS alert ended it (a
/// client learns that the server refused its certificate only here), else as lost.
fn lost(peer: SocketAddr, e: ConnectionError) -> Error {
    match handshake_error(peer, e) {
        Error::Handshake { peer, source } => Error::ConnectionLost { peer, source },
        Error::NoAnswer { peer } => Error::ConnectionLost {
            peer,
            source: ConnectionError::TimedOut,
        },
        other => other,
    }
}

fn stream_error(peer: SocketAddr, step: &'static str, e: impl Into<StreamFailure>) -> Error {
    match e.into() {
        StreamFailure::Lost(c) => lost(peer, c),
        StreamFailure::Other(source) => Error::Stream { peer, step, source },
    }
}

fn read_exact_error(peer: SocketAddr, step: &'static str, e: quinn::ReadExactError) -> Error {
    match e {
        quinn::ReadExactError::ReadError(r) => stream_error(peer, step, r),
        quinn::ReadExactError::FinishedEarly(n) => Error::Truncated { peer, step, got: n },
    }
}

enum StreamFailure {
    Lost(ConnectionError),
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl From<quinn::WriteError> for StreamFailure {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => StreamFailure::Lost(c),
            other => StreamFailure::Other(Box::new(other)),
        }
    }
}

impl From<quinn::ReadError> for StreamFailure {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => StreamFailure::Lost(c),
            other => StreamFailure::Other(Box::new(other)),
        }
    }
}

/// The TLS alert in a QUIC CRYPTO_ERROR code (0x100 + alert), if it is one.
fn tls_alert(code: u64) -> Option<u8> {
    (0x100..0x200)
        .contains(&code)
        .then(|| u8::try_from(code - 0x100).ok())
        .flatten()
}

fn alert_name(alert: u8) -> String {
    let name = match alert {
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        80 => "internal_error",
        109 => "missing_extension",
        112 => "unrecognized_name",
        116 => "certificate_required",
        120 => "no_application_protocol",
        _ => return format!("alert {alert}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_error_codes_are_alerts() {
        assert_eq!(tls_alert(0x100 + 48), Some(48));
        assert_eq!(tls_alert(0x0a), None);
        assert_eq!(tls_alert(0x200), None);
        assert_eq!(alert_name(116), "certificate_required");
    }
}
