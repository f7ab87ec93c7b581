//! `vkmigrate send`: live migration of a running vkernel to another host's `listen` daemon.
//!
//! This process is the ptrace tracer while it freezes and captures, and a tracer is one
//! thread, so every ptrace step of a migration runs on the thread that called
//! [`migrate_vkernel`] (for `send` the main thread, for `evacuate` one per vkernel); a tokio
//! runtime carries the connection and one task per page stream,
//! and encoder threads (in `vkm_migrate_src::live`) read and compress pages. The order of the
//! conversation and the commit rule are in [`vkm_common::live`].

use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;
use vkm_common::live::{
    Convergence, FromDaemon, FromReceiver, MappedFile, Next, Offer, RoundLoad, ToDaemon,
    ToReceiver, NO_THROTTLE, PROTOCOL_VERSION,
};
use vkm_common::model::{Backing, Vkernel};
use vkm_migrate_src::live::{Final, LiveOptions, PageSink, Precopy, RoundStats};
use vkm_migrate_src::throttle::Throttle;
use vkm_migrate_src::SrcError;
use vkm_transport::{Control, Session, TlsDir, Tuning};

use crate::cli::SendArgs;
use crate::human;
use crate::state::StateDir;

/// Page streams (and encoder threads): one per core of this 2-core class of machine.
const STREAMS: usize = 2;
/// Messages queued per page stream before the encoders wait.
const STREAM_QUEUE: usize = 16;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    pub vkernel: String,
    pub destination: String,
    pub migration_id: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub rounds: Vec<RoundStats>,
    pub final_round: Option<RoundStats>,
    /// The process tree changed during pre-copy: everything went in the final round.
    pub rebuilt: bool,
    /// From the start until the destination confirmed that the vkernel runs there (or until
    /// the migration failed).
    pub total_ms: f64,
    /// After that: the source's stopped copy removed (or thawed, on failure) and the
    /// connection closed (QUIC's closing period of three probe timeouts, ~90 ms here).
    pub cleanup_ms: f64,
    /// The pause the vkernel saw: from the freeze until its threads ran on the destination
    /// (`downtime.until_resumed_ms` less the trip of `Resumed` back, see there).
    pub downtime_ms: f64,
    pub downtime: Downtime,
    pub bytes_on_wire: u64,
    pub page_bytes_raw: u64,
    pub page_bytes_encoded: u64,
    pub zero_pages: u64,
    pub compression_ratio: f64,
    /// The CPU limit the vkernel had last, in % of one CPU (100: never throttled).
    pub throttle_percent: f64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct Downtime {
    /// Stopping every thread and reading its state.
    freeze_ms: f64,
    /// Final state and pages to the destination, until it reports ready.
    final_transfer_ms: f64,
    /// The destination's share of that: layout delta and applying the state.
    restore_ms: f64,
    /// `go` until the destination reports the vkernel running.
    resume_ms: f64,
    /// The destination's share of that: from `go` until its threads ran.
    dest_resume_ms: f64,
    /// From the freeze until `Resumed` arrived here: the pause plus that message's trip back,
    /// which `downtime_ms` leaves out, taken as half of `resume_ms` less `dest_resume_ms`
    /// (the hosts' clocks are not compared).
    until_resumed_ms: f64,
}

/// How to migrate: what `send` takes besides the vkernel and its destination (an evacuation
/// runs many migrations with one of these).
pub(crate) struct SendOptions {
    pub tls: TlsDir,
    pub downtime_ms: u64,
    pub bandwidth: Bandwidth,
    pub no_compress: bool,
    pub max_rounds: u32,
    pub no_throttle: bool,
}

/// The cap on page data per second.
#[derive(Debug, Clone)]
pub(crate) enum Bandwidth {
    Unlimited,
    /// This migration's own.
    Cap(u64),
    /// `total` split evenly among the `active` migrations that share it (each counts itself
    /// in while it sends), so that parallel migrations share a link fairly.
    Shared {
        total: u64,
        active: Arc<AtomicUsize>,
    },
}

/// Where a migration failed: it decides whether another destination may do better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// The vkernel itself (gone, or it cannot be captured): no destination helps.
    Source,
    /// The destination's daemon cannot be reached.
    Connect,
    /// The destination refused the offer.
    Refused,
    /// During the transfer, before the destination ran anything: the vkernel runs here.
    Transfer,
    /// The vkernel runs at the destination, but its copy here could not be removed.
    Commit,
}

/// A failed migration: where, and the error chain.
#[derive(Debug)]
pub(crate) struct SendError {
    pub stage: Stage,
    pub error: anyhow::Error,
}

impl SendError {
    fn at(stage: Stage) -> impl FnOnce(anyhow::Error) -> SendError {
        move |error| SendError { stage, error }
    }
}

pub fn send(state: &StateDir, args: SendArgs) -> Result<()> {
    let tls = TlsDir::load(&args.tls_dir)
        .with_context(|| format!("Cannot load the TLS files in {}", args.tls_dir.display()))?;
    let opts = SendOptions {
        tls,
        downtime_ms: args.downtime_ms,
        bandwidth: args
            .max_bandwidth
            .map_or(Bandwidth::Unlimited, Bandwidth::Cap),
        no_compress: args.no_compress,
        max_rounds: args.max_rounds,
        no_throttle: args.no_throttle,
    };
    let ui = Ui::new();
    let mut report = Report::default();
    let result = migrate_vkernel(state, &args.name, &args.dest, &opts, &ui, &mut report);
    // A report only once the migration itself began (an error before that is all there is).
    if let (Some(path), false) = (&args.report, report.outcome.is_empty()) {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("Cannot write the report {}", path.display()))?;
    }
    result.map_err(|e| e.error)?;
    println!(
        "migrated {} to {} in {}: {} rounds, {} on the wire, downtime {:.1} ms",
        args.name,
        args.dest,
        human::ms(Duration::from_secs_f64(report.total_ms / 1000.0)),
        report.rounds.len() + 1,
        human::mib(report.bytes_on_wire),
        report.downtime_ms
    );
    Ok(())
}

/// Live-migrate vkernel `name` to the daemon at `dest`, filling `report`. Every ptrace step
/// runs on the calling thread (the tracer is per thread), from the first freeze to the commit
/// or thaw: call it from the thread that owns this migration. On any error but
/// [`Stage::Commit`] the vkernel runs on here.
pub(crate) fn migrate_vkernel(
    state: &StateDir,
    name: &str,
    dest: &str,
    opts: &SendOptions,
    ui: &Ui,
    report: &mut Report,
) -> Result<(), SendError> {
    let t0 = Instant::now();
    let rec = super::running(state, name).map_err(SendError::at(Stage::Source))?;
    let (addr, server_name) = resolve(dest).map_err(SendError::at(Stage::Connect))?;
    let tls = &opts.tls;
    let rt = crate::net_runtime().map_err(SendError::at(Stage::Source))?;
    let migration_id = format!("{:032x}", rand::random::<u128>());
    *report = Report {
        throttle_percent: 100.0,
        vkernel: rec.name.clone(),
        destination: dest.to_owned(),
        migration_id: migration_id.clone(),
        ..Default::default()
    };

    // The daemon first: a peer we cannot authenticate never sees any state.
    let daemon = rt
        .block_on(vkm_transport::connect(
            addr,
            &server_name,
            tls,
            &Tuning::bulk(),
        ))
        .with_context(|| format!("Cannot connect to {dest}"))
        .map_err(SendError::at(Stage::Connect))?;
    let live = LiveOptions {
        capture: super::capture_options(&rec),
        init_pid: rec.init_pid,
        compression: !opts.no_compress,
        streams: STREAMS,
    };
    let (mut precopy, skeleton) = Precopy::start(live)
        .with_context(|| format!("Cannot start migrating vkernel {}", rec.name))
        .map_err(SendError::at(Stage::Source))?;
    let mut offer = make_offer(&skeleton, &migration_id).map_err(SendError::at(Stage::Source))?;
    // Write tracking starts (it write-protects every page: tens of milliseconds per GiB)
    // while the destination looks at the offer and starts a shim.
    let captured = skeleton.clocks;
    let asked = rt.spawn(async move {
        // The clocks are read as the offer leaves: the destination's copy of them starts from
        // when it arrives, and every moment between the two would set it back.
        offer.clocks = now_clocks(captured);
        ask_daemon(daemon, ToDaemon::Offer(Box::new(offer))).await
    });
    precopy.track();
    let answer = rt
        .block_on(asked)
        .map_err(|e| anyhow!("The offer's task failed: {e}"))
        .and_then(|a| a)
        .map_err(SendError::at(Stage::Connect))?;
    let port = match answer {
        FromDaemon::Accept { port } => port,
        FromDaemon::Refuse { reason } => {
            return Err(SendError {
                stage: Stage::Refused,
                error: anyhow!("{dest} refused vkernel {}: {reason}", rec.name),
            })
        }
        other => {
            return Err(SendError {
                stage: Stage::Refused,
                error: anyhow!("Unexpected answer from {dest}: {other:?}"),
            })
        }
    };
    let transfer = SendError::at(Stage::Transfer);
    let recv_addr = SocketAddr::new(addr.ip(), port);
    let session = rt
        .block_on(vkm_transport::connect(
            recv_addr,
            &server_name,
            tls,
            &Tuning::bulk(),
        ))
        .with_context(|| format!("Cannot connect to the receiver at {recv_addr}"))
        .map_err(transfer)?;
    let Session { conn, mut control } = session;

    let streams = rt
        .block_on(conn.open_bulk_streams(STREAMS as u32))
        .context("Cannot open the page streams")
        .map_err(SendError::at(Stage::Transfer))?;
    let mut txs = Vec::new();
    let mut writers = Vec::new();
    for mut s in streams {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
        txs.push(tx);
        writers.push(rt.spawn(async move {
            while let Some(msg) = rx.recv().await {
                // Handed over as it is: write_all would copy every page once more.
                s.write_chunk(vkm_transport::bytes::Bytes::from(msg))
                    .await?;
            }
            s.finish()?;
            Ok::<(), anyhow::Error>(())
        }));
    }
    let sink = ChannelSink {
        txs,
        limit: RateLimit::new(&opts.bandwidth).map(Mutex::new),
    };

    let mut throttle: Option<Throttle> = None;
    let result = migrate(
        &rt,
        &mut control,
        &sink,
        precopy,
        skeleton,
        &migration_id,
        &rec.name,
        opts,
        report,
        &mut throttle,
        ui,
    );
    let t_ended = t0.elapsed();
    // The throttle never outlives the migration (it is released before a thaw, too).
    drop(throttle.take());
    drop(sink);
    ui.finish();
    let commit_err = |e: SrcError| SendError {
        stage: Stage::Commit,
        error: anyhow::Error::from(e).context(format!(
            "vkernel {} runs on {dest} now, but its stopped copy here cannot be removed",
            rec.name
        )),
    };
    let outcome = match result {
        Ok(fin) => {
            report.outcome = "migrated".into();
            // Our copy goes only now that the destination runs the vkernel.
            fin.commit().map_err(commit_err)
        }
        Err(Failure::Before(e, fin)) => {
            if let Some(fin) = fin {
                fin.abort();
            }
            // It may have ended meanwhile (killed, or its processes exited): say so.
            let still_here = matches!(
                state.probe(&rec.name),
                Ok(crate::state::Probe::Alive(r)) if r.init_pid == rec.init_pid
            );
            let (outcome, fate) = if still_here {
                ("failed; the vkernel runs on here", "it keeps running here")
            } else {
                (
                    "failed; the vkernel ended here during the migration",
                    "the vkernel ended here during the migration",
                )
            };
            report.outcome = outcome.into();
            report.error = Some(format!("{e:#}"));
            let chain = format!("{e:#}");
            let _ = rt.block_on(send_msg(&mut control, &ToReceiver::Abort { reason: chain }));
            Err(SendError {
                stage: Stage::Transfer,
                error: e.context(format!(
                    "Cannot migrate vkernel {} to {dest}; {fate}",
                    rec.name
                )),
            })
        }
        Err(Failure::Unknown(e, fin)) => {
            // The link went after `go`: the vkernel may run there. Ask until we know.
            let running = settle(&rt, addr, &server_name, tls, &rec.name, &migration_id, &e);
            if running {
                report.outcome = "migrated (confirmed after the link was lost)".into();
                fin.commit().map_err(commit_err)
            } else {
                fin.abort();
                report.outcome = "failed after go; the vkernel runs on here".into();
                report.error = Some(format!("{e:#}"));
                Err(SendError {
                    stage: Stage::Transfer,
                    error: e.context(format!(
                        "Cannot migrate vkernel {} to {dest}; the destination did not start it, it keeps running here",
                        rec.name
                    )),
                })
            }
        }
    };
    conn.close(vkm_transport::CLOSE_OK, "done");
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.wait_closed()).await;
    });
    report.bytes_on_wire = conn.stats().udp_tx.bytes;
    report.total_ms = ms(t_ended);
    report.cleanup_ms = ms(t0.elapsed() - t_ended);
    let all = report.rounds.iter().chain(report.final_round.iter());
    let (mut raw, mut encoded, mut zero) = (0, 0, 0);
    for r in all {
        raw += r.bytes_raw;
        encoded += r.bytes_encoded;
        zero += r.zero_pages;
    }
    report.page_bytes_raw = raw;
    report.page_bytes_encoded = encoded;
    report.zero_pages = zero;
    report.compression_ratio = if report.page_bytes_encoded > 0 {
        report.page_bytes_raw as f64 / report.page_bytes_encoded as f64
    } else {
        1.0
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    outcome?;
    if !state.wait_gone(&rec, Duration::from_secs(5)) {
        tracing::warn!(vkernel = %rec.name, "the source shim has not cleaned up within 5 s");
    }
    Ok(())
}

enum Failure {
    /// Before `go`: the destination runs nothing; thaw.
    Before(anyhow::Error, Option<Box<Final>>),
    /// After `go` was sent, without an answer.
    Unknown(anyhow::Error, Box<Final>),
}

#[allow(clippy::too_many_arguments)]
fn migrate(
    rt: &tokio::runtime::Runtime,
    control: &mut Control,
    sink: &ChannelSink,
    mut precopy: Precopy,
    skeleton: Vkernel,
    migration_id: &str,
    name: &str,
    opts: &SendOptions,
    report: &mut Report,
    throttle: &mut Option<Throttle>,
    ui: &Ui,
) -> Result<Box<Final>, Failure> {
    let before = |e: anyhow::Error| Failure::Before(e, None);
    rt.block_on(send_msg(
        control,
        &ToReceiver::Hello {
            migration_id: migration_id.to_owned(),
        },
    ))
    .map_err(before)?;
    send_skeleton(rt, control, skeleton, || {}).map_err(before)?;

    let conv = Convergence {
        downtime_ms: opts.downtime_ms,
        max_rounds: opts.max_rounds,
    };
    let mut history: Vec<u64> = Vec::new();
    // The CPU limit the vkernel has now, in ‰.
    let limit = |t: &Option<Throttle>| t.as_ref().map_or(NO_THROTTLE, Throttle::permille);
    // Page data per second the link and both ends carry, from the rounds big enough to tell
    // (small rounds are dominated by fixed costs such as scanning and hashing).
    let mut measured: Option<f64> = None;
    // The previous round's duration (s), the share of a CPU the vkernel used meanwhile and
    // the limit it had.
    let mut last: Option<(f64, f64, u32)> = None;
    let mut restarts = 0;
    loop {
        let t = Instant::now();
        let cpu0 = vkm_migrate_src::throttle::cpu_ns(&precopy.host_pids);
        let mut s = precopy
            .round(sink)
            .map_err(|e| before(anyhow::Error::from(e).context("A pre-copy round failed")))?;
        // A round ends when the destination has applied it.
        let done = ToReceiver::RoundDone {
            round: s.round,
            frames: precopy.frames().to_vec(),
        };
        rt.block_on(send_msg(control, &done)).map_err(before)?;
        match rt.block_on(recv_msg(control)).map_err(before)? {
            FromReceiver::RoundApplied { round } if round == s.round => {}
            other => return Err(before(unexpected(other))),
        }
        s.duration_ms = ms(t.elapsed());
        let secs = (s.duration_ms / 1000.0).max(1e-6);
        let cpu = vkm_migrate_src::throttle::cpu_ns(&precopy.host_pids).saturating_sub(cpu0) as f64
            / 1e9
            / secs;
        let rate = s.bytes_raw as f64 / secs;
        if s.bytes_raw >= BIG_ROUND {
            measured = Some(measured.map_or(rate, |m| m.max(rate)));
        }
        // Until a round big enough to measure went, a small one only says the link is at least
        // that fast: assume a LAN's speed then. A measured link is taken as it is, however
        // slow, or the pause would overrun its target by as much.
        let measured_or_assumed = measured.unwrap_or(rate.max(ASSUMED_BANDWIDTH));
        // Round 0's long runs move faster than a later round's scattered pages, and the final
        // round is one of the latter: a round big enough to tell says how fast it will go.
        let bandwidth = if s.round > 0 && s.bytes_raw >= BIG_ROUND {
            measured_or_assumed.min(rate)
        } else {
            measured_or_assumed
        };
        // What this round sent was written during the one before, on the CPU it used then.
        let load = last.map(|(prev_secs, prev_cpu, prev_throttle)| RoundLoad {
            dirty_rate: s.bytes_raw as f64 / prev_secs,
            cpu: prev_cpu,
            throttle: prev_throttle,
            send_rate: rate,
        });
        let dirty_rate = load.map(|l| l.dirty_rate);
        last = Some((secs, cpu, limit(throttle)));
        ui.round(&s, dirty_rate, bandwidth, opts.downtime_ms);
        let first = s.full;
        if !first {
            history.push(s.bytes_raw);
        }
        let remaining = if first { u64::MAX / 2 } else { s.bytes_raw };
        report.rounds.push(s);
        // New processes or threads that stayed: the skeleton no longer fits. Rebuilt in the
        // pause, it would take every page of the address spaces with it; so when those would
        // overrun the pause, the destination rebuilds it now, a few times at most. Not once
        // throttled: a vkernel that hardly runs seems settled, and would be slow to freeze.
        if precopy.tree_settled_otherwise()
            && throttle.is_none()
            && restarts < MAX_RESTARTS
            && precopy.mm_bytes() as f64 / bandwidth > opts.downtime_ms as f64 / 1000.0
        {
            restarts += 1;
            ui.note("the vkernel's processes or threads changed: the destination builds a new skeleton, and the pages go again");
            let (next, vk) = precopy.restart().map_err(|e| {
                before(anyhow::Error::from(e).context("Cannot capture a new skeleton"))
            })?;
            precopy = next;
            send_skeleton(rt, control, vk, || precopy.track()).map_err(before)?;
            history.clear();
            last = None;
            continue;
        }
        if first {
            continue;
        }
        match conv.next(remaining, bandwidth, &history, limit(throttle), load) {
            Next::Round => {}
            Next::StopAndCopy => break,
            Next::Throttle(p) if !opts.no_throttle => {
                if throttle.is_none() {
                    match Throttle::new(name, &precopy.host_pids) {
                        Ok(t) => *throttle = Some(t),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot throttle the vkernel; stopping pre-copy");
                            break;
                        }
                    }
                }
                if let Some(t) = throttle.as_mut() {
                    if let Err(e) = t.set_permille(p) {
                        tracing::warn!(error = %e, "cannot throttle the vkernel; stopping pre-copy");
                        break;
                    }
                    report.throttle_percent = t.percent();
                    ui.note(&format!(
                        "throttling the vkernel to {} % of a CPU",
                        t.percent()
                    ));
                }
            }
            Next::Throttle(_) => break,
        }
    }

    // Stop-and-copy. A throttled task takes its time to stop (it must be scheduled to see
    // the interrupt): the limit is lifted once every thread has been told to stop.
    let lift = || {
        if let Some(t) = throttle.as_mut() {
            if let Err(e) = t.set_permille(NO_THROTTLE) {
                tracing::warn!(error = %e, "cannot lift the CPU throttle before the freeze");
            }
        }
    };
    let mut fin = Box::new(
        precopy
            .freeze(lift, sink)
            .map_err(|e| before(anyhow::Error::from(e).context("Cannot freeze the vkernel")))?,
    );
    // Frozen, the throttle has nothing left to do; it is lifted already, and the caller
    // releases it (moving the processes back costs milliseconds) once the pause is over,
    // before any thaw.
    // Reading what can be read while the vkernel runs came first: the pause starts here.
    let t_freeze = fin.frozen_at;
    let freeze_ms = ms(t_freeze.elapsed());
    report.rebuilt = fin.rebuild;
    let t_final = Instant::now();
    let msg = ToReceiver::Final {
        vk: Box::new(fin.vk().clone()),
        frames: fin.frames(),
        fresh: fin.fresh.clone(),
        rebuild: fin.rebuild,
    };
    let mut restore_us = 0;
    let step: Result<()> = (|| {
        let t = Instant::now();
        // The pages written since the last round are on their way already (behind barriers
        // the destination lifts once the final layout is in place); the rest follow.
        rt.block_on(send_msg(control, &msg))?;
        let t_state = t.elapsed();
        let (s, frames) = fin.send_pages(sink)?;
        let t_pages = t.elapsed();
        report.final_round = Some(s);
        rt.block_on(send_msg(control, &ToReceiver::Commit { frames }))?;
        match rt.block_on(recv_msg(control))? {
            FromReceiver::Ready { apply_us } => restore_us += apply_us,
            other => return Err(unexpected(other)),
        }
        tracing::info!(
            final_state_ms = ms(t_state),
            final_pages_ms = ms(t_pages - t_state),
            commit_ms = ms(t.elapsed() - t_pages),
            dest_us = restore_us,
            "final transfer"
        );
        Ok(())
    })();
    if let Err(e) = step {
        return Err(Failure::Before(e, Some(fin)));
    }
    let final_transfer_ms = ms(t_final.elapsed());
    let t_go = Instant::now();
    if let Err(e) = rt.block_on(send_msg(control, &ToReceiver::Go)) {
        // `go` may or may not have left.
        return Err(Failure::Unknown(e, fin));
    }
    // `Resumed` ends the pause; `Running` follows once the destination has recorded it.
    let mut resumed: Option<(f64, f64, f64)> = None;
    loop {
        match rt.block_on(recv_msg(control)) {
            Ok(FromReceiver::Resumed { resume_us }) if resumed.is_none() => {
                resumed = Some((
                    ms(t_go.elapsed()),
                    ms(t_freeze.elapsed()),
                    resume_us as f64 / 1000.0,
                ));
            }
            Ok(FromReceiver::Running { .. }) => break,
            Ok(FromReceiver::Failed { chain }) if resumed.is_none() => {
                // The destination failed before it let anything run.
                return Err(Failure::Before(
                    anyhow!(chain.join(": "))
                        .context("The destination could not resume the vkernel"),
                    Some(fin),
                ));
            }
            Ok(other) => return Err(Failure::Unknown(unexpected(other), fin)),
            Err(e) => return Err(Failure::Unknown(e, fin)),
        }
    }
    let (resume_ms, until_resumed_ms, dest_resume_ms, trip_back) = match resumed {
        Some((rtt, until, dest)) => (rtt, until, dest, ((rtt - dest) / 2.0).max(0.0)),
        // A destination that said only `Running`: the pause lasted until then, for all we know.
        None => (ms(t_go.elapsed()), ms(t_freeze.elapsed()), 0.0, 0.0),
    };
    report.downtime = Downtime {
        freeze_ms,
        final_transfer_ms,
        restore_ms: restore_us as f64 / 1000.0,
        resume_ms,
        dest_resume_ms,
        until_resumed_ms,
    };
    report.downtime_ms = until_resumed_ms - trip_back;
    Ok(fin)
}

/// Send the skeleton the destination builds (`Skeleton`) and wait until it has (`SkeletonReady`),
/// doing `meanwhile` in between.
fn send_skeleton(
    rt: &tokio::runtime::Runtime,
    control: &mut Control,
    vk: Vkernel,
    meanwhile: impl FnOnce(),
) -> Result<()> {
    rt.block_on(send_msg(control, &ToReceiver::Skeleton(Box::new(vk))))?;
    meanwhile();
    match rt.block_on(recv_msg(control))? {
        FromReceiver::SkeletonReady { build_us } => {
            tracing::info!(build_ms = build_us / 1000, "destination built the skeleton");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// New skeletons built during pre-copy at most (see [`Precopy::restart`]).
const MAX_RESTARTS: u32 = 2;

/// A round at least this big measures the bandwidth (its time is mostly moving pages).
const BIG_ROUND: u64 = 4 << 20;
/// The bandwidth assumed until a round big enough to measure it has gone.
const ASSUMED_BANDWIDTH: f64 = 50e6;

/// After a lost link: ask the destination's daemon whether the vkernel runs there, again and
/// again (the vkernel stays frozen here meanwhile: never two running copies).
fn settle(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    server_name: &str,
    tls: &TlsDir,
    name: &str,
    migration_id: &str,
    cause: &anyhow::Error,
) -> bool {
    eprintln!(
        "The link to the destination was lost after go ({cause:#}); asking it whether {name} runs there"
    );
    let mut tries = 0u64;
    loop {
        let answer = rt.block_on(async {
            let s = vkm_transport::connect(addr, server_name, tls, &Tuning::bulk()).await?;
            ask_daemon(
                s,
                ToDaemon::Query {
                    name: name.to_owned(),
                    migration_id: migration_id.to_owned(),
                },
            )
            .await
        });
        match answer {
            Ok(FromDaemon::Outcome {
                running,
                pending: false,
            }) => return running,
            Ok(_) => {}
            Err(e) => {
                if tries.is_multiple_of(10) {
                    eprintln!("still asking {addr} whether {name} runs there: {e:#}");
                }
            }
        }
        tries += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub(crate) async fn ask_daemon(session: Session, msg: ToDaemon) -> Result<FromDaemon> {
    let Session { conn, mut control } = session;
    crate::wire::send(&mut control, &msg, "destination").await?;
    let answer = crate::wire::recv(&mut control, "destination").await;
    conn.close(vkm_transport::CLOSE_OK, "done");
    answer
}

async fn send_msg(control: &mut Control, msg: &ToReceiver) -> Result<()> {
    crate::wire::send_msg(control, msg, "destination").await
}

/// The destination's next message; its `Failed` is an error with its chain.
async fn recv_msg(control: &mut Control) -> Result<FromReceiver> {
    match crate::wire::recv_msg(control, "destination").await? {
        FromReceiver::Failed { chain } => {
            Err(anyhow!(chain.join(": ")).context("The destination failed"))
        }
        msg => Ok(msg),
    }
}

fn unexpected(m: FromReceiver) -> anyhow::Error {
    anyhow!("Unexpected message from the destination: {m:?}")
}

/// What the destination must check before anything moves.
pub(crate) fn make_offer(vk: &Vkernel, migration_id: &str) -> Result<Offer> {
    let mut files: Vec<MappedFile> = vk
        .mms
        .iter()
        .flat_map(|m| m.vmas.iter())
        .filter_map(|v| match &v.backing {
            Backing::File {
                path,
                size,
                mtime_ns,
                ..
            } => Some(MappedFile {
                path: path.clone(),
                size: *size,
                mtime_ns: *mtime_ns,
            }),
            _ => None,
        })
        .collect();
    files.sort();
    files.dedup();
    let clocks = now_clocks(vk.clocks);
    Ok(Offer {
        version: PROTOCOL_VERSION,
        name: vk.name.clone(),
        migration_id: migration_id.to_owned(),
        mem_bytes: mem_needed(vk),
        cpu: vk.cpu.clone(),
        vdso_hash: vkm_migrate_dst::vdso_hash()?,
        kernel_release: vkm_sys::host::kernel_release(),
        files,
        clocks,
        net: vk.net.clone(),
    })
}

/// The vkernel's clocks now: those `captured` at the skeleton's freeze plus the time since.
fn now_clocks(captured: vkm_common::model::Clocks) -> vkm_common::model::Clocks {
    let mut c = captured;
    let since = vkm_sys::calls::clock_ns(libc::CLOCK_REALTIME) - c.realtime_ns;
    c.monotonic_ns += since;
    c.boottime_ns += since;
    c.realtime_ns += since;
    c
}

/// Memory the destination must have for the vkernel: its memory objects, and the smaller of
/// its anonymous mappings and its writable private mappings (both bound what can be resident
/// there; the capture keeps no resident size).
fn mem_needed(vk: &Vkernel) -> u64 {
    let vmas = || vk.mms.iter().flat_map(|m| m.vmas.iter());
    let size = |v: &vkm_common::model::Vma| v.end - v.start;
    let anon: u64 = vmas()
        .filter(|v| matches!(v.backing, Backing::Anon))
        .map(size)
        .sum();
    let writable_private: u64 = vmas()
        .filter(|v| !v.shared && v.prot & vkm_common::model::prot::WRITE != 0)
        .map(size)
        .sum();
    anon.min(writable_private) + vk.objects.iter().map(|o| o.size).sum::<u64>()
}

/// HOST:PORT → the address and the name the server's certificate must carry.
pub(crate) fn resolve(dest: &str) -> Result<(SocketAddr, String)> {
    let (host, _port) = dest
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("The destination {dest:?} is not HOST:PORT"))?;
    let addr = dest
        .to_socket_addrs()
        .with_context(|| format!("Cannot resolve {dest}"))?
        .next()
        .ok_or_else(|| anyhow!("{dest} resolves to no address"))?;
    Ok((addr, host.trim_matches(['[', ']']).to_owned()))
}

/// Encoder threads → page stream tasks, with an optional rate cap.
struct ChannelSink {
    txs: Vec<mpsc::Sender<Vec<u8>>>,
    limit: Option<Mutex<RateLimit>>,
}

impl PageSink for ChannelSink {
    fn send(&self, stream: usize, msg: Vec<u8>, _frames: u64) -> Result<(), SrcError> {
        if let Some(l) = &self.limit {
            let wait = l
                .lock()
                .map(|mut l| l.take(msg.len() as u64))
                .unwrap_or_default();
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        let tx = self.txs.get(stream).ok_or(SrcError::Link {
            what: format!("no page stream {stream}"),
        })?;
        tx.blocking_send(msg).map_err(|_| SrcError::Link {
            what: "the page stream to the destination closed".into(),
        })
    }
}

/// A token bucket: bytes per second, bursts of up to 50 ms. With a shared cap the rate is
/// the cap's share of this migration, worked out anew for every message, so that a migration
/// speeds up as soon as another one ends.
struct RateLimit {
    total: f64,
    /// The migrations sharing `total`, this one included (counted out on Drop).
    share: Option<Arc<AtomicUsize>>,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(bw: &Bandwidth) -> Option<RateLimit> {
        let (total, share) = match bw {
            Bandwidth::Unlimited => return None,
            Bandwidth::Cap(r) => (*r, None),
            Bandwidth::Shared { total, active } => {
                active.fetch_add(1, Ordering::SeqCst);
                (*total, Some(Arc::clone(active)))
            }
        };
        Some(RateLimit {
            total: total as f64,
            share,
            tokens: 0.0,
            last: Instant::now(),
        })
    }

    fn rate(&self) -> f64 {
        let n = self
            .share
            .as_ref()
            .map_or(1, |a| a.load(Ordering::SeqCst).max(1));
        self.total / n as f64
    }

    /// Take `n` bytes; returns how long to wait before sending them.
    fn take(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let rate = self.rate();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate * 0.05);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

impl Drop for RateLimit {
    fn drop(&mut self) {
        if let Some(a) = &self.share {
            a.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Progress: a spinner line on a terminal, log lines otherwise.
pub(crate) struct Ui {
    bar: Option<ProgressBar>,
    /// Put before every line (an evacuation's migrations share stderr).
    prefix: String,
}

impl Ui {
    fn new() -> Ui {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b.set_message("pre-copy round 0: all pages");
            b
        });
        Ui {
            bar,
            prefix: String::new(),
        }
    }

    /// Plain lines, each starting with `prefix`: for migrations that run side by side.
    pub(crate) fn lines(prefix: &str) -> Ui {
        Ui {
            bar: None,
            prefix: prefix.to_owned(),
        }
    }

    fn round(&self, s: &RoundStats, dirty_rate: Option<f64>, bandwidth: f64, downtime_ms: u64) {
        let est = s.bytes_raw as f64 / bandwidth * 1000.0;
        let dirty = dirty_rate.map_or(String::new(), |r| {
            format!("; dirty rate {:.0} MB/s", r / 1e6)
        });
        let line = format!(
            "round {}: {} pages ({}) sent in {:.0} ms{dirty}; next round ≈ {} (downtime ≈ {:.0} ms at {:.0} MB/s, target {} ms)",
            s.round,
            s.pages,
            human::mib(s.bytes_encoded),
            s.duration_ms,
            human::mib(s.bytes_raw),
            est,
            bandwidth / 1e6,
            downtime_ms
        );
        self.note(&line);
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => {
                b.println(line);
                b.set_message(line.to_owned());
            }
            None => eprintln!("{}{line}", self.prefix),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
