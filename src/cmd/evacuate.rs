//! `vkmigrate evacuate`: move every vkernel of this host to other hosts.
//!
//! The steps: wait for `--at` (Ctrl-C cancels, nothing touched); mark this host draining, so
//! that its own `listen` takes no new arrivals; probe each vkernel (a capture, as `send`
//! starts with, and its write rate over `--sample-ms`); ask every target's daemon for its
//! capacity with the offers the vkernels would make; plan ([`vkm_common::evacuate`]) and
//! refuse before anything moves if some vkernel has no place; then run the migrations, at
//! most `--parallel` at once, each on a thread of its own (the ptrace tracer is per thread, so
//! one migration stays on one thread from its first freeze to its end). A migration that
//! fails leaves its vkernel running here; it is tried on another target that has room.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use vkm_common::evacuate::{best_fit, plan, Item, Plan, Target};
use vkm_common::live::{Capacity, FromDaemon, Offer, ToDaemon};
use vkm_migrate_src::live::{LiveOptions, Precopy};
use vkm_transport::{TlsDir, Tuning};

use super::send::{self, Bandwidth, SendError, SendOptions, Stage, Ui};
use crate::cli::{EvacuateArgs, UndrainArgs};
use crate::human;
use crate::state::StateDir;

#[derive(Debug, Default, Serialize)]
struct Report {
    started: String,
    finished: String,
    dry_run: bool,
    targets: Vec<TargetReport>,
    vkernels: Vec<VkReport>,
    /// Names of the vkernels that still run here.
    left_behind: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct TargetReport {
    addr: String,
    free_bytes: u64,
    vkernels: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draining: Option<String>,
    /// Why it could not be asked (it then takes nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct VkReport {
    name: String,
    mem_bytes: u64,
    dirty_bytes_per_s: f64,
    /// Where the plan put it.
    planned_target: Option<String>,
    /// Where it runs now (none: still here).
    target: Option<String>,
    /// `migrated`, `left behind`, or in a dry run `planned`/`cannot be placed`.
    outcome: String,
    /// Its successful migration's total time and downtime.
    total_ms: f64,
    downtime_ms: f64,
    /// Why it is left behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    attempts: Vec<Attempt>,
}

#[derive(Debug, Serialize)]
struct Attempt {
    target: String,
    outcome: String,
    total_ms: f64,
    downtime_ms: f64,
    rounds: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn evacuate(state: &StateDir, args: EvacuateArgs) -> Result<()> {
    let tls = TlsDir::load(&args.tls_dir)
        .with_context(|| format!("Cannot load the TLS files in {}", args.tls_dir.display()))?;
    for t in &args.to {
        if t.rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.is_empty())
        {
            bail!("The target {t:?} is not HOST:PORT");
        }
    }
    let stop = Stop::watch()?;
    if let Some(at) = args.at {
        wait_until(at, &stop)?;
    }
    let mut report = Report {
        started: human::rfc3339(human::now_unix()),
        dry_run: args.dry_run,
        ..Default::default()
    };
    // Drained before we look: a vkernel arriving now would be missed by the plan.
    let _drain = if args.dry_run {
        None
    } else {
        Some(Drain::set(state, args.stay_drained)?)
    };
    let result = run(state, &args, &tls, &stop, &mut report);
    report.finished = human::rfc3339(human::now_unix());
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("Cannot write the report {}", path.display()))?;
    }
    result
}

fn run(
    state: &StateDir,
    args: &EvacuateArgs,
    tls: &TlsDir,
    stop: &Stop,
    report: &mut Report,
) -> Result<()> {
    // The vkernels: every one that runs here.
    let mut names = Vec::new();
    for name in state.names()? {
        match super::running(state, &name) {
            Ok(_) => names.push(name),
            Err(e) => tracing::info!(vkernel = %name, error = %format!("{e:#}"), "not evacuated"),
        }
    }
    if names.is_empty() {
        println!("no vkernels run here; nothing to evacuate");
        return Ok(());
    }
    // Probe them: their offers and write rates.
    let mut items = Vec::new();
    let mut offers = Vec::new();
    let mut unprobed: Vec<(String, String)> = Vec::new();
    for name in &names {
        match probe(state, name, Duration::from_millis(args.sample_ms)) {
            Ok((item, offer)) => {
                items.push(item);
                offers.push(offer);
            }
            Err(e) => unprobed.push((name.clone(), format!("{e:#}"))),
        }
    }
    // Ask the targets.
    let rt = crate::net_runtime()?;
    let mut targets = Vec::new();
    for addr in &args.to {
        let (target, tr) = match rt.block_on(ask_capacity(addr, tls, &offers)) {
            Ok(c) => target_of(addr, c, offers.len()),
            Err(e) => {
                let why = format!("cannot ask it for its capacity: {e:#}");
                let tr = TargetReport {
                    addr: addr.clone(),
                    error: Some(why.clone()),
                    ..Default::default()
                };
                let t = Target {
                    addr: addr.clone(),
                    free_bytes: 0,
                    refusals: vec![Some(why); offers.len()],
                };
                (t, tr)
            }
        };
        report.targets.push(tr);
        targets.push(target);
    }
    rt.shutdown_timeout(Duration::from_secs(1));

    let plan = plan(&items, &targets);
    print_plan(&items, &targets, &plan, &unprobed);
    for (i, it) in items.iter().enumerate() {
        report.vkernels.push(VkReport {
            name: it.name.clone(),
            mem_bytes: it.mem_bytes,
            dirty_bytes_per_s: it.dirty_bytes_per_s,
            planned_target: plan.target_of(i).map(|t| targets[t].addr.clone()),
            outcome: if plan.target_of(i).is_some() {
                "planned".into()
            } else {
                "cannot be placed".into()
            },
            error: plan.unplaced.iter().find(|u| u.0 == i).map(|u| u.1.clone()),
            ..Default::default()
        });
    }
    for (name, why) in &unprobed {
        report.vkernels.push(VkReport {
            name: name.clone(),
            outcome: "cannot be placed".into(),
            error: Some(why.clone()),
            ..Default::default()
        });
    }
    let mut unfit: Vec<String> = plan
        .unplaced
        .iter()
        .map(|u| items[u.0].name.clone())
        .collect();
    unfit.extend(unprobed.iter().map(|u| u.0.clone()));
    if args.dry_run {
        if !unfit.is_empty() {
            bail!(
                "The plan does not fit: no place for {} (see above)",
                unfit.join(", ")
            );
        }
        return Ok(());
    }
    if !unfit.is_empty() {
        report.left_behind = names.clone();
        for v in &mut report.vkernels {
            v.outcome = "left behind".into();
        }
        bail!(
            "Cannot evacuate: no place for {} (see above); nothing was moved. Add targets, make \
             room on them, or move those vkernels first",
            unfit.join(", ")
        );
    }

    let t0 = Instant::now();
    let opts = SendOptions {
        tls: tls.clone(),
        downtime_ms: args.downtime_ms,
        bandwidth: args
            .max_bandwidth
            .map_or(Bandwidth::Unlimited, |total| Bandwidth::Shared {
                total,
                active: Arc::new(AtomicUsize::new(0)),
            }),
        no_compress: args.no_compress,
        max_rounds: args.max_rounds,
        no_throttle: args.no_throttle,
    };
    let moved = execute(
        state,
        &opts,
        &items,
        &targets,
        &plan,
        args.parallel,
        stop,
        report,
    );
    let left: Vec<String> = report
        .vkernels
        .iter()
        .filter(|v| v.target.is_none())
        .map(|v| v.name.clone())
        .collect();
    report.left_behind = left.clone();
    if !left.is_empty() {
        bail!(
            "{} of {} vkernels were evacuated in {}; still running here: {} (the report and \
             the lines above say why)",
            moved,
            items.len(),
            human::ms(t0.elapsed()),
            left.join(", ")
        );
    }
    println!(
        "evacuated {} vkernels in {}",
        items.len(),
        human::ms(t0.elapsed())
    );
    Ok(())
}

/// A migration's result, from its thread.
struct Done {
    item: usize,
    target: usize,
    result: Result<(), SendError>,
    report: send::Report,
}

/// Run the plan's moves, retrying failed ones elsewhere; fills `report.vkernels[i]` for
/// every item `i`. Returns how many vkernels moved.
#[allow(clippy::too_many_arguments)]
fn execute(
    state: &StateDir,
    opts: &SendOptions,
    items: &[Item],
    targets: &[Target],
    plan: &Plan,
    parallel: u32,
    stop: &Stop,
    report: &mut Report,
) -> usize {
    // Room left per target once the plan's vkernels are there; a failed move gives its room
    // back, a retry takes from its new target's.
    let mut room: Vec<u64> = targets.iter().map(|t| t.free_bytes).collect();
    let mut assigned: Vec<Option<usize>> = vec![None; items.len()];
    for &(i, t) in &plan.moves {
        room[t] -= items[i].mem_bytes;
        assigned[i] = Some(t);
    }
    let mut tried: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
    let mut dead: Vec<usize> = Vec::new();
    let mut queue: VecDeque<usize> = plan.moves.iter().map(|m| m.0).collect();
    let mut moved = 0;
    let mut told_stop = false;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Done>();
        let mut running = 0u32;
        loop {
            while running < parallel && !stop.is_set() {
                let Some(i) = queue.pop_front() else { break };
                let Some(mut t) = assigned[i] else { continue };
                if dead.contains(&t) {
                    // Its target went away while it waited: place it again.
                    room[t] += items[i].mem_bytes;
                    match replace(i, items, targets, &mut room, &tried[i], &dead) {
                        Ok(n) => t = n,
                        Err(why) => {
                            left_behind(&mut report.vkernels[i], &items[i].name, why);
                            assigned[i] = None;
                            continue;
                        }
                    }
                    assigned[i] = Some(t);
                }
                let (name, addr) = (items[i].name.clone(), targets[t].addr.clone());
                println!("moving {name} to {addr}");
                let _ = std::io::stdout().flush();
                let tx = tx.clone();
                scope.spawn(move || {
                    let ui = Ui::lines(&format!("[{name} → {addr}] "));
                    let mut r = send::Report::default();
                    let result = send::migrate_vkernel(state, &name, &addr, opts, &ui, &mut r);
                    let _ = tx.send(Done {
                        item: i,
                        target: t,
                        result,
                        report: r,
                    });
                });
                running += 1;
            }
            if stop.is_set() && !told_stop {
                told_stop = true;
                eprintln!(
                    "Interrupted: no new migration starts; waiting for the {running} running to end"
                );
            }
            if running == 0 {
                break;
            }
            let Ok(done) = rx.recv() else { break };
            running -= 1;
            let (i, t) = (done.item, done.target);
            let addr = &targets[t].addr;
            let vr = &mut report.vkernels[i];
            vr.attempts.push(Attempt {
                target: addr.clone(),
                outcome: if done.report.outcome.is_empty() {
                    "failed before the transfer".into()
                } else {
                    done.report.outcome.clone()
                },
                total_ms: done.report.total_ms,
                downtime_ms: done.report.downtime_ms,
                rounds: done.report.rounds.len(),
                error: done.result.as_ref().err().map(|e| format!("{:#}", e.error)),
            });
            match done.result {
                Ok(()) => {
                    moved += 1;
                    vr.target = Some(addr.clone());
                    vr.outcome = "migrated".into();
                    vr.total_ms = done.report.total_ms;
                    vr.downtime_ms = done.report.downtime_ms;
                    vr.error = None;
                    println!(
                        "moved {} to {addr} in {}, downtime {:.1} ms",
                        items[i].name,
                        human::ms(Duration::from_secs_f64(done.report.total_ms / 1000.0)),
                        done.report.downtime_ms
                    );
                }
                Err(e) => {
                    let why = format!("{:#}", e.error);
                    eprintln!("Moving {} to {addr} failed: {why}", items[i].name);
                    match e.stage {
                        Stage::Commit => {
                            // It runs there; only our stopped copy is left to remove.
                            moved += 1;
                            vr.target = Some(addr.clone());
                            vr.outcome = "migrated; its stopped copy here remains".into();
                            vr.error = Some(why);
                            continue;
                        }
                        Stage::Source => {
                            left_behind(vr, &items[i].name, why);
                            continue;
                        }
                        Stage::Connect => {
                            eprintln!(
                                "{addr} is unreachable: the vkernels planned for it go elsewhere"
                            );
                            dead.push(t);
                        }
                        Stage::Refused | Stage::Transfer => {}
                    }
                    room[t] += items[i].mem_bytes;
                    tried[i].push(t);
                    match replace(i, items, targets, &mut room, &tried[i], &dead) {
                        Ok(n) => {
                            eprintln!("{}: trying {} next", items[i].name, targets[n].addr);
                            assigned[i] = Some(n);
                            // A retry goes before the vkernels that have not started yet.
                            queue.push_front(i);
                        }
                        Err(no) => {
                            left_behind(vr, &items[i].name, format!("{why}; and {no}"));
                            assigned[i] = None;
                        }
                    }
                }
            }
        }
    });
    for i in queue {
        if report.vkernels[i].target.is_none() && report.vkernels[i].outcome != "left behind" {
            left_behind(
                &mut report.vkernels[i],
                &items[i].name,
                "interrupted before its migration began".into(),
            );
        }
    }
    moved
}

/// A new target for item `i` other than those in `tried` and `dead`, its room taken.
fn replace(
    i: usize,
    items: &[Item],
    targets: &[Target],
    room: &mut [u64],
    tried: &[usize],
    dead: &[usize],
) -> Result<usize, String> {
    let exclude: Vec<usize> = tried.iter().chain(dead).copied().collect();
    let t = best_fit(&items[i], i, targets, room, &exclude)?;
    room[t] -= items[i].mem_bytes;
    Ok(t)
}

fn left_behind(vr: &mut VkReport, name: &str, why: String) {
    eprintln!("{name} stays here: {why}");
    vr.outcome = "left behind".into();
    vr.target = None;
    vr.error = Some(why);
}

/// What a vkernel would offer, and how fast it writes: a short freeze to capture it (as the
/// start of `send`), then its writes tracked for `sample`. It runs on meanwhile.
fn probe(state: &StateDir, name: &str, sample: Duration) -> Result<(Item, Offer)> {
    let rec = super::running(state, name)?;
    let live = LiveOptions {
        capture: super::capture_options(&rec),
        init_pid: rec.init_pid,
        compression: false,
        streams: 1,
    };
    let (mut precopy, vk) =
        Precopy::start(live).with_context(|| format!("Cannot capture vkernel {name}"))?;
    let rate = precopy
        .sample_dirty_rate(sample)
        .with_context(|| format!("Cannot sample how fast vkernel {name} writes"))?;
    drop(precopy);
    let offer = send::make_offer(&vk, "")?;
    let item = Item {
        name: name.to_owned(),
        mem_bytes: offer.mem_bytes,
        dirty_bytes_per_s: rate,
    };
    Ok((item, offer))
}

async fn ask_capacity(addr: &str, tls: &TlsDir, probes: &[Offer]) -> Result<Capacity> {
    let (sock, server_name) = send::resolve(addr)?;
    let session = vkm_transport::connect(sock, &server_name, tls, &Tuning::bulk())
        .await
        .with_context(|| format!("Cannot connect to {addr}"))?;
    let answer = send::ask_daemon(
        session,
        ToDaemon::Capacity {
            probes: probes.to_vec(),
        },
    )
    .await
    .with_context(|| {
        format!("{addr} did not answer the capacity query (is its vkmigrate older than this one?)")
    })?;
    match answer {
        FromDaemon::Capacity(c) if c.refusals.len() == probes.len() => Ok(*c),
        FromDaemon::Refuse { reason } => Err(anyhow!("{addr}: {reason}")),
        other => Err(anyhow!("Unexpected answer from {addr}: {other:?}")),
    }
}

/// The planner's view of a target, and the report's.
fn target_of(addr: &str, c: Capacity, n: usize) -> (Target, TargetReport) {
    let refusals = match &c.draining {
        Some(d) => vec![Some(format!("it is drained ({d})")); n],
        None => c.refusals,
    };
    let t = Target {
        addr: addr.to_owned(),
        free_bytes: c.free_bytes,
        refusals,
    };
    let tr = TargetReport {
        addr: addr.to_owned(),
        free_bytes: c.free_bytes,
        vkernels: c.vkernels,
        draining: c.draining,
        error: None,
    };
    (t, tr)
}

fn print_plan(items: &[Item], targets: &[Target], plan: &Plan, unprobed: &[(String, String)]) {
    println!("targets:");
    for t in targets {
        println!("  {}: {} free", t.addr, human::mib(t.free_bytes));
    }
    println!(
        "plan ({} vkernels, in this order):",
        items.len() + unprobed.len()
    );
    for (n, &(i, t)) in plan.moves.iter().enumerate() {
        let it = &items[i];
        println!(
            "  {}. {} ({}, writes {:.1} MB/s) -> {}",
            n + 1,
            it.name,
            human::mib(it.mem_bytes),
            it.dirty_bytes_per_s / 1e6,
            targets[t].addr
        );
    }
    for (i, why) in &plan.unplaced {
        println!(
            "  cannot place {} ({}): {why}",
            items[*i].name,
            human::mib(items[*i].mem_bytes)
        );
    }
    for (name, why) in unprobed {
        println!("  cannot place {name}: {why}");
    }
    let _ = std::io::stdout().flush();
}

/// Sleep until `at`; Ctrl-C or SIGTERM meanwhile cancels (an error: nothing was done).
fn wait_until(at: SystemTime, stop: &Stop) -> Result<()> {
    let Ok(left) = at.duration_since(SystemTime::now()) else {
        println!(
            "{} is past; starting now",
            humantime::format_rfc3339_seconds(at)
        );
        return Ok(());
    };
    println!(
        "waiting until {} ({} from now); Ctrl-C cancels",
        humantime::format_rfc3339_seconds(at),
        humantime::format_duration(Duration::from_secs(left.as_secs()))
    );
    let _ = std::io::stdout().flush();
    loop {
        if stop.is_set() {
            bail!("Cancelled before the evacuation began; nothing was touched");
        }
        match at.duration_since(SystemTime::now()) {
            Ok(d) if !d.is_zero() => std::thread::sleep(d.min(Duration::from_millis(100))),
            _ => return Ok(()),
        }
    }
}

/// Set once Ctrl-C or SIGTERM arrives. From then on (by design) those signals no longer
/// kill the process: a migration cut off in the middle would leave its vkernel frozen until
/// its thaw, so the evacuation ends its running migrations and starts no new one.
struct Stop(Arc<AtomicBool>);

impl Stop {
    fn watch() -> Result<Stop> {
        use tokio::signal::unix::{signal, SignalKind};
        let flag = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("Cannot start the signal watcher")?;
        // Registered here, before we return, so that no Ctrl-C from now on is missed.
        let (mut int, mut term) = {
            let _guard = rt.enter();
            (
                signal(SignalKind::interrupt()).context("Cannot handle SIGINT")?,
                signal(SignalKind::terminate()).context("Cannot handle SIGTERM")?,
            )
        };
        let f = Arc::clone(&flag);
        std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    f.store(true, Ordering::SeqCst);
                }
            })
        });
        Ok(Stop(flag))
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The draining marker while the evacuation runs; removed on Drop unless told to stay.
struct Drain<'a> {
    state: &'a StateDir,
    stay: bool,
}

impl<'a> Drain<'a> {
    fn set(state: &'a StateDir, stay: bool) -> Result<Drain<'a>> {
        let note = format!(
            "evacuation by pid {} since {}",
            std::process::id(),
            human::rfc3339(human::now_unix())
        );
        state.set_draining(&note)?;
        Ok(Drain { state, stay })
    }
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        if self.stay {
            println!("this host stays drained; `vkmigrate undrain` lets vkernels arrive again");
            return;
        }
        if let Err(e) = self.state.clear_draining() {
            eprintln!("Warning: {e:#}; run `vkmigrate undrain` to accept vkernels again");
        }
    }
}

pub fn undrain(state: &StateDir, _args: UndrainArgs) -> Result<()> {
    if state.clear_draining()? {
        println!("this host accepts vkernels again");
    } else {
        println!("this host was not drained");
    }
    Ok(())
}
