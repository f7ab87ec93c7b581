//! The receiving end of a live migration, run by a shim that `listen` started for it: accept
//! the sender's connection, build the skeleton, write pages into it as they arrive, apply the
//! final state, and run the vkernel when told `go` (the conversation is in
//! [`vkm_common::live`]).
//!
//! Threads: this (the shim's main) thread is the ptrace tracer of everything it restores, so
//! every restore step runs here; a tokio runtime created *after* the sandbox was forked runs
//! the connection and one task per page stream, which decode and write pages straight into
//! the skeleton's memory (`/proc/PID/mem` needs no tracer).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use vkm_common::image::decode_run;
use vkm_common::live::{FromReceiver, ToReceiver};
use vkm_common::model::{Clocks, Vkernel};
use vkm_migrate_dst::{InitMode, PageTargets, Sandbox, Skeleton};
use vkm_transport::{Control, Server, Session, TlsDir, Tuning};

use super::serve::{block_sigpipe, restored_console, send_reply, Running};
use super::{Reply, RestoreStats};
use crate::cli::ReceiveArgs;
use crate::fault::{self, Fault};
use crate::state::StateDir;

/// How long the sender has to connect after `listen` accepted its offer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Pages applied per stream, and the first error of any stream.
#[derive(Default)]
struct Applied {
    state: Mutex<AppliedState>,
    cv: Condvar,
}

#[derive(Default)]
struct AppliedState {
    frames: Vec<u64>,
    pages: u64,
    error: Option<String>,
    /// The final layout is in place: runs past a page stream's barrier may be written.
    final_open: bool,
    /// The skeleton was rebuilt: the early final pages (between a stream's two barriers) were
    /// read for the old one, and are dropped.
    drop_early: bool,
}

impl Applied {
    /// `frames` runs of `stream`, `pages` pages in all, are written.
    fn add(&self, stream: usize, frames: u64, pages: u64) {
        if let Ok(mut s) = self.state.lock() {
            if s.frames.len() <= stream {
                s.frames.resize(stream + 1, 0);
            }
            s.frames[stream] += frames;
            s.pages += pages;
        }
        self.cv.notify_all();
    }

    /// Let the page streams past their barriers; `drop_early` after a rebuild.
    fn open_final(&self, drop_early: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.final_open = true;
            s.drop_early = drop_early;
        }
        self.cv.notify_all();
    }

    /// At a page stream's barrier: wait until the final layout is in place. `None` when the
    /// migration failed meanwhile (or never got there), and the stream is to stop; else
    /// whether the early final pages are to be dropped.
    fn wait_final(&self, timeout: Duration) -> Option<bool> {
        let opened = self.wait_until(
            timeout,
            |s| s.final_open.then_some(s.drop_early),
            |_| "the final layout never came".to_owned(),
        );
        match opened {
            Ok(drop_early) => Some(drop_early),
            Err(e) => {
                self.fail(format!("{e}"));
                None
            }
        }
    }

    fn fail(&self, msg: String) {
        if let Ok(mut s) = self.state.lock() {
            s.error.get_or_insert(msg);
        }
        self.cv.notify_all();
    }

    /// Wait until every stream has applied the frames the sender counted.
    fn wait_for(&self, want: &[u64], timeout: Duration) -> Result<u64> {
        self.wait_until(
            timeout,
            |s| {
                want.iter()
                    .enumerate()
                    .all(|(i, &w)| s.frames.get(i).copied().unwrap_or(0) >= w)
                    .then_some(s.pages)
            },
            |s| {
                format!(
                    "Pages did not arrive within {} s (applied {:?} of {:?} messages per stream)",
                    timeout.as_secs(),
                    s.frames,
                    want
                )
            },
        )
    }

    /// Wait until `ready` has what it waits for, a page stream fails, or `timeout` passes
    /// (`late` then says what did not come).
    fn wait_until<T>(
        &self,
        timeout: Duration,
        ready: impl Fn(&AppliedState) -> Option<T>,
        late: impl FnOnce(&AppliedState) -> String,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow!("a page stream task panicked"))?;
        loop {
            if let Some(e) = &s.error {
                bail!("A page stream failed: {e}");
            }
            if let Some(v) = ready(&s) {
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{}", late(&s));
            }
            s = self
                .cv
                .wait_timeout(s, left.min(Duration::from_millis(100)))
                .map_err(|_| anyhow!("a page stream task panicked"))?
                .0;
        }
    }
}

/// Create the sandbox, then receive the vkernel into it. `status` gets a `receiving` line
/// with the port the sender must connect to.
pub fn setup_receive(
    args: &ReceiveArgs,
    state: &StateDir,
    dir: &Path,
    status: &mut File,
) -> Result<Running> {
    // The vkernel's clocks go on from where the offer said they were, plus the time since.
    let since = vkm_sys::calls::clock_ns(libc::CLOCK_MONOTONIC) - args.at_ns;
    let clocks = Clocks {
        monotonic_ns: args.mono_ns + since,
        boottime_ns: args.boot_ns + since,
        realtime_ns: 0,
    };
    // SAFETY: the shim is single-threaded here (checked by `check_single_threaded`; the tokio
    // runtime below starts only after the fork), which is what `Sandbox::create` needs.
    let sandbox = unsafe { Sandbox::create(InitMode::Restore, Some(clocks)) }
        .context("Cannot create the vkernel's sandbox");
    block_sigpipe();
    let mut sandbox = sandbox?;
    match receive(args, state, dir, &mut sandbox, status) {
        Ok(r) => Ok(r.into_running(sandbox)),
        Err(e) => {
            sandbox.kill();
            Err(e)
        }
    }
}

struct Received {
    migration_id: String,
    listener: std::os::unix::net::UnixListener,
    master: OwnedFd,
    console_tty: String,
    argv: Vec<String>,
    stats: RestoreStats,
    owned_net: Vec<vkm_common::net::OwnedNet>,
}

impl Received {
    fn into_running(self, mut sandbox: Sandbox) -> Running {
        sandbox.done();
        Running {
            sandbox,
            master: self.master,
            console_tty: self.console_tty,
            argv: self.argv,
            restored_from: None,
            restore: Some(self.stats),
            migration_id: Some(self.migration_id),
            listener: Some(self.listener),
            owned_net: self.owned_net,
        }
    }
}

fn receive(
    args: &ReceiveArgs,
    state: &StateDir,
    dir: &Path,
    sandbox: &mut Sandbox,
    status: &mut File,
) -> Result<Received> {
    let t0 = Instant::now();
    let rt = crate::net_runtime()?;
    let tls = TlsDir::load(&args.tls_dir)
        .with_context(|| format!("Cannot load the TLS files in {}", args.tls_dir.display()))?;
    let server = {
        let _guard = rt.enter();
        Server::bind(args.bind, &tls, &Tuning::bulk())
            .with_context(|| format!("Cannot listen on {}", args.bind))?
    };
    let port = server.local_addr()?.port();
    send_reply(status, &Reply::Receiving { port });
    let session = rt
        .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, server.accept()).await })
        .map_err(|_| {
            anyhow!(
                "The sender did not connect within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
        .ok_or_else(|| anyhow!("The receiving endpoint closed"))?
        .context("The sender's connection failed")?;
    let Session { conn, mut control } = session;
    let peer = conn.remote_address();
    tracing::info!(%peer, "sender connected");

    let result = converse(args, state, dir, sandbox, &rt, &conn, &mut control);
    match &result {
        Ok(_) => {}
        Err(e) => {
            let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
            let msg = FromReceiver::Failed { chain };
            let _ = rt.block_on(send(&mut control, &msg));
            rt.block_on(async {
                let _ = control.finish();
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    }
    conn.close(vkm_transport::CLOSE_OK, "done");
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(1), server.wait_idle()).await;
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    let mut r = result?;
    r.stats.elapsed_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(r)
}

/// A new skeleton from `vk` in place of `skel`, with the page streams writing into it.
fn new_skeleton(
    skel: Skeleton,
    vk: Vkernel,
    sandbox: &mut Sandbox,
    targets: &RwLock<Arc<PageTargets>>,
) -> Result<Skeleton> {
    let mut skel = skel
        .rebuild(vk, sandbox)
        .context("Cannot rebuild the vkernel's skeleton")?;
    let new = Arc::new(skel.page_targets()?);
    match targets.write() {
        Ok(mut t) => *t = new,
        Err(_) => bail!("a page stream task panicked"),
    }
    Ok(skel)
}

fn converse(
    args: &ReceiveArgs,
    state: &StateDir,
    dir: &Path,
    sandbox: &mut Sandbox,
    rt: &tokio::runtime::Runtime,
    conn: &vkm_transport::Connection,
    control: &mut Control,
) -> Result<Received> {
    match rt.block_on(recv(control))? {
        ToReceiver::Hello { migration_id } if migration_id == args.migration_id => {}
        ToReceiver::Hello { .. } => bail!("The sender presented another migration's id"),
        other => bail!("Expected the sender's hello, got {}", name_of(&other)),
    }
    let vk = match rt.block_on(recv(control))? {
        ToReceiver::Skeleton(vk) => vk,
        other => bail!("Expected the vkernel's skeleton, got {}", name_of(&other)),
    };
    let (master, slave, tty) = restored_console(vk.console.as_ref())?;
    let argv = vk.argv.clone();
    let processes = vk.processes.len();
    let threads = vk.processes.iter().map(|p| p.threads.len()).sum();
    let t = Instant::now();
    let mut skel = Skeleton::build(*vk, sandbox).context("Cannot build the vkernel's skeleton")?;
    let targets = Arc::new(RwLock::new(Arc::new(skel.page_targets()?)));
    tracing::info!(build_ms = t.elapsed().as_millis() as u64, "skeleton built");
    let applied = Arc::new(Applied::default());
    rt.spawn(accept_streams(
        conn.clone(),
        Arc::clone(&targets),
        Arc::clone(&applied),
    ));
    rt.block_on(send(
        control,
        &FromReceiver::SkeletonReady {
            build_us: us(t.elapsed()),
        },
    ))?;

    // Pre-copy runs until the sender freezes the vkernel.
    let (vk, frames, fresh, rebuild) = loop {
        match rt.block_on(recv(control))? {
            ToReceiver::RoundDone { round, frames } => {
                let t = Instant::now();
                applied.wait_for(&frames, Duration::from_secs(600))?;
                tracing::debug!(
                    round,
                    wait_ms = t.elapsed().as_secs_f64() * 1e3,
                    "round applied"
                );
                rt.block_on(send(control, &FromReceiver::RoundApplied { round }))?;
            }
            ToReceiver::Skeleton(vk) => {
                // Nothing is in flight: the sender asks between rounds.
                let t = Instant::now();
                tracing::info!(
                    "the vkernel's processes changed during pre-copy: building a new skeleton"
                );
                skel = new_skeleton(skel, *vk, sandbox, &targets)?;
                rt.block_on(send(
                    control,
                    &FromReceiver::SkeletonReady {
                        build_us: us(t.elapsed()),
                    },
                ))?;
            }
            ToReceiver::Final {
                vk,
                frames,
                fresh,
                rebuild,
            } => break (vk, frames, fresh, rebuild),
            ToReceiver::Abort { reason } => bail!("The sender gave up: {reason}"),
            other => bail!("Expected the final state, got {}", name_of(&other)),
        }
    };
    fault::die_at(Fault::DieAfterFinal);
    let t = Instant::now();
    applied.wait_for(&frames, Duration::from_secs(60))?;
    tracing::info!(
        wait_ms = t.elapsed().as_secs_f64() * 1e3,
        "pre-copy pages applied"
    );
    let t = Instant::now();
    let owned_net = vkm_common::net::OwnedNet::of(&vk.net);
    if rebuild {
        tracing::info!("the process tree changed during pre-copy: building a new skeleton");
        skel = new_skeleton(skel, *vk, sandbox, &targets)?;
    } else {
        skel.apply_final(*vk, &fresh)
            .context("Cannot apply the final layout")?;
        tracing::info!(
            delta_ms = t.elapsed().as_secs_f64() * 1e3,
            fresh = fresh.len(),
            "final layout applied"
        );
    }
    // The final round's pages, held at the page streams' barriers, may go in now.
    applied.open_final(rebuild);
    let delta = t.elapsed();
    let frames = match rt.block_on(recv(control))? {
        ToReceiver::Commit { frames } => frames,
        ToReceiver::Abort { reason } => bail!("The sender gave up: {reason}"),
        other => bail!("Expected the commit, got {}", name_of(&other)),
    };
    let t = Instant::now();
    let pages = applied.wait_for(&frames, Duration::from_secs(60))?;
    let t_wait = t.elapsed();
    skel.add_pages(pages);
    skel.finish(Some(&slave))
        .context("Cannot restore the vkernel's state")?;
    tracing::info!(
        wait_ms = t_wait.as_secs_f64() * 1e3,
        finish_ms = (t.elapsed() - t_wait).as_secs_f64() * 1e3,
        "state applied"
    );
    fault::die_at(Fault::DieBeforeReady);
    rt.block_on(send(
        control,
        &FromReceiver::Ready {
            // Restoring only: waiting for the last pages is the link's time, not ours.
            apply_us: us(delta + t.elapsed() - t_wait),
        },
    ))?;
    // While `go` is on its way: the rest of what letting the vkernel run takes.
    let arrival = state.prepare_arrival(&args.migration_id, sandbox.init_pid)?;
    skel.unpin();
    match rt.block_on(recv(control))? {
        ToReceiver::Go => {}
        ToReceiver::Abort { reason } => bail!("The sender gave up: {reason}"),
        other => bail!("Expected go, got {}", name_of(&other)),
    }
    let t = Instant::now();
    // The commit point. Until the sandbox is committed it dies with us; from then on the
    // vkernel runs here whatever happens to us, and the note lets this host's daemon tell a
    // sender that lost us that it does.
    arrival.post()?;
    sandbox
        .commit()
        .context("Cannot let the vkernel's sandbox outlive this shim")?;
    let (report, net) = skel
        .go_with(fault::uml_released)
        .context("Cannot resume the vkernel")?;
    // The pause ends here; the sender learns so at once, the rest follows.
    if !fault::armed(Fault::SilentAfterGo) {
        let _ = rt.block_on(send(
            control,
            &FromReceiver::Resumed {
                resume_us: us(t.elapsed()),
            },
        ));
    }
    // The switches between here and the clients learn the guest's new port now, while the
    // source still waits for `running`.
    net.announce();
    fault::die_at(Fault::DieAfterGo);
    // From here on the vkernel runs here, whatever happens to the connection. Publish it
    // before the sender hears so: when `send` returns, `ps` here shows it.
    drop(slave);
    let listener = super::serve::publish(
        dir,
        crate::state::Record {
            name: args.name.clone(),
            shim_pid: i32::try_from(std::process::id()).unwrap_or(-1),
            init_pid: sandbox.init_pid,
            argv: argv.clone(),
            console_tty: tty.clone(),
            created: 0,
            restored_from: None,
            migration_id: Some(args.migration_id.clone()),
            owned_net: owned_net.clone(),
        },
    );
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            // It runs, but nothing could find it: better to report it than to hide it.
            tracing::error!(error = %format!("{e:#}"), "cannot publish the received vkernel");
            return Err(e);
        }
    };
    if fault::armed(Fault::SilentAfterGo) {
        tracing::error!("injected fault: closing the connection without reporting running");
        conn.close(vkm_transport::CLOSE_OK, "injected fault");
    } else {
        let _ = rt.block_on(send(
            control,
            &FromReceiver::Running {
                resume_us: us(t.elapsed()),
                init_pid: sandbox.init_pid,
            },
        ));
        rt.block_on(async {
            let _ = control.finish();
            // The source discards its copy when this arrives; give it a moment to be read.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(_)) = control.recv().await {}
            })
            .await;
        });
    }
    Ok(Received {
        listener,
        migration_id: args.migration_id.clone(),
        master,
        console_tty: tty,
        argv,
        stats: RestoreStats {
            processes,
            threads,
            pages: report.pages,
            elapsed_us: 0,
        },
        owned_net,
    })
}

/// Accept the sender's page streams and apply what arrives on each.
async fn accept_streams(
    conn: vkm_transport::Connection,
    targets: Arc<RwLock<Arc<PageTargets>>>,
    applied: Arc<Applied>,
) {
    loop {
        match conn.accept_bulk().await {
            Ok(Some((idx, stream))) => {
                tokio::spawn(apply_stream(
                    idx as usize,
                    stream,
                    Arc::clone(&targets),
                    Arc::clone(&applied),
                ));
            }
            Ok(None) => return,
            Err(e) => {
                applied.fail(format!("{e}"));
                return;
            }
        }
    }
}

/// One page stream: length-prefixed runs. This task only reads them off the connection; a
/// thread of its own decodes, verifies and writes them, so that the runtime's threads stay
/// free to drive QUIC (decoding on them starves the connection and halves throughput). The
/// thread gets every complete run that has arrived at once: a later round's runs are mostly
/// single pages, and a hand-over per run costs more than the page.
async fn apply_stream(
    idx: usize,
    mut stream: quinn::RecvStream,
    targets: Arc<RwLock<Arc<PageTargets>>>,
    applied: Arc<Applied>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    // Buffers go back to be filled again: a new one for every message would be fresh memory,
    // which the kernel zeroes page by page before the message is copied in.
    let (recycle, recycled) = std::sync::mpsc::channel::<Vec<u8>>();
    let applier = {
        let applied = Arc::clone(&applied);
        std::thread::Builder::new()
            .name(format!("pages-{idx}"))
            .spawn(move || {
                let mut phase = Phase::PreCopy;
                while let Some(mut buf) = rx.blocking_recv() {
                    if !apply_runs(idx, &buf, &targets, &applied, &mut phase) {
                        return;
                    }
                    buf.clear();
                    // The reader may be gone; the buffer then simply goes.
                    let _ = recycle.send(buf);
                }
            })
    };
    if let Err(e) = applier {
        applied.fail(format!("page stream {idx}: cannot start a thread: {e}"));
        return;
    }
    let mut pending: Vec<u8> = Vec::new();
    // Everything that has arrived, in one go.
    let mut got = vec![vkm_transport::bytes::Bytes::new(); 256];
    loop {
        match stream.read_chunks(&mut got).await {
            Ok(Some(n)) => {
                for b in &got[..n] {
                    pending.extend_from_slice(b);
                }
            }
            Ok(None) => {
                if !pending.is_empty() {
                    applied.fail(format!(
                        "page stream {idx}: the stream ended inside a run ({} bytes of it)",
                        pending.len()
                    ));
                }
                return;
            }
            Err(e) => {
                applied.fail(format!("page stream {idx}: {e}"));
                return;
            }
        };
        let complete = match complete_runs(&pending) {
            Ok(n) => n,
            Err(e) => {
                applied.fail(format!("page stream {idx}: {e}"));
                return;
            }
        };
        if complete == 0 {
            continue;
        }
        // The start of a run that is still on its way goes into the next buffer.
        let mut next = recycled.try_recv().unwrap_or_default();
        next.extend_from_slice(&pending[complete..]);
        pending.truncate(complete);
        // The applier stopped on an error it has reported.
        if tx
            .send(std::mem::replace(&mut pending, next))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// How long a page stream waits at its barrier for the final layout (a rebuilt skeleton of a
/// big vkernel takes a while).
const FINAL_LAYOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// The length of the complete runs at the start of `buf`.
fn complete_runs(buf: &[u8]) -> Result<usize> {
    let mut rest = buf;
    while let Some((_, after)) = split_run(rest)? {
        rest = after;
    }
    Ok(buf.len() - rest.len())
}

/// The run at the start of `buf` (after its `u32` length) and what follows it; None while
/// part of it is still on its way. An empty run is the barrier
/// ([`vkm_common::live::PAGE_STREAM_BARRIER`]).
fn split_run(buf: &[u8]) -> Result<Option<(&[u8], &[u8])>> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if n > vkm_common::image::MAX_PAGES_LEN {
        bail!("a run of {n} bytes");
    }
    Ok(buf.get(4..4 + n).map(|run| (run, &buf[4 + n..])))
}

/// Where a page stream is: its barriers (empty runs) divide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    PreCopy,
    /// Past the first barrier: the pages written since the last round, sent while the source
    /// captured the state. `drop`: they were read for a skeleton since rebuilt.
    Early {
        drop: bool,
    },
    /// Past the second: the rest of the final round.
    Final,
}

/// Decode, verify and write complete runs; false (with the error reported) to stop.
fn apply_runs(
    idx: usize,
    mut buf: &[u8],
    targets: &RwLock<Arc<PageTargets>>,
    applied: &Applied,
    phase: &mut Phase,
) -> bool {
    let Ok(mut t) = targets.read().map(|t| Arc::clone(&t)) else {
        return false;
    };
    let (mut frames, mut pages) = (0, 0);
    // The reader handed over complete runs only.
    while let Ok(Some((run, after))) = split_run(buf) {
        buf = after;
        if run.is_empty() {
            if *phase != Phase::PreCopy {
                if *phase == (Phase::Early { drop: true }) {
                    tracing::info!(
                        stream = idx,
                        "early final pages dropped: the skeleton was rebuilt"
                    );
                }
                *phase = Phase::Final;
                continue;
            }
            // The first barrier: what came before counts now (the receiver waits for it
            // before it applies the final layout), what comes after waits for that layout,
            // and goes where it says (a rebuilt skeleton has new targets).
            applied.add(idx, frames, pages);
            (frames, pages) = (0, 0);
            let Some(drop) = applied.wait_final(FINAL_LAYOUT_TIMEOUT) else {
                return false;
            };
            *phase = Phase::Early { drop };
            let Ok(now) = targets.read().map(|t| Arc::clone(&t)) else {
                return false;
            };
            t = now;
            continue;
        }
        if *phase == (Phase::Early { drop: true }) {
            // Counted, for the sender counted it, but not written.
            frames += 1;
            continue;
        }
        let (space, addr, data) = match decode_run(run) {
            Ok(x) => x,
            Err(e) => {
                applied.fail(format!("page stream {idx}: {e}"));
                return false;
            }
        };
        if let Err(e) = t.apply(space, addr, &data) {
            applied.fail(format!("page stream {idx}: {space} at {addr:#x}: {e}"));
            return false;
        }
        frames += 1;
        pages += (data.len() / vkm_common::image::PAGE_SIZE) as u64;
    }
    applied.add(idx, frames, pages);
    true
}

async fn recv(control: &mut Control) -> Result<ToReceiver> {
    crate::wire::recv_msg(control, "sender").await
}

async fn send(control: &mut Control, msg: &FromReceiver) -> Result<()> {
    crate::wire::send_msg(control, msg, "sender").await
}

fn name_of(m: &ToReceiver) -> &'static str {
    match m {
        ToReceiver::Hello { .. } => "hello",
        ToReceiver::Skeleton(_) => "the skeleton",
        ToReceiver::RoundDone { .. } => "the end of a round",
        ToReceiver::Final { .. } => "the final state",
        ToReceiver::Commit { .. } => "commit",
        ToReceiver::Go => "go",
        ToReceiver::Abort { .. } => "abort",
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
