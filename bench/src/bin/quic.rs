//! Page-data throughput of the migration transport over loopback, printed as a table.
//!
//! `cargo run --release -p vkm-bench --bin quic [-- --gib 1 --streams 1,2,3,4 --runs 3 --sweep]`
//!
//! Sends `--gib` GiB of incompressible data from a client to a server, as `vkmigrate send`
//! sends pages to `vkmigrate listen`: one mutually authenticated QUIC connection (certificates
//! of a throwaway fleet CA), the data split over 1..N unidirectional streams written with
//! `write_chunk` (no copy) in 1 MiB chunks. Time runs from the first write to the moment the
//! receiver has read the last byte (the handshake is not counted). The two sides run on two
//! tokio runtimes of `--threads` workers each, as two hosts would, but share this machine's
//! cores. For reference, the same over plain TCP on loopback (no encryption). `--sweep` also
//! measures quinn's defaults with one setting of `Tuning::bulk` changed at a time, to show
//! which settings matter. `--verify` hashes every stream on both sides (blake3) and checks them.
//! `--mtu BYTES` (as root) runs it in a network namespace of its own whose loopback has that
//! MTU: 1500 shows what the transport does over Ethernet-sized packets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::runtime::Runtime;
use vkm_transport::bytes::Bytes;
use vkm_transport::pki::{self, HostSpec};
use vkm_transport::{connect, Congestion, Server, TlsDir, Tuning};

const CHUNK: usize = 1 << 20;
const DATA: usize = 64 << 20;

struct Opts {
    bytes: u64,
    streams: Vec<u32>,
    runs: usize,
    threads: usize,
    sweep: bool,
    verify: bool,
    /// Only the tuned QUIC rows (no baseline, no TCP).
    quick: bool,
    tuning: Tuning,
    /// The private loopback's MTU (`--mtu`), if not the usual one.
    mtu: Option<u32>,
}

fn main() -> Result<()> {
    // RUST_LOG=quinn_proto=debug shows what the connections do (default: warnings).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| vkm_bench::opt(&args, name);
    let mtu: Option<u32> = opt("--mtu")
        .map(|v| v.parse())
        .transpose()
        .context("--mtu takes a number of bytes")?;
    if let Some(mtu) = mtu {
        // Before any thread starts: the threads to come inherit the namespace.
        private_loopback(mtu)?;
    }
    let gib: f64 = opt("--gib")
        .map_or(Ok(1.0), |v| v.parse())
        .context("--gib takes a number")?;
    let opts = Opts {
        mtu,
        bytes: (gib * (1u64 << 30) as f64) as u64,
        streams: opt("--streams")
            .unwrap_or_else(|| "1,2,3,4".into())
            .split(',')
            .map(|s| s.parse().context("--streams takes numbers"))
            .collect::<Result<_>>()?,
        runs: opt("--runs")
            .map_or(Ok(3), |v| v.parse())
            .context("--runs")?,
        threads: opt("--threads")
            .map_or(Ok(2), |v| v.parse())
            .context("--threads")?,
        sweep: args.iter().any(|a| a == "--sweep"),
        verify: args.iter().any(|a| a == "--verify"),
        quick: args.iter().any(|a| a == "--quick"),
        tuning: {
            let mut t = Tuning::bulk();
            if let Some(v) = opt("--max-udp-payload") {
                t.max_udp_payload = v.parse().context("--max-udp-payload")?;
            }
            if let Some(v) = opt("--socket-buffer-mib") {
                t.socket_buffer = v.parse::<usize>().context("--socket-buffer-mib")? << 20;
            }
            if let Some(v) = opt("--stream-window-mib") {
                t.stream_receive_window = v.parse::<u64>().context("--stream-window-mib")? << 20;
            }
            if let Some(v) = opt("--window-mib") {
                t.receive_window = v.parse::<u64>().context("--window-mib")? << 20;
            }
            if let Some(v) = opt("--send-window-mib") {
                t.send_window = v.parse::<u64>().context("--send-window-mib")? << 20;
            }
            if let Some(v) = opt("--initial-window-kib") {
                t.initial_window = Some(v.parse::<u64>().context("--initial-window-kib")? << 10);
            }
            if args.iter().any(|a| a == "--no-gso") {
                t.gso = false;
            }
            if let Some(v) = opt("--cc") {
                t.congestion = match v.as_str() {
                    "cubic" => Congestion::Cubic,
                    "newreno" => Congestion::NewReno,
                    "bbr" => Congestion::Bbr,
                    _ => bail!("--cc takes cubic, newreno or bbr"),
                };
            }
            t
        },
    };

    let work = std::env::temp_dir().join(format!("vkm-bench-quic-{}", std::process::id()));
    let result = run(&opts, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

struct Row {
    transport: String,
    streams: u32,
    best: Duration,
    median: Duration,
}

fn run(opts: &Opts, work: &std::path::Path) -> Result<()> {
    let (server_tls, client_tls) = make_fleet(work)?;
    let data = Bytes::from(pseudo_random(DATA));
    let server_rt = runtime(opts.threads, "server")?;
    let client_rt = runtime(opts.threads, "client")?;
    let ctx = Ctx {
        server_rt: &server_rt,
        client_rt: &client_rt,
        server_tls,
        client_tls,
        data,
        opts,
    };

    let mut rows = Vec::new();
    let mut measure = |label: &str, streams: u32, f: &dyn Fn(u32) -> Result<Duration>| {
        let mut times = Vec::new();
        for _ in 0..opts.runs {
            times.push(f(streams).with_context(|| format!("{label}, {streams} streams"))?);
        }
        times.sort();
        let row = Row {
            transport: label.to_owned(),
            streams,
            best: times[0],
            median: times[times.len() / 2],
        };
        eprintln!(
            "{:<44} {:>2} streams: {:.2} GB/s",
            row.transport,
            streams,
            gbps(opts.bytes, row.median)
        );
        rows.push(row);
        Ok::<_, anyhow::Error>(())
    };

    if !opts.quick {
        measure("QUIC, quinn defaults", 1, &|n| {
            ctx.quic(&Tuning::quinn_defaults(), n)
        })?;
    }
    if opts.sweep {
        for (label, t) in sweep() {
            measure(&label, 1, &|n| ctx.quic(&t, n))?;
        }
    }
    for &n in &opts.streams {
        measure("QUIC, Tuning::bulk", n, &|n| ctx.quic(&opts.tuning, n))?;
    }
    if !opts.quick {
        for &n in &opts.streams {
            measure("TCP (no encryption)", n, &|n| ctx.tcp(n))?;
        }
    }

    println!();
    println!(
        "loopback (MTU {}), {:.2} GiB of incompressible data, {} runs, {} tokio workers per side{}",
        opts.mtu
            .map_or_else(|| "65536".to_string(), |m| m.to_string()),
        opts.bytes as f64 / (1u64 << 30) as f64,
        opts.runs,
        opts.threads,
        if opts.verify { ", blake3-verified" } else { "" }
    );
    println!(
        "{:<44} {:>7} {:>12} {:>10}",
        "transport", "streams", "median GB/s", "best GB/s"
    );
    for r in rows {
        println!(
            "{:<44} {:>7} {:>12.2} {:>10.2}",
            r.transport,
            r.streams,
            gbps(opts.bytes, r.median),
            gbps(opts.bytes, r.best)
        );
    }
    Ok(())
}

/// quinn's defaults with one setting of `Tuning::bulk` at a time, then `Tuning::bulk` with
/// one setting changed back or to another value.
fn sweep() -> Vec<(String, Tuning)> {
    let bulk = Tuning::bulk();
    let base = Tuning::quinn_defaults;
    let mut v = Vec::new();
    let mut t = base();
    t.stream_receive_window = bulk.stream_receive_window;
    t.receive_window = bulk.receive_window;
    t.send_window = bulk.send_window;
    v.push(("  defaults + windows".to_owned(), t));
    let mut t = base();
    t.max_udp_payload = bulk.max_udp_payload;
    v.push(("  defaults + 64 KB datagrams".to_owned(), t));
    let mut t = base();
    t.initial_window = bulk.initial_window;
    v.push(("  defaults + initial cwnd".to_owned(), t));
    let mut t = base();
    t.socket_buffer = bulk.socket_buffer;
    v.push(("  defaults + socket buffers".to_owned(), t));
    let mut t = bulk.clone();
    t.stream_receive_window = 64 << 20;
    t.receive_window = 128 << 20;
    t.send_window = 128 << 20;
    v.push(("  bulk, 64/128 MB windows".to_owned(), t));
    let mut t = bulk.clone();
    t.max_udp_payload = 1472;
    v.push(("  bulk, 1472-byte datagrams + GSO".to_owned(), t));
    let mut t = bulk.clone();
    t.max_udp_payload = 1472;
    t.gso = false;
    v.push(("  bulk, 1472-byte datagrams, no GSO".to_owned(), t));
    let mut t = bulk.clone();
    t.max_udp_payload = 6550;
    v.push(("  bulk, 6550-byte datagrams + GSO".to_owned(), t));
    let mut t = bulk.clone();
    t.congestion = Congestion::Bbr;
    v.push(("  bulk, BBR".to_owned(), t));
    let mut t = bulk.clone();
    t.initial_window = None;
    v.push(("  bulk, default initial cwnd".to_owned(), t));
    let mut t = bulk.clone();
    t.socket_buffer = 0;
    v.push(("  bulk, default socket buffers".to_owned(), t));
    v
}

struct Ctx<'a> {
    server_rt: &'a Runtime,
    client_rt: &'a Runtime,
    server_tls: TlsDir,
    client_tls: TlsDir,
    data: Bytes,
    opts: &'a Opts,
}

impl Ctx<'_> {
    /// Bytes of stream `i` of `n`: an equal share, the last one takes the rest.
    fn share(&self, i: u32, n: u32) -> u64 {
        let base = self.opts.bytes / u64::from(n);
        if i + 1 == n {
            self.opts.bytes - base * u64::from(n - 1)
        } else {
            base
        }
    }

    /// The chunks of stream `i`: slices of the random buffer, starting at a different place
    /// for every stream.
    fn chunks(&self, i: u32, n: u32) -> impl Iterator<Item = Bytes> + '_ {
        let mut left = self.share(i, n);
        let mut off = (i as usize * 7919 * 4096) % DATA;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let len = CHUNK
                .min(DATA - off)
                .min(usize::try_from(left).unwrap_or(CHUNK));
            let c = self.data.slice(off..off + len);
            off = (off + len) % DATA;
            left -= len as u64;
            Some(c)
        })
    }

    fn expected_hash(&self, i: u32, n: u32) -> blake3::Hash {
        let mut h = blake3::Hasher::new();
        for c in self.chunks(i, n) {
            h.update(&c);
        }
        h.finalize()
    }

    fn quic(&self, tuning: &Tuning, n: u32) -> Result<Duration> {
        let expected: Vec<Option<blake3::Hash>> = (0..n)
            .map(|i| self.opts.verify.then(|| self.expected_hash(i, n)))
            .collect();
        let server = {
            let _g = self.server_rt.enter();
            Arc::new(Server::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &self.server_tls,
                tuning,
            )?)
        };
        let addr = server.local_addr()?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<u64>>();
        let srv = server.clone();
        let receiver = self.server_rt.spawn(async move {
            let r = async {
                let session = srv.accept().await.context("server closed")??;
                let mut readers = Vec::new();
                for _ in 0..n {
                    let (idx, mut s) = session
                        .conn
                        .accept_bulk()
                        .await?
                        .context("connection ended early")?;
                    let want = expected.get(idx as usize).copied().flatten();
                    readers.push(tokio::spawn(async move {
                        let mut got = 0u64;
                        let mut h = want.map(|_| blake3::Hasher::new());
                        while let Some(c) = s.read_chunk(usize::MAX, true).await? {
                            got += c.bytes.len() as u64;
                            if let Some(h) = &mut h {
                                h.update(&c.bytes);
                            }
                        }
                        if let (Some(h), Some(want)) = (h, want) {
                            if h.finalize() != want {
                                bail!("stream {idx}: the data differs from what was sent");
                            }
                        }
                        Ok::<_, anyhow::Error>(got)
                    }));
                }
                let mut total = 0;
                for r in readers {
                    total += r.await??;
                }
                Ok::<_, anyhow::Error>((total, session))
            }
            .await;
            match r {
                Ok((total, session)) => {
                    let _ = done_tx.send(Ok(total));
                    // Keep the connection until the client closes it.
                    session.conn.closed().await;
                }
                Err(e) => {
                    let _ = done_tx.send(Err(e));
                }
            }
        });

        let elapsed = self.client_rt.block_on(async {
            let session = connect(addr, "bench-server", &self.client_tls, tuning).await?;
            let streams = session.conn.open_bulk_streams(n).await?;
            let t0 = Instant::now();
            let mut writers = Vec::new();
            for (i, mut s) in (0u32..).zip(streams) {
                let chunks: Vec<Bytes> = self.chunks(i, n).collect();
                writers.push(tokio::spawn(async move {
                    for c in chunks {
                        s.write_chunk(c).await?;
                    }
                    s.finish()?;
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for w in writers {
                w.await??;
            }
            let total = done_rx.await.context("receiver gone")??;
            let elapsed = t0.elapsed();
            if total != self.opts.bytes {
                bail!("received {total} bytes of {}", self.opts.bytes);
            }
            if std::env::var_os("VKM_BENCH_STATS").is_some() {
                let st = session.conn.stats();
                eprintln!(
                    "  client: mtu {} cwnd {} rtt {:?} lost {} packets {} (udp tx {} datagrams in {} ios)",
                    st.path.current_mtu,
                    st.path.cwnd,
                    st.path.rtt,
                    st.path.lost_packets,
                    st.path.sent_packets,
                    st.udp_tx.datagrams,
                    st.udp_tx.ios
                );
            }
            session.conn.close(vkm_transport::CLOSE_OK, "done");
            session.conn.wait_closed().await;
            Ok::<_, anyhow::Error>(elapsed)
        })?;
        self.server_rt.block_on(async {
            let _ = receiver.await;
            server.close();
            server.wait_idle().await;
        });
        Ok(elapsed)
    }

    fn tcp(&self, n: u32) -> Result<Duration> {
        let listener = self
            .server_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Result<u64>>();
        self.server_rt.spawn(async move {
            let r = async {
                let mut readers = Vec::new();
                for _ in 0..n {
                    let (mut s, _) = listener.accept().await?;
                    readers.push(tokio::spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        let mut got = 0u64;
                        loop {
                            let k = s.read(&mut buf).await?;
                            if k == 0 {
                                break;
                            }
                            got += k as u64;
                        }
                        Ok::<_, anyhow::Error>(got)
                    }));
                }
                let mut total = 0;
                for r in readers {
                    total += r.await??;
                }
                Ok(total)
            }
            .await;
            let _ = done_tx.send(r);
        });
        self.client_rt.block_on(async {
            let mut socks = Vec::new();
            for _ in 0..n {
                socks.push(tokio::net::TcpStream::connect(addr).await?);
            }
            let t0 = Instant::now();
            let mut writers = Vec::new();
            for (i, mut s) in (0u32..).zip(socks) {
                let chunks: Vec<Bytes> = self.chunks(i, n).collect();
                writers.push(tokio::spawn(async move {
                    for c in chunks {
                        s.write_all(&c).await?;
                    }
                    s.shutdown().await?;
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for w in writers {
                w.await??;
            }
            let total = done_rx.await.context("receiver gone")??;
            if total != self.opts.bytes {
                bail!("received {total} bytes of {}", self.opts.bytes);
            }
            Ok(t0.elapsed())
        })
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Move this process (its only thread) into a network namespace of its own, whose loopback
/// is up with MTU `mtu`.
fn private_loopback(mtu: u32) -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("--mtu needs a network namespace of its own (run as root)")?;
    let mtu = mtu.to_string();
    let status = std::process::Command::new("ip")
        .args(["link", "set", "lo", "mtu", &mtu, "up"])
        .status()
        .context("cannot run ip")?;
    if !status.success() {
        bail!("ip link set lo mtu {mtu} up failed");
    }
    Ok(())
}

fn runtime(threads: usize, name: &str) -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(format!("bench-{name}"))
        .enable_all()
        .build()?)
}

/// A throwaway fleet CA with a server and a client identity.
fn make_fleet(work: &std::path::Path) -> Result<(TlsDir, TlsDir)> {
    let ca = work.join("ca");
    pki::init_ca(&ca, "bench fleet CA", 1)?;
    let host = |name: &str| -> Result<PathBuf> {
        let out = work.join(name);
        pki::issue(
            &ca,
            &HostSpec {
                name: name.into(),
                ips: vec!["127.0.0.1".parse()?],
                dns: Vec::new(),
                days: 1,
            },
            &out,
            false,
        )?;
        Ok(out)
    };
    let server = TlsDir::load(&host("bench-server")?)?;
    let client = TlsDir::load(&host("bench-client")?)?;
    Ok((server, client))
}

/// Incompressible bytes (xorshift64*), so that nothing on the way can shrink them.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
