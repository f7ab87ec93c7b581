//! `vkmigrate listen`: the daemon that receives vkernels. It checks each offer, and for one it
//! accepts starts a shim (`__shim receive`) that takes the migration over on a port of its own:
//! that shim must be the tracer of the restored processes and their parent, so the transfer
//! runs in it, not here. The daemon also answers a sender that lost its link after `go` and
//! asks whether the vkernel runs here.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result};
use vkm_common::live::{Capacity, FromDaemon, Offer, ToDaemon};
use vkm_transport::{Server, Session, TlsDir, Tuning};

use crate::cli::{ListenArgs, LogFormat};
use crate::shim::{Reply, Shim};
use crate::state::{validate_name, StateDir};

pub fn listen(state: &StateDir, log_format: LogFormat, args: ListenArgs) -> Result<()> {
    let tls = TlsDir::load(&args.tls_dir)
        .with_context(|| format!("Cannot load the TLS files in {}", args.tls_dir.display()))?;
    std::fs::create_dir_all(state.root()).with_context(|| {
        format!(
            "Cannot create the state directory {}",
            state.root().display()
        )
    })?;
    let rt = crate::net_runtime()?;
    rt.block_on(async {
        let server = Server::bind(args.addr, &tls, &Tuning::bulk())
            .with_context(|| format!("Cannot listen on {}", args.addr))?;
        let local = server.local_addr()?;
        println!("listening on {local}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tracing::info!(addr = %local, "listening");
        let ctx = Arc::new(Ctx {
            state: StateDir::new(state.root()),
            tls_dir: args.tls_dir.clone(),
            bind_ip: local.ip(),
            log_format,
            max_memory: args.max_memory,
            ledger: Mutex::new(BTreeMap::new()),
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("Cannot handle SIGTERM")?;
        loop {
            tokio::select! {
                incoming = server.incoming() => {
                    let Some(incoming) = incoming else { break };
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(async move {
                        let peer = incoming.remote_address();
                        match incoming.accept().await {
                            Ok(session) => {
                                if let Err(e) = handle(ctx, session).await {
                                    tracing::warn!(%peer, error = %format!("{e:#}"), "connection failed");
                                }
                            }
                            // A peer without a certificate of our CA ends here, before any state.
                            Err(e) => tracing::warn!(%peer, error = %e, "connection refused"),
                        }
                    });
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        tracing::info!("stopping");
        server.close();
        Ok::<(), anyhow::Error>(())
    })?;
    // Migrations in flight belong to their shims, which go on without us.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

struct Ctx {
    state: StateDir,
    tls_dir: std::path::PathBuf,
    bind_ip: std::net::IpAddr,
    log_format: LogFormat,
    /// `--max-memory`: what the vkernels here may use in all.
    max_memory: Option<u64>,
    /// Memory of the vkernels this daemon accepted (name → bytes of their offer), counted
    /// as their offer said rather than as their resident size, so that the budget is spent
    /// in the same units the senders plan in.
    ledger: Mutex<BTreeMap<String, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    bytes: u64,
    /// Runs here now (else still arriving, and its pages not here yet).
    arrived: bool,
}

impl Ctx {
    fn ledger(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panic elsewhere leaves a map that is still consistent.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Memory this host can still give to arriving vkernels: what the kernel says is
    /// available, and within `--max-memory` what the running and arriving vkernels leave.
    fn free_bytes(&self, ledger: &mut BTreeMap<String, Entry>) -> Result<u64, String> {
        let avail = vkm_sys::host::mem_available().map_err(|e| e.to_string())?;
        let Some(max) = self.max_memory else {
            return Ok(avail);
        };
        Ok(avail.min(max.saturating_sub(self.used(ledger))))
    }

    /// What the vkernels here use or were promised: arriving ones and those that came
    /// through us by their offers, others (started here with `run`) by their resident size.
    fn used(&self, ledger: &mut BTreeMap<String, Entry>) -> u64 {
        use crate::state::Probe;
        let mut used = 0;
        let mut alive = Vec::new();
        for name in self.state.names().unwrap_or_default() {
            if let Ok(Probe::Alive(rec)) = self.state.probe(&name) {
                match ledger.get(&name) {
                    Some(e) => used += e.bytes,
                    None => used += super::ps::vkernel_rss(rec.init_pid),
                }
                alive.push(name);
            }
        }
        // A vkernel that arrived and has gone since (killed, or sent on) uses nothing.
        ledger.retain(|name, e| !e.arrived || alive.contains(name));
        used + ledger
            .iter()
            .filter(|(name, e)| !e.arrived && !alive.contains(name))
            .map(|(_, e)| e.bytes)
            .sum::<u64>()
    }

    /// The answer to a capacity query: room, and per probe whether this host could run it.
    fn capacity(&self, probes: &[Offer]) -> Result<Capacity, String> {
        use crate::state::Probe;
        let free_bytes = self.free_bytes(&mut self.ledger())?;
        let vkernels: Vec<String> = self
            .state
            .names()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !matches!(self.state.probe(n), Ok(Probe::Absent | Probe::Stale)))
            .collect();
        let refusals = probes
            .iter()
            .map(|p| {
                if let Err(e) = validate_name(&p.name) {
                    return Some(format!("the name {:?} is not valid here: {e}", p.name));
                }
                if vkernels.contains(&p.name) {
                    return Some(format!("a vkernel named {} already exists here", p.name));
                }
                vkm_migrate_dst::check_compat(p).err()
            })
            .collect();
        let (xcr0, xstate_size) = vkm_sys::host::xsave_features();
        Ok(Capacity {
            free_bytes,
            vkernels,
            xcr0,
            xstate_size,
            draining: self.state.draining(),
            refusals,
        })
    }
}

async fn handle(ctx: Arc<Ctx>, session: Session) -> Result<()> {
    let Session { conn, mut control } = session;
    let peer = conn
        .peer_name()
        .unwrap_or_else(|| conn.remote_address().to_string());
    let msg: ToDaemon = crate::wire::recv(&mut control, "sender").await?;
    let reply = match msg {
        ToDaemon::Offer(offer) => {
            // Its clocks were read as it left the sender (see `send`), less than a round trip
            // before it arrived: the vkernel's clocks here go on from that moment. Taken a
            // round trip early they run a little ahead, never behind: a guest whose monotonic
            // clock steps back may stall (a UML set back by 3 s never ticked again).
            let sent_at =
                vkm_sys::calls::clock_ns(libc::CLOCK_MONOTONIC) - conn.rtt().as_nanos() as i128;
            tracing::info!(%peer, vkernel = %offer.name, mem_mib = offer.mem_bytes >> 20, "offer");
            let ctx2 = Arc::clone(&ctx);
            let (reply, shim) =
                tokio::task::spawn_blocking(move || accept_offer(&ctx2, &offer, sent_at))
                    .await
                    .context("The offer check panicked")?;
            if let Some(shim) = shim {
                // Follow the shim until the vkernel runs or the migration fails, for our log
                // and to release its memory reservation.
                let ctx = Arc::clone(&ctx);
                tokio::task::spawn_blocking(move || follow(&ctx, shim));
            }
            reply
        }
        ToDaemon::Capacity { probes } => {
            tracing::info!(%peer, vkernels = probes.len(), "capacity query");
            let ctx2 = Arc::clone(&ctx);
            let answer = tokio::task::spawn_blocking(move || ctx2.capacity(&probes))
                .await
                .context("The capacity check panicked")?;
            match answer {
                Ok(c) => FromDaemon::Capacity(Box::new(c)),
                Err(reason) => FromDaemon::Refuse {
                    reason: format!("cannot work out this host's capacity: {reason}"),
                },
            }
        }
        ToDaemon::Query { name, migration_id } => {
            use crate::state::Probe;
            match ctx.state.probe(&name) {
                Ok(Probe::Alive(rec)) => FromDaemon::Outcome {
                    running: rec.migration_id.as_deref() == Some(migration_id.as_str()),
                    pending: false,
                },
                // Its shim is still at work: it either publishes it or gives up.
                Ok(Probe::Busy) | Err(_) => FromDaemon::Outcome {
                    running: false,
                    pending: true,
                },
                // No shim: a vkernel whose shim died after the commit point runs on all the
                // same (its arrival note says where).
                Ok(Probe::Absent | Probe::Stale) => FromDaemon::Outcome {
                    running: ctx.state.arrival_runs(&migration_id),
                    pending: false,
                },
            }
        }
    };
    if let FromDaemon::Refuse { reason } = &reply {
        tracing::warn!(%peer, %reason, "offer refused");
    }
    crate::wire::send(&mut control, &reply, "sender").await?;
    let _ = control.finish();
    // Let the reply reach the peer before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    Ok(())
}

/// Check an offer, claim the name, start the receiving shim.
fn accept_offer(ctx: &Ctx, offer: &Offer, sent_at: i128) -> (FromDaemon, Option<(String, Shim)>) {
    let refuse = |reason: String| (FromDaemon::Refuse { reason }, None);
    if let Err(e) = validate_name(&offer.name) {
        return refuse(format!("the name {:?} is not valid here: {e}", offer.name));
    }
    // Checked at every offer, so that `evacuate` on this host stops arrivals at once.
    if let Some(note) = ctx.state.draining() {
        return refuse(format!(
            "this host accepts no vkernels while it is drained ({note}); when that is over, \
             run `vkmigrate undrain` on it"
        ));
    }
    if let Err(reason) = vkm_migrate_dst::check_offer(offer) {
        return refuse(reason);
    }
    {
        let mut ledger = ctx.ledger();
        if let Some(max) = ctx.max_memory {
            let free = match ctx.free_bytes(&mut ledger) {
                Ok(f) => f,
                Err(e) => return refuse(format!("cannot work out the memory left here: {e}")),
            };
            if offer.mem_bytes > free {
                return refuse(format!(
                    "not enough memory: the vkernel needs {} MiB, {} MiB of this host's \
                     --max-memory of {} MiB are left",
                    offer.mem_bytes.div_ceil(1 << 20),
                    free >> 20,
                    max >> 20
                ));
            }
        }
        ledger.insert(
            offer.name.clone(),
            Entry {
                bytes: offer.mem_bytes,
                arrived: false,
            },
        );
    }
    let (reply, shim) = start_receiver(ctx, offer, sent_at);
    if shim.is_none() {
        ctx.ledger().remove(&offer.name);
    }
    (reply, shim)
}

/// Claim the name and start the receiving shim for an offer that passed the checks.
/// `sent_at`: when the offer left the sender, on our CLOCK_MONOTONIC (its clocks are from then).
fn start_receiver(ctx: &Ctx, offer: &Offer, sent_at: i128) -> (FromDaemon, Option<(String, Shim)>) {
    let refuse = |reason: String| (FromDaemon::Refuse { reason }, None);
    let claim = match ctx.state.claim(&offer.name) {
        Ok(c) => c,
        Err(e) => return refuse(format!("{e:#}")),
    };
    let mode: Vec<OsString> = vec![
        "receive".into(),
        "--name".into(),
        offer.name.clone().into(),
        "--bind".into(),
        std::net::SocketAddr::new(ctx.bind_ip, 0).to_string().into(),
        "--tls-dir".into(),
        ctx.tls_dir.clone().into(),
        "--migration-id".into(),
        offer.migration_id.clone().into(),
        format!("--mono-ns={}", offer.clocks.monotonic_ns).into(),
        format!("--boot-ns={}", offer.clocks.boottime_ns).into(),
        format!("--at-ns={sent_at}").into(),
    ];
    let mut shim = match Shim::spawn(&ctx.state, claim, &offer.name, mode, ctx.log_format) {
        Ok(s) => s,
        Err(e) => return refuse(format!("cannot start a shim: {e:#}")),
    };
    match shim.next_reply() {
        Ok(Reply::Receiving { port }) => (
            FromDaemon::Accept { port },
            Some((offer.name.clone(), shim)),
        ),
        Ok(Reply::Failed { chain }) => {
            shim.reap();
            refuse(chain.join(": "))
        }
        Ok(other) => refuse(format!("the shim reported {other:?} first")),
        Err(e) => refuse(format!("{e:#}")),
    }
}

fn follow(ctx: &Ctx, (name, mut shim): (String, Shim)) {
    let reply = shim.next_reply();
    // Arrived (it keeps its share of the budget while it runs here) or failed (it needs
    // none).
    {
        let mut ledger = ctx.ledger();
        match (&reply, ledger.get_mut(&name)) {
            (Ok(Reply::Ready { .. }), Some(e)) => e.arrived = true,
            _ => {
                ledger.remove(&name);
            }
        }
    }
    match reply {
        Ok(Reply::Ready { init_pid, .. }) => {
            tracing::info!(vkernel = %name, init_pid, "vkernel arrived and runs");
            shim.wait();
        }
        Ok(Reply::Failed { chain }) => {
            tracing::warn!(vkernel = %name, error = %chain.join(": "), "migration failed");
            shim.reap();
        }
        Ok(other) => tracing::warn!(vkernel = %name, reply = ?other, "unexpected shim status"),
        Err(e) => {
            tracing::warn!(vkernel = %name, error = %format!("{e:#}"), "the receiving shim died")
        }
    }
}
