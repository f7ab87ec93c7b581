//! The QUIC transport over loopback: mutual authentication (accepted with certificates of one
//! CA, refused on both sides otherwise) and bulk data integrity over several streams.
//! Every test binds port 0 and works in its own temporary directory, so they run in parallel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vkm_transport::pki::{self, HostSpec};
use vkm_transport::quinn;
use vkm_transport::{connect, Error, Server, TlsDir, Tuning};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A fleet CA and host identities in a temporary directory.
struct Fleet {
    dir: tempfile::TempDir,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init_ca(&dir.path().join("ca"), "test fleet CA", 2).expect("init CA");
        Fleet { dir }
    }

    fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// Issue a certificate for `name` (DNS SAN `name`, IP SAN 127.0.0.1) and load it.
    fn host(&self, name: &str) -> TlsDir {
        TlsDir::load(&self.issue(name)).expect("load TLS dir")
    }

    fn issue(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        let spec = HostSpec {
            name: name.into(),
            ips: vec!["127.0.0.1".parse().expect("ip")],
            dns: Vec::new(),
            days: 2,
        };
        pki::issue(&self.ca_dir(), &spec, &out, false).expect("issue");
        out
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

/// Run a server that accepts one connection; returns its address and the result.
fn serve_one(
    tls: &TlsDir,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<vkm_transport::Session, Error>>,
    Arc<Server>,
) {
    let server = Arc::new(Server::bind(loopback(), tls, &Tuning::bulk()).expect("bind"));
    let addr = server.local_addr().expect("addr");
    let s = server.clone();
    let task = tokio::spawn(async move { s.accept().await.expect("server open") });
    (addr, task, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_with_one_ca_succeeds_both_ways() {
    let fleet = Fleet::new();
    let (addr, task, server) = serve_one(&fleet.host("hostb"));
    let client_tls = fleet.host("hosta");

    let mut client = within(
        "connect",
        connect(addr, "hostb", &client_tls, &Tuning::bulk()),
    )
    .await
    .expect("connect");
    let mut srv = within("accept", task).await.expect("join").expect("accept");
    assert_eq!(client.conn.peer_name().as_deref(), Some("hostb"));
    assert_eq!(srv.conn.peer_name().as_deref(), Some("hosta"));

    // Control messages both ways, and a clean end of the stream.
    client.control.send(b"offer web1").await.expect("send");
    let msg = srv.control.recv().await.expect("recv");
    assert_eq!(msg.as_deref(), Some(&b"offer web1"[..]));
    srv.control.send(b"").await.expect("send empty");
    srv.control.send(b"accept").await.expect("send");
    assert_eq!(
        client.control.recv().await.expect("recv").as_deref(),
        Some(&b""[..])
    );
    assert_eq!(
        client.control.recv().await.expect("recv").as_deref(),
        Some(&b"accept"[..])
    );
    client.control.finish().expect("finish");
    assert_eq!(srv.control.recv().await.expect("recv end"), None);

    // The IP SAN works as a server name too.
    let (addr2, task2, server2) = serve_one(&fleet.host("hostc"));
    let c2 = within(
        "connect by IP",
        connect(addr2, "127.0.0.1", &client_tls, &Tuning::bulk()),
    )
    .await
    .expect("connect by IP");
    within("accept 2", task2)
        .await
        .expect("join")
        .expect("accept by IP");

    client.conn.close(vkm_transport::CLOSE_OK, "done");
    within("close", client.conn.wait_closed()).await;
    c2.conn.close(vkm_transport::CLOSE_OK, "done");
    server.close();
    server2.close();
}

/// Asserts the refusal errors: the side that verified and refused, and the refused side.
fn assert_refused_by_us(e: &Error, what: &str) {
    let msg = format!("{e}");
    assert!(
        matches!(e, Error::RefusedPeer { .. }) && msg.contains("failed verification"),
        "{what}: {msg} ({e:?})"
    );
}

fn assert_refused_by_peer(e: &Error, what: &str) {
    let msg = format!("{e}");
    assert!(
        matches!(e, Error::RefusedByPeer { .. }) && msg.contains("refused this host's certificate"),
        "{what}: {msg} ({e:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_of_another_ca_is_refused() {
    let fleet = Fleet::new();
    let other = Fleet::new();
    let (addr, task, server) = serve_one(&fleet.host("hostb"));
    // The intruder trusts the fleet's CA (so it accepts the server) but holds a certificate
    // of its own CA.
    let intruder_dir = other.issue("hosta");
    let mut both = std::fs::read(other.ca_dir().join("ca.pem")).expect("ca");
    both.extend(std::fs::read(fleet.ca_dir().join("ca.pem")).expect("ca"));
    std::fs::write(intruder_dir.join("ca.pem"), both).expect("write");
    let intruder = TlsDir::load(&intruder_dir).expect("load");

    let client_err = within(
        "connect",
        connect(addr, "hostb", &intruder, &Tuning::bulk()),
    )
    .await
    .expect_err("refused");
    let server_err = within("accept", task)
        .await
        .expect("join")
        .expect_err("refused");
    assert_refused_by_peer(&client_err, "client");
    assert_refused_by_us(&server_err, "server");
    assert!(
        format!("{server_err}").contains("UnknownIssuer"),
        "{server_err}"
    );
    server.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_of_another_ca_is_refused() {
    let fleet = Fleet::new();
    let other = Fleet::new();
    let (addr, task, server) = serve_one(&other.host("hostb"));
    let client = fleet.host("hosta");

    let client_err = within("connect", connect(addr, "hostb", &client, &Tuning::bulk()))
        .await
        .expect_err("refused");
    let server_err = within("accept", task)
        .await
        .expect("join")
        .expect_err("refused");
    assert_refused_by_us(&client_err, "client");
    assert!(
        format!("{client_err}").contains("UnknownIssuer"),
        "{client_err}"
    );
    assert_refused_by_peer(&server_err, "server");
    server.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_for_another_name_is_refused() {
    let fleet = Fleet::new();
    let (addr, task, server) = serve_one(&fleet.host("hostb"));
    let client = fleet.host("hosta");
    let client_err = within("connect", connect(addr, "hostz", &client, &Tuning::bulk()))
        .await
        .expect_err("refused");
    assert_refused_by_us(&client_err, "client");
    assert!(
        format!("{client_err}").contains("not valid for name \"hostz\""),
        "{client_err}"
    );
    let server_err = within("accept", task)
        .await
        .expect("join")
        .expect_err("refused");
    assert_refused_by_peer(&server_err, "server");
    server.close();
}

/// A client that presents no certificate at all (trusting the right CA): plain quinn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let fleet = Fleet::new();
    let (addr, task, server) = serve_one(&fleet.host("hostb"));

    let mut roots = quinn::rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(fleet.ca_dir().join("ca.pem")).expect("ca.pem");
    use quinn::rustls::pki_types::pem::PemObject as _;
    let ca = quinn::rustls::pki_types::CertificateDer::from_pem_slice(&ca_pem).expect("pem");
    roots.add(ca).expect("root");
    let mut cfg = quinn::rustls::ClientConfig::builder_with_provider(Arc::new(
        quinn::rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&quinn::rustls::version::TLS13])
    .expect("tls13")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![vkm_transport::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).expect("quic config");
    let endpoint = quinn::Endpoint::client(loopback()).expect("client endpoint");
    let conn = within(
        "handshake",
        endpoint
            .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "hostb")
            .expect("connect"),
    )
    .await;
    // The client's half of the handshake may complete; the server's verdict arrives as the
    // connection's close, and no stream data is ever accepted.
    let client_close = match conn {
        Err(e) => e,
        Ok(conn) => {
            if let Ok((mut send, mut recv)) = conn.open_bi().await {
                let _ = send.write_all(b"VKMT\x00\x01\x00\x00").await;
                let mut buf = [0u8; 8];
                let r = within("read", recv.read_exact(&mut buf)).await;
                assert!(r.is_err(), "server answered a client without certificate");
            }
            within("closed", conn.closed()).await
        }
    };
    match &client_close {
        quinn::ConnectionError::ConnectionClosed(c) => {
            assert_eq!(
                u64::from(c.error_code),
                0x100 + 116,
                "certificate_required alert: {client_close}"
            );
        }
        other => panic!("client: unexpected {other}"),
    }
    let server_err = within("accept", task)
        .await
        .expect("join")
        .expect_err("refused");
    assert_refused_by_us(&server_err, "server");
    assert!(
        format!("{server_err}").contains("no certificates"),
        "{server_err}"
    );
    server.close();
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    while out.len() < len {
        // xorshift64*: incompressible enough for a transport test.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_data_arrives_intact_over_several_streams() {
    const STREAMS: u32 = 4;
    const PER_STREAM: usize = 8 << 20;
    let fleet = Fleet::new();
    let (addr, task, server) = serve_one(&fleet.host("hostb"));
    let client_tls = fleet.host("hosta");
    let mut client = within(
        "connect",
        connect(addr, "hostb", &client_tls, &Tuning::bulk()),
    )
    .await
    .expect("connect");
    let mut srv = within("accept", task).await.expect("join").expect("accept");

    // Receiver: hash every stream as it arrives, by index.
    let receiver = {
        let conn = srv.conn.clone();
        tokio::spawn(async move {
            let mut readers = Vec::new();
            for _ in 0..STREAMS {
                let (idx, mut s) = conn.accept_bulk().await.expect("accept").expect("a stream");
                readers.push(tokio::spawn(async move {
                    let mut h = blake3::Hasher::new();
                    let mut n = 0usize;
                    while let Some(chunk) = s.read_chunk(1 << 20, true).await.expect("read") {
                        n += chunk.bytes.len();
                        h.update(&chunk.bytes);
                    }
                    (idx, n, h.finalize())
                }));
            }
            let mut out = Vec::new();
            for r in readers {
                out.push(r.await.expect("reader"));
            }
            out.sort_by_key(|r| r.0);
            out
        })
    };

    // Sender: different data per stream, written in uneven chunks, hashes sent on the control
    // stream.
    let streams = client.conn.open_bulk_streams(STREAMS).await.expect("open");
    let mut writers = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let data = vkm_transport::bytes::Bytes::from(pseudo_random(PER_STREAM, i as u64 + 7));
        writers.push(tokio::spawn(async move {
            let hash = blake3::hash(&data);
            let mut off = 0;
            let mut step = 1000;
            while off < data.len() {
                let end = (off + step).min(data.len());
                s.write_chunk(data.slice(off..end)).await.expect("write");
                off = end;
                step = step * 3 % 1_500_000 + 1;
            }
            s.finish().expect("finish");
            s.stopped().await.expect("stopped");
            hash
        }));
    }
    let mut sent = Vec::new();
    for w in writers {
        sent.push(within("send", w).await.expect("writer"));
    }
    for h in &sent {
        client.control.send(h.as_bytes()).await.expect("send hash");
    }

    let got = within("receive", receiver).await.expect("receiver");
    assert_eq!(got.len(), STREAMS as usize);
    for (i, (idx, n, hash)) in got.iter().enumerate() {
        assert_eq!(*idx as usize, i);
        assert_eq!(*n, PER_STREAM, "stream {i} length");
        let announced = srv.control.recv().await.expect("hash").expect("a message");
        assert_eq!(hash.as_bytes(), &announced[..], "stream {i} content");
        assert_eq!(*hash, sent[i], "stream {i} content");
    }

    client.conn.close(vkm_transport::CLOSE_OK, "done");
    // The receiver sees a normal end, not an error.
    let end = within("accept after close", srv.conn.accept_bulk()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    server.close();
    within("idle", server.wait_idle()).await;
}

#[test]
fn a_missing_tls_dir_names_the_file_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = TlsDir::load(&dir.path().join("nope")).expect_err("missing");
    let msg = err.to_string();
    assert!(
        msg.contains("ca.pem") && msg.contains("vkmigrate pki issue"),
        "{msg}"
    );
}

#[test]
fn a_certificate_of_another_ca_is_refused_at_load() {
    let fleet = Fleet::new();
    let other = Fleet::new();
    fleet.host("hosta");
    let tls = fleet.dir.path().join("hosta");
    std::fs::copy(other.ca_dir().join("ca.pem"), tls.join("ca.pem")).expect("copy");
    let err = TlsDir::load(&tls).expect_err("mismatch");
    let msg = err.to_string();
    assert!(
        msg.contains("cert.pem") && msg.contains("fleet CA"),
        "{msg}"
    );
}

#[test]
fn a_key_of_another_certificate_is_refused_at_load() {
    let fleet = Fleet::new();
    fleet.host("hosta");
    fleet.host("hostb");
    let a: &Path = &fleet.dir.path().join("hosta");
    std::fs::copy(fleet.dir.path().join("hostb/key.pem"), a.join("key.pem")).expect("copy");
    let err = TlsDir::load(a).expect_err("mismatch");
    assert!(err.to_string().contains("does not belong"), "{err}");
}

/// quinn's default initial congestion window (14720 bytes) is smaller than one loopback
/// datagram (64 KB); the transport must still move data with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_congestion_window_with_large_datagrams_does_not_stall() {
    let fleet = Fleet::new();
    let tuning = Tuning {
        initial_window: None,
        ..Tuning::bulk()
    };
    let server = Server::bind(loopback(), &fleet.host("hostb"), &tuning).expect("bind");
    let addr = server.local_addr().expect("addr");
    let client_tls = fleet.host("hosta");
    let (client, srv) = tokio::join!(connect(addr, "hostb", &client_tls, &tuning), async {
        server.accept().await.expect("open")
    });
    let (client, srv) = (client.expect("connect"), srv.expect("accept"));
    let data = pseudo_random(4 << 20, 3);
    let mut s = client.conn.open_bulk(0).await.expect("open");
    let sender = async {
        s.write_all(&data).await.expect("write");
        s.finish().expect("finish");
    };
    let receiver = async {
        let (_, mut r) = srv
            .conn
            .accept_bulk()
            .await
            .expect("accept")
            .expect("stream");
        r.read_to_end(8 << 20).await.expect("read")
    };
    let ((), got) = within("transfer", async { tokio::join!(sender, receiver) }).await;
    assert_eq!(blake3::hash(&got), blake3::hash(&data));
    client.conn.close(vkm_transport::CLOSE_OK, "done");
    server.close();
}
