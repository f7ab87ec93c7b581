//! Live migration: the messages both sides exchange, the layout delta between the skeleton the
//! destination built early and the final state, and the pre-copy convergence policy. Pure: the
//! drivers that move these over QUIC live with the CLI.
//!
//! The conversation (DESIGN §4):
//!
//! ```text
//!  source                                   listen daemon (destination)
//!  Offer ─────────────────────────────────▶ checks: name free, memory, CPU, kernel, files
//!        ◀───────────────────── Accept{port} | Refuse{reason}
//!  source                                   receiver (a new shim on the destination)
//!  Hello, Skeleton(vk) ───────────────────▶ builds processes and address spaces
//!        ◀──────────────────────────────── SkeletonReady
//!  pages, round after round (page streams) ▶ written straight into the skeleton
//!  RoundDone{frames} ─────────────────────▶ (after each round)
//!        ◀──────────────────────────────── RoundApplied
//!  [Skeleton(vk) ─────────────────────────▶ the processes changed: a new skeleton,
//!        ◀──────────────────────────────── SkeletonReady   and every page again]
//!  (freeze) a barrier on every page stream,
//!  the pages written since the last round,
//!  a second barrier (all while it captures)
//!  Final{vk, frames, fresh, rebuild} ─────▶ waits for those frames, applies the layout delta
//!                                           (or rebuilds), then lets the page streams past
//!                                           their barriers
//!  last pages, Commit{frames} ────────────▶ fds, signals, timers, registers: all but running
//!        ◀──────────────────────────────── Ready
//!  Go ────────────────────────────────────▶ every thread runs
//!        ◀──────────────────────────────── Resumed (the pause ends)
//!        ◀──────────────────────────────── Running (recorded there)
//!  (source discards its copy)
//! ```
//!
//! Any failure before `Go` makes the source thaw and the receiver tear its copy down.
//!
//! A page stream carries runs, each a `u32` length and the run ([`crate::image::decode_run`]);
//! a length of 0 is a barrier. After the first, the runs are the final round's, which may go
//! into mappings the layout delta has yet to make. The source sends them without waiting for
//! the delta (a round trip less while the vkernel is frozen), and the pages written since the
//! last round even before it has captured the state: those are the *early* ones, up to the
//! second barrier, valid unless the skeleton is rebuilt (`Final::rebuild`), when the
//! destination drops them and every page comes again after the second barrier.
//!
//! The offer and its answer are CBOR, like the image's metadata, so that any version can read
//! another's offer and refuse it by its `version`. What follows ([`ToReceiver`],
//! [`FromReceiver`]) is postcard ([`encode_msg`]): the final state is decoded while the
//! vkernel is frozen, and CBOR (field names, one small read at a time) took 0.3 ms of that.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Clocks, CpuInfo, Mm, Vkernel};

/// The barrier on a page stream (a run of length 0, see above).
pub const PAGE_STREAM_BARRIER: [u8; 4] = 0u32.to_le_bytes();

/// Version of the conversation above; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 4;

/// A message of the conversation after the offer, as it goes on the control stream.
pub fn encode_msg<T: Serialize>(msg: &T) -> crate::error::Result<Vec<u8>> {
    postcard::to_stdvec(msg).map_err(crate::error::CommonError::MsgEncode)
}

/// The message in `bytes` (see [`encode_msg`]); bytes after it are an error.
pub fn decode_msg<T: DeserializeOwned>(bytes: &[u8]) -> crate::error::Result<T> {
    let (msg, rest) = postcard::take_from_bytes(bytes)
        .map_err(|e| crate::error::CommonError::MsgDecode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(crate::error::CommonError::MsgDecode(format!(
            "{} bytes follow it",
            rest.len()
        )));
    }
    Ok(msg)
}

/// What the destination must provide to run the vkernel, sent before any state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Offer {
    pub version: u32,
    pub name: String,
    /// Random id of this migration, to ask about its outcome later.
    pub migration_id: String,
    /// Memory the vkernel's pages need (resident, not virtual).
    pub mem_bytes: u64,
    pub cpu: CpuInfo,
    /// The source's vDSO hash: restore needs the same kernel build.
    pub vdso_hash: Vec<u8>,
    pub kernel_release: String,
    /// Files the vkernel maps: they must be the same on the destination.
    pub files: Vec<MappedFile>,
    /// The vkernel's CLOCK_MONOTONIC/BOOTTIME when the offer was sent.
    pub clocks: Clocks,
    /// Its tun/tap devices: the destination checks that it can recreate them (name free,
    /// bridge there, no address clash) before accepting.
    #[serde(default)]
    pub net: Vec<crate::net::NetDev>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappedFile {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
}

/// Source → listen daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToDaemon {
    Offer(Box<Offer>),
    /// After a lost link: does the vkernel of that migration run here?
    Query {
        name: String,
        migration_id: String,
    },
    /// Appended (the variants above keep their encoding): how much room is there, and could
    /// this host run each of these vkernels? Nothing is claimed or started; an evacuation
    /// plans with the answer ([`Capacity`]).
    Capacity {
        /// The offers the vkernels would make (their `migration_id` unused).
        probes: Vec<Offer>,
    },
}

/// A daemon's answer to [`ToDaemon::Capacity`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Capacity {
    /// Memory it can still give to arriving vkernels (the host's available memory, within its
    /// `--max-memory` budget).
    pub free_bytes: u64,
    /// The vkernels it runs (or is receiving) now.
    pub vkernels: Vec<String>,
    /// Its CPU state layout: XCR0 and the xsave area's size.
    pub xcr0: u64,
    pub xstate_size: u32,
    /// Set while its own host is being evacuated: it accepts no vkernel, this says why.
    pub draining: Option<String>,
    /// Per probe, in order: `None` if it could run it (memory aside: that is `free_bytes`),
    /// else why not (name taken, CPU, kernel build, network, mapped files).
    pub refusals: Vec<Option<String>>,
}

/// Listen daemon → source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FromDaemon {
    /// Connect to this UDP port of the same address: a receiver waits there.
    Accept {
        port: u16,
    },
    Refuse {
        reason: String,
    },
    /// The answer to a query: the vkernel runs here, or certainly does not (`pending`: the
    /// receiving shim is still at work; ask again).
    Outcome {
        running: bool,
        pending: bool,
    },
    /// Appended: the answer to [`ToDaemon::Capacity`].
    Capacity(Box<Capacity>),
}

/// Source → receiver.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToReceiver {
    Hello {
        migration_id: String,
    },
    /// The state captured when pre-copy began: the receiver builds processes and address
    /// spaces from it and pages then flow into them. Sent again between rounds when the
    /// vkernel's processes or threads changed: the receiver builds a new skeleton (keeping
    /// its memory objects where [`objects_kept`] says so) and the pages follow again.
    Skeleton(Box<Vkernel>),
    /// A pre-copy round is sent (`frames` per stream so far); answer once they are applied,
    /// so that the sender's round times measure delivery and nothing is in flight when it
    /// freezes.
    RoundDone {
        round: u32,
        frames: Vec<u64>,
    },
    /// The vkernel is frozen. `frames`: page messages sent so far on each page stream, which
    /// the receiver applies before the delta. `fresh`: VMAs (mm id, start) of `vk` whose
    /// contents the source did not track; the receiver maps them anew and the source sends
    /// every page of them. `rebuild`: the process tree changed; build a new skeleton from
    /// `vk`, all pages follow.
    Final {
        vk: Box<Vkernel>,
        frames: Vec<u64>,
        fresh: Vec<(u32, u64)>,
        rebuild: bool,
    },
    /// Every page has been sent (`frames` per stream in total): apply the rest of the state.
    Commit {
        frames: Vec<u64>,
    },
    /// Run the vkernel.
    Go,
    /// The source gives up (the reason is for the receiver's log).
    Abort {
        reason: String,
    },
}

/// Receiver → source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum FromReceiver {
    SkeletonReady {
        build_us: u64,
    },
    RoundApplied {
        round: u32,
    },
    /// Everything is applied; the vkernel runs on `Go`. `apply_us`: the time the restore
    /// took (the layout delta, and all state after the last pages had arrived).
    Ready {
        apply_us: u64,
    },
    /// Every thread runs (the pause is over); `resume_us`: since `Go` arrived.
    Resumed {
        resume_us: u64,
    },
    /// The vkernel is this host's now: `ps` there lists it.
    Running {
        resume_us: u64,
        init_pid: i32,
    },
    /// The error chain, outermost first.
    Failed {
        chain: Vec<String>,
    },
}

/// What the receiver must change in an address space built from the skeleton's `before` to
/// make it `after`: ranges to unmap (VMAs that are gone or changed) and VMAs of `after` to map
/// (new or changed). Unchanged VMAs keep the pages that pre-copy wrote into them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmaDelta {
    pub unmap: Vec<(u64, u64)>,
    /// Indices into `after.vmas`.
    pub map: Vec<usize>,
}

impl VmaDelta {
    pub fn is_empty(&self) -> bool {
        self.unmap.is_empty() && self.map.is_empty()
    }
}

/// The delta between two layouts of one address space: a VMA is unchanged when all it is
/// mapped by is equal. `fresh` names VMAs of `after` (by start) to map anew even if
/// unchanged, because their contents were not tracked.
pub fn vma_delta(before: &Mm, after: &Mm, fresh: &[u64]) -> VmaDelta {
    let mut d = VmaDelta::default();
    for b in &before.vmas {
        if !after.vmas.contains(b) {
            d.unmap.push((b.start, b.end));
        }
    }
    for (i, a) in after.vmas.iter().enumerate() {
        if fresh.contains(&a.start) || !before.vmas.contains(a) {
            d.map.push(i);
        }
    }
    d
}

/// Whether the skeleton built from `before` can become `after` by per-VMA deltas: the same
/// processes (pids, parents, sessions, groups, threads, address space and fd table sharing,
/// zombies), the same memory objects, and special mappings in place. Otherwise the receiver
/// rebuilds from `after`.
pub fn skeleton_fits(before: &Vkernel, after: &Vkernel) -> bool {
    skeleton_misfit(before, after).is_none()
}

/// Why a skeleton built from `before` does not fit `after` (see [`skeleton_fits`]), for the
/// log: a rebuild sends every page again.
pub fn skeleton_misfit(before: &Vkernel, after: &Vkernel) -> Option<String> {
    let procs_same = before.processes.len() == after.processes.len()
        && before.processes.iter().zip(&after.processes).all(|(a, b)| {
            a.pid == b.pid
                && a.ppid == b.ppid
                && a.pgid == b.pgid
                && a.sid == b.sid
                && a.mm == b.mm
                && a.fd_table == b.fd_table
                && a.zombie.is_some() == b.zombie.is_some()
                && a.threads.len() == b.threads.len()
                && a.threads
                    .iter()
                    .zip(&b.threads)
                    .all(|(x, y)| x.tid == y.tid)
        });
    let objects_same = before.objects == after.objects;
    let mms_same = before.mms.len() == after.mms.len()
        && before.mms.iter().zip(&after.mms).all(|(a, b)| {
            a.id == b.id && {
                let specials = |m: &Mm| -> Vec<(u64, u64)> {
                    m.vmas
                        .iter()
                        .filter(|v| v.backing.is_special())
                        .map(|v| (v.start, v.end))
                        .collect()
                };
                specials(a) == specials(b)
            }
        });
    if !procs_same {
        let pids = |v: &Vkernel| {
            v.processes
                .iter()
                .map(|p| format!("{}:{}", p.pid, p.threads.len()))
                .collect::<Vec<_>>()
                .join(" ")
        };
        return Some(format!(
            "processes (pid:threads) were [{}], are [{}]",
            pids(before),
            pids(after)
        ));
    }
    if !objects_same {
        return Some("the memory objects changed".into());
    }
    if !mms_same {
        return Some("a special mapping (vdso, vvar) moved".into());
    }
    None
}

/// Whether a destination that rebuilds its skeleton (see [`skeleton_fits`]) keeps its memory
/// objects and their contents: the same objects, none of them a SysV segment (those belong to
/// the sandbox's IPC namespace and are recreated with the tree). Both ends decide this from
/// the same two descriptions.
pub fn objects_kept(before: &Vkernel, after: &Vkernel) -> bool {
    !after.objects.is_empty()
        && before.objects == after.objects
        && !after
            .objects
            .iter()
            .any(|o| matches!(o.kind, crate::model::ObjectKind::SysV(_)))
}

/// When to stop pre-copy (QEMU's rule, with a floor on what a round can achieve).
#[derive(Debug, Clone, Copy)]
pub struct Convergence {
    /// The pause the operator accepts.
    pub downtime_ms: u64,
    /// Give up iterating after this many rounds.
    pub max_rounds: u32,
}

/// What the last pre-copy round saw the vkernel do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundLoad {
    /// Bytes per second it wrote.
    pub dirty_rate: f64,
    /// The share of one CPU its threads used, all together.
    pub cpu: f64,
    /// The CPU limit it had meanwhile, in ‰ ([`NO_THROTTLE`]: none).
    pub throttle: u32,
    /// Bytes per second the round that sent what it wrote moved (scattered pages go slower
    /// than round 0's long runs).
    pub send_rate: f64,
}

/// The lowest CPU limit the throttle sets, in ‰ of one CPU (a 1 ms quota per second).
pub const MIN_THROTTLE: u32 = 1;
/// No limit, in ‰ of one CPU.
pub const NO_THROTTLE: u32 = 1000;

/// What the pre-copy loop does after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Send another round.
    Round,
    /// Another round, with the vkernel throttled harder (to this many ‰ of a CPU).
    Throttle(u32),
    /// Freeze and send the rest.
    StopAndCopy,
}

impl Convergence {
    /// Decide after a round. `remaining`: bytes dirty now (what the final round would send);
    /// `bandwidth`: measured bytes per second of page data; `history`: bytes sent by the
    /// rounds after round 0 so far; `throttle`: the current CPU limit in ‰ ([`NO_THROTTLE`]:
    /// none); `load`:
    /// what the vkernel did during the last round, when known.
    pub fn next(
        &self,
        remaining: u64,
        bandwidth: f64,
        history: &[u64],
        throttle: u32,
        load: Option<RoundLoad>,
    ) -> Next {
        let budget = bandwidth * self.downtime_ms as f64 / 1000.0;
        if (remaining as f64) <= budget {
            return Next::StopAndCopy;
        }
        let rounds = history.len() as u32;
        if rounds + 1 >= self.max_rounds {
            return Next::StopAndCopy;
        }
        // Not shrinking: the vkernel writes about as fast as we send. Throttle it, down to
        // MIN_THROTTLE; past that, stop anyway.
        let stalled = history.len() >= 2 && {
            let n = history.len();
            history[n - 1] as f64 >= history[n - 2] as f64 * 0.9
        };
        if !stalled {
            return Next::Round;
        }
        if throttle <= MIN_THROTTLE {
            // Once a round was written under the floor: what was sent before it says nothing
            // of the floor's effect.
            return if load.is_none_or(|l| l.throttle <= MIN_THROTTLE) {
                Next::StopAndCopy
            } else {
                Next::Round
            };
        }
        // At least QEMU's auto-converge step (20 % off first, then 10 % more each time).
        let step = if throttle >= NO_THROTTLE {
            800
        } else {
            throttle.saturating_sub(100)
        };
        // Further when the last round says so: writing scales with the CPU time the vkernel
        // gets, so aim straight at the share at which it writes half as fast as rounds like
        // the last one send (a writer that needs little CPU would otherwise outrun every step
        // of 10 %).
        let aimed = load
            .map(|l| (l, bandwidth.min(l.send_rate)))
            .filter(|(l, bw)| l.dirty_rate > 0.0 && l.cpu > 0.0 && *bw > 0.0)
            .map(|(l, bw)| {
                let share = l.cpu * (bw * 0.5 / l.dirty_rate);
                (share * 1000.0).floor().clamp(0.0, 1000.0) as u32
            });
        Next::Throttle(aimed.map_or(step, |a| a.min(step)).max(MIN_THROTTLE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{prot, Backing, MmFields, Vma};

    #[test]
    fn a_message_decodes_to_what_was_sent_and_nothing_else_does() {
        let msg = FromReceiver::Running {
            resume_us: 412,
            init_pid: 4242,
        };
        let bytes = encode_msg(&msg).expect("encodes");
        assert_eq!(decode_msg::<FromReceiver>(&bytes).expect("decodes"), msg);
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode_msg::<FromReceiver>(&longer)
            .expect_err("trailing bytes")
            .to_string();
        assert!(err.contains("1 bytes follow it"), "{err}");
        assert!(decode_msg::<FromReceiver>(&bytes[..bytes.len() - 1]).is_err());
        // A CBOR message (an older sender's) is refused, not misread.
        let cbor = crate::image::encode_meta(&msg).expect("encodes as CBOR");
        assert!(decode_msg::<FromReceiver>(&cbor).is_err());
    }

    fn vma(start: u64, end: u64, backing: Backing) -> Vma {
        Vma {
            start,
            end,
            prot: prot::READ | prot::WRITE,
            shared: false,
            growsdown: false,
            advise: Vec::new(),
            backing,
        }
    }

    fn mm(vmas: Vec<Vma>) -> Mm {
        Mm {
            id: 0,
            vmas,
            fields: MmFields::default(),
            exe: String::new(),
            vdso: Vec::new(),
        }
    }

    #[test]
    fn delta_keeps_unchanged_and_remaps_the_rest() {
        let before = mm(vec![
            vma(0x1000, 0x5000, Backing::Anon),
            vma(0x10000, 0x20000, Backing::Anon),
            vma(0x7000_0000, 0x7000_2000, Backing::Vdso),
        ]);
        let mut grown = vma(0x10000, 0x30000, Backing::Anon);
        grown.prot = prot::READ;
        let after = mm(vec![
            vma(0x1000, 0x5000, Backing::Anon),
            grown,
            vma(0x40000, 0x41000, Backing::Anon),
            vma(0x7000_0000, 0x7000_2000, Backing::Vdso),
        ]);
        let d = vma_delta(&before, &after, &[]);
        assert_eq!(d.unmap, vec![(0x10000, 0x20000)]);
        assert_eq!(d.map, vec![1, 2]);
        let d = vma_delta(&before, &after, &[0x1000]);
        assert_eq!(d.map, vec![0, 1, 2]);
        assert!(vma_delta(&before, &before, &[]).is_empty());
    }

    #[test]
    fn convergence_stops_when_the_rest_fits_the_downtime() {
        let c = Convergence {
            downtime_ms: 20,
            max_rounds: 30,
        };
        // 1 GB/s: 20 ms carry 20 MB.
        assert_eq!(
            c.next(10_000_000, 1e9, &[50_000_000], NO_THROTTLE, None),
            Next::StopAndCopy
        );
        assert_eq!(
            c.next(30_000_000, 1e9, &[50_000_000], NO_THROTTLE, None),
            Next::Round
        );
        // Not shrinking: throttle, harder each time, then give up.
        let stalled = [30_000_000, 30_000_000];
        assert_eq!(
            c.next(30_000_000, 1e9, &stalled, NO_THROTTLE, None),
            Next::Throttle(800)
        );
        assert_eq!(
            c.next(30_000_000, 1e9, &stalled, 800, None),
            Next::Throttle(700)
        );
        assert_eq!(
            c.next(30_000_000, 1e9, &stalled, MIN_THROTTLE, None),
            Next::StopAndCopy
        );
        // Just set to the floor: what this round sent was written at 10 %; one more round
        // shows what the floor does.
        let at = |throttle| RoundLoad {
            dirty_rate: 30e6,
            cpu: 0.1,
            throttle,
            send_rate: 1e9,
        };
        assert_eq!(
            c.next(30_000_000, 1e9, &stalled, MIN_THROTTLE, Some(at(100))),
            Next::Round
        );
        assert_eq!(
            c.next(
                30_000_000,
                1e9,
                &stalled,
                MIN_THROTTLE,
                Some(at(MIN_THROTTLE))
            ),
            Next::StopAndCopy
        );
        // The round limit.
        assert_eq!(
            c.next(30_000_000, 1e9, &[1; 29], NO_THROTTLE, None),
            Next::StopAndCopy
        );
    }

    /// What a round saw an unthrottled vkernel do: bytes/s written, share of a CPU, bytes/s sent.
    fn unthrottled(dirty_rate: f64, cpu: f64, send_rate: f64) -> RoundLoad {
        RoundLoad {
            dirty_rate,
            cpu,
            throttle: NO_THROTTLE,
            send_rate,
        }
    }

    #[test]
    fn a_writer_that_needs_little_cpu_is_throttled_to_the_share_that_converges() {
        let c = Convergence {
            downtime_ms: 20,
            max_rounds: 30,
        };
        let stalled = [30_000_000, 30_000_000];
        // 200 MB/s on 3 % of a CPU, 500 MB/s sent: at 3 % * 250/200 = 3.75 % it writes half
        // as fast.
        let load = unthrottled(200e6, 0.03, 1e12);
        assert_eq!(
            c.next(30_000_000, 500e6, &stalled, NO_THROTTLE, Some(load)),
            Next::Throttle(37)
        );
        // A busy writer (a whole CPU at 800 MB/s) gets the plain step, never less.
        let busy = unthrottled(800e6, 1.0, 1e12);
        assert_eq!(
            c.next(30_000_000, 500e6, &stalled, NO_THROTTLE, Some(busy)),
            Next::Throttle(312)
        );
        let mild = unthrottled(100e6, 1.0, 1e12);
        assert_eq!(
            c.next(30_000_000, 500e6, &stalled, NO_THROTTLE, Some(mild)),
            Next::Throttle(800)
        );
        // Aimed at what rounds of scattered pages send, not at round 0's speed: 200 MB/s on
        // 14 % of a CPU, sent at 250 MB/s, writes half as fast on 8.75 %.
        let scattered = unthrottled(200e6, 0.14, 250e6);
        assert_eq!(
            c.next(30_000_000, 500e6, &stalled, NO_THROTTLE, Some(scattered)),
            Next::Throttle(87)
        );
        // Never below the floor.
        let tiny = unthrottled(1e9, 0.001, 1e12);
        assert_eq!(
            c.next(30_000_000, 500e6, &stalled, 500, Some(tiny)),
            Next::Throttle(MIN_THROTTLE)
        );
    }

    /// The daemon protocol as it was before `Capacity`: a peer of that build must still
    /// understand (and be understood in) every message it knows.
    mod before_capacity {
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        pub enum ToDaemon {
            Offer(Box<super::Offer>),
            Query { name: String, migration_id: String },
        }

        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        pub enum FromDaemon {
            Accept { port: u16 },
            Refuse { reason: String },
            Outcome { running: bool, pending: bool },
        }
    }

    #[test]
    fn capacity_is_appended_without_changing_the_old_messages() {
        use crate::image::{decode_meta, encode_meta};
        let q = ToDaemon::Query {
            name: "web1".into(),
            migration_id: "42".into(),
        };
        let old = before_capacity::ToDaemon::Query {
            name: "web1".into(),
            migration_id: "42".into(),
        };
        assert_eq!(
            encode_meta(&q).expect("encodes"),
            encode_meta(&old).expect("encodes")
        );
        for (new, old) in [
            (
                FromDaemon::Refuse { reason: "x".into() },
                before_capacity::FromDaemon::Refuse { reason: "x".into() },
            ),
            (
                FromDaemon::Accept { port: 7 },
                before_capacity::FromDaemon::Accept { port: 7 },
            ),
            (
                FromDaemon::Outcome {
                    running: true,
                    pending: false,
                },
                before_capacity::FromDaemon::Outcome {
                    running: true,
                    pending: false,
                },
            ),
        ] {
            let bytes = encode_meta(&new).expect("encodes");
            assert_eq!(bytes, encode_meta(&old).expect("encodes"));
            let back: before_capacity::FromDaemon = decode_meta(&bytes).expect("decodes");
            assert_eq!(back, old);
        }
        // A new answer round-trips; an old daemon cannot decode the new request, which the
        // sender reports as a failed capacity query (it asks nothing else on that connection).
        let cap = FromDaemon::Capacity(Box::new(Capacity {
            free_bytes: 1 << 30,
            vkernels: vec!["a".into()],
            xcr0: 7,
            xstate_size: 832,
            draining: None,
            refusals: vec![None, Some("name taken".into())],
        }));
        let back: FromDaemon = decode_meta(&encode_meta(&cap).expect("encodes")).expect("decodes");
        assert_eq!(back, cap);
        let req = encode_meta(&ToDaemon::Capacity { probes: Vec::new() }).expect("encodes");
        assert!(decode_meta::<before_capacity::ToDaemon>(&req).is_err());
    }
}
