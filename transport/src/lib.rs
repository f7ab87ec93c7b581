//! The transport of live migration: QUIC (quinn) with TLS 1.3 (rustls, ring) and mutual
//! authentication by certificates of the fleet CA, tuned for bulk transfer on a LAN; and the
//! fleet PKI (`vkmigrate pki`) that issues those certificates.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vkm_transport::Error> {
//! use vkm_transport::{connect, Server, TlsDir, Tuning};
//! let tls = TlsDir::load("/etc/vkmigrate/tls".as_ref())?;
//! let tuning = Tuning::bulk();
//! // destination
//! let server = Server::bind("0.0.0.0:4433".parse().unwrap(), &tls, &tuning)?;
//! // source
//! let mut s = connect("198.18.0.2:4433".parse().unwrap(), "hostb", &tls, &tuning).await?;
//! s.control.send(b"offer").await?;
//! let mut pages = s.conn.open_bulk_streams(2).await?;
//! # Ok(()) }
//! ```
//!
//! quinn's tokio integration runs on any tokio runtime; the multi-threaded one lets the
//! connection's packet processing and the streams' readers and writers use every core.

pub mod pki;
mod quic;
mod tls;
mod tuning;

use std::net::SocketAddr;

pub use quic::{
    connect, Connection, Control, Incoming, Server, Session, CLOSE_OK, MAX_CONTROL_MESSAGE,
};
pub use tls::{TlsDir, TlsError, ALPN};
pub use tuning::{Congestion, Tuning};

/// quinn and bytes, as this crate uses them (stream types, `Bytes` for `write_chunk`).
pub use bytes;
pub use quinn;

/// What can go wrong in the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot load this host's TLS identity")]
    Tls(#[from] TlsError),
    #[error("Invalid QUIC/TLS configuration: {0}")]
    Config(String),
    #[error("The transport must run inside a tokio runtime")]
    NoRuntime,
    #[error("Cannot bind a UDP socket to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot connect to {peer}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error(
        "Refused the peer {peer}: its certificate failed verification ({reason}; TLS alert \
         {alert}). {hint}"
    )]
    RefusedPeer {
        peer: SocketAddr,
        alert: String,
        reason: String,
        hint: &'static str,
    },
    #[error(
        "The peer {peer} refused this host's certificate (TLS alert {alert}{}). Both hosts need \
         certificates issued by the same fleet CA (`vkmigrate pki issue`), in the --tls-dir \
         each one uses",
        if reason.is_empty() { String::new() } else { format!(": {reason}") }
    )]
    RefusedByPeer {
        peer: SocketAddr,
        alert: String,
        reason: String,
    },
    #[error(
        "No answer from {peer} (is `vkmigrate listen` running there, and is UDP let through?)"
    )]
    NoAnswer { peer: SocketAddr },
    #[error("The QUIC handshake with {peer} failed")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("{peer} sent no hello on the control stream in time")]
    NoHello { peer: SocketAddr },
    #[error("{peer} does not speak this version of the vkmigrate transport (bad hello)")]
    BadHello { peer: SocketAddr },
    #[error("{peer} opened a stream that is not a bulk stream")]
    BadBulkStream { peer: SocketAddr },
    #[error("The connection to {peer} is lost")]
    ConnectionLost {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("Cannot {step} ({peer})")]
    Stream {
        peer: SocketAddr,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Cannot {step}: {peer} ended the stream after {got} bytes")]
    Truncated {
        peer: SocketAddr,
        step: &'static str,
        got: usize,
    },
    #[error("A control message of {len} bytes is larger than the limit of {max}")]
    MessageTooLarge { len: usize, max: usize },
}
