//! The source side of a live migration: pre-copy rounds while the vkernel runs, then the
//! final freeze (DESIGN §4). Transport-agnostic: pages leave through a [`PageSink`], the
//! protocol conversation is the caller's.
//!
//! Memory is tracked two ways:
//! - address spaces with a [`DirtyTracker`] each (userfaultfd write-protection + PAGEMAP_SCAN):
//!   round 0 sends every page with state, later rounds what was written since;
//! - memory objects (memfds, tmpfs files, SysV segments) by content: a hash per page, compared
//!   each round, because writes through other processes' mappings or the file itself are
//!   invisible to a tracker.
//!
//! Pages are cut into chunks aligned to [`CHUNK`]; a chunk always goes on the same page stream
//! (chosen from its space and address), so a page sent again in a later round can never
//! overtake its older copy on another stream.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vkm_common::image::{encode_pages_wire, Space, PAGE_SIZE};
use vkm_common::live::{objects_kept, skeleton_misfit, PAGE_STREAM_BARRIER};
use vkm_common::model::{Vkernel, Vma};
use vkm_common::procfs;
use vkm_sys::proc;

use crate::capture::{capture, data_extents, state_runs, CaptureOptions, Captured};
use crate::dirty::DirtyTracker;
use crate::freeze::Frozen;
use crate::{merge_ranges, SrcError};

/// Pages per stream message at most, and the alignment that pins a page to a stream.
pub const CHUNK: u64 = 1 << 20;
const PAGE: u64 = PAGE_SIZE as u64;

/// Where encoded page runs go: `msg` holds `frames` runs in wire form
/// ([`vkm_common::image::EncodedRun::write_wire`]), for page stream `stream`.
pub trait PageSink: Sync {
    fn send(&self, stream: usize, msg: Vec<u8>, frames: u64) -> Result<(), SrcError>;
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub capture: CaptureOptions,
    pub init_pid: i32,
    pub compression: bool,
    /// Page streams (and encoder threads).
    pub streams: usize,
}

/// What one round sent.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundStats {
    pub round: u32,
    /// Pages found dirty (or, in round 0, with state).
    pub pages: u64,
    /// Zero pages not sent (round 0) or sent as empty runs (later rounds).
    pub zero_pages: u64,
    /// Page data before and after encoding.
    pub bytes_raw: u64,
    pub bytes_encoded: u64,
    pub duration_ms: f64,
    /// Every page with state went, not only what changed: round 0, and the first round
    /// after a new skeleton (see [`Precopy::restart`]).
    pub full: bool,
}

struct TrackedMm {
    id: u32,
    pid: i32,
    tracker: Option<DirtyTracker>,
}

struct TrackedObject {
    id: u32,
    file: File,
    size: u64,
    /// Hash of each page as last sent (0 for never sent), stored by the encoder from the very
    /// bytes it sent: a hash taken when the page was found changed could match a later content
    /// that reverted to it (a lock word taken and released) while the destination holds the
    /// content in between.
    hashes: Vec<AtomicU64>,
}

/// Whether a page that is zero now must still be sent, by kind of space: it must where the
/// destination holds earlier contents, and need not where it holds a freshly made (all zero)
/// address space or object.
#[derive(Clone, Copy, Debug)]
struct ZeroIsNews {
    mms: bool,
    objects: bool,
}

impl ZeroIsNews {
    fn of(self, space: Space) -> bool {
        match space {
            Space::Mm(_) => self.mms,
            Space::Object(_) => self.objects,
        }
    }
}

/// One piece of work for an encoder: a page-aligned range of one space.
#[derive(Clone, Copy)]
struct Chunk {
    space: Space,
    start: u64,
    end: u64,
}

/// A running pre-copy.
pub struct Precopy {
    opts: LiveOptions,
    skeleton: Vkernel,
    mms: Vec<TrackedMm>,
    objects: Vec<TrackedObject>,
    /// Messages' frames sent per stream so far.
    frames: Vec<u64>,
    round: u32,
    /// Whether the address spaces' writes are tracked yet (see [`Precopy::track`]).
    tracking: bool,
    /// smaps of every address space, as the last round read it (see [`Precopy::read_smaps`]).
    smaps: BTreeMap<i32, Vec<procfs::Vma>>,
    /// Host pids of the vkernel's processes when pre-copy began (for throttling).
    pub host_pids: Vec<i32>,
    /// Host tids of each process (by host pid) the skeleton was captured with.
    tree: BTreeMap<i32, Vec<i32>>,
    /// The tree as the last [`Precopy::tree_settled_otherwise`] saw it.
    tree_seen: Option<BTreeMap<i32, Vec<i32>>>,
    /// The next round sends every page with state.
    full: bool,
    /// Bytes of address-space pages the last full round found: what a skeleton rebuilt in
    /// the pause sends again (see [`Precopy::tree_settled_otherwise`]).
    mm_bytes: u64,
}

impl Precopy {
    /// Freeze the vkernel for a moment to capture the skeleton's state and let it run again.
    /// Returns the state the destination builds its skeleton from. Its writes are tracked
    /// from [`Precopy::track`] on.
    pub fn start(opts: LiveOptions) -> Result<(Precopy, Vkernel), SrcError> {
        let mut copts = opts.capture.clone();
        // Round 0 finds the pages with state itself, as they are then.
        copts.skip_page_runs = true;
        // smaps walks every page table (about 20 ms per GiB): read while the vkernel runs,
        // not while it waits for us (see `CaptureOptions::known_smaps`).
        copts.known_smaps = crate::capture::smaps_of(proc::descendants(opts.init_pid)?);
        let mut frozen = Frozen::freeze(opts.init_pid)?;
        let captured = capture(&frozen, &copts);
        let host_pids: Vec<i32> = frozen
            .processes
            .iter()
            .filter(|p| p.zombie.is_none())
            .map(|p| p.host_pid)
            .collect();
        // As /proc will show it: a zombie's task list holds its leader alone.
        let tree = frozen
            .processes
            .iter()
            .map(|p| {
                let mut tids = if p.zombie.is_some() {
                    vec![p.host_pid]
                } else {
                    p.threads.clone()
                };
                tids.sort_unstable();
                (p.host_pid, tids)
            })
            .collect();
        frozen.thaw();
        drop(frozen);
        let Captured { vk, memory, held } = captured?;
        crate::checkpoint::redeliver(&held);
        let mms = memory
            .mms
            .iter()
            .map(|m| TrackedMm {
                id: m.id,
                pid: m.pid,
                tracker: None,
            })
            .collect();
        let objects = memory
            .objects
            .into_iter()
            .map(|o| TrackedObject {
                id: o.id,
                hashes: (0..o.size.div_ceil(PAGE))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                file: o.file,
                size: o.size,
            })
            .collect();
        let streams = opts.streams.max(1);
        Ok((
            Precopy {
                opts,
                skeleton: vk.clone(),
                mms,
                objects,
                frames: vec![0; streams],
                round: 0,
                tracking: false,
                smaps: BTreeMap::new(),
                host_pids,
                tree,
                tree_seen: None,
                full: true,
                mm_bytes: 0,
            },
            vk,
        ))
    }

    /// Whether the vkernel's processes or threads differ from those the skeleton was captured
    /// with, as /proc shows them now, and are the same as at the last call: a tree that
    /// changed and then stayed. If so, the final freeze will find that the skeleton does not
    /// fit and the destination will rebuild it in the pause, with every page of the address
    /// spaces ([`Precopy::mm_bytes`]) going again; [`Precopy::restart`] does that while the
    /// vkernel runs instead. A tree that keeps changing (a busy UML's guest processes come
    /// and go all the time) would not fit a new skeleton either. (The final freeze decides
    /// from the captured state: this is the cheap early look.)
    pub fn tree_settled_otherwise(&mut self) -> bool {
        let now = read_tree(self.opts.init_pid);
        let settled = now
            .as_ref()
            .is_some_and(|t| *t != self.tree && Some(t) == self.tree_seen.as_ref());
        self.tree_seen = now;
        settled
    }

    /// Bytes of address-space pages the last full round found.
    pub fn mm_bytes(&self) -> u64 {
        self.mm_bytes
    }

    /// Capture a new skeleton (a brief freeze, as [`Precopy::start`]) and go on with it: the
    /// next round sends every page with state again, but for memory objects the destination
    /// keeps ([`objects_kept`]), which go on from what it holds. Returns the state the
    /// destination builds its new skeleton from.
    pub fn restart(mut self) -> Result<(Precopy, Vkernel), SrcError> {
        // The old tracking goes first: the capture must not see its registrations.
        for m in &mut self.mms {
            m.tracker = None;
        }
        let (mut next, vk) = Precopy::start(self.opts.clone())?;
        next.frames = self.frames;
        next.round = self.round;
        if objects_kept(&self.skeleton, &vk) {
            next.objects = self.objects;
        }
        Ok((next, vk))
    }

    /// Read smaps of every address space for the freeze (see [`Precopy::freeze`]). smaps
    /// walks every page table, about 20 ms per GiB, and holds the address space's lock while
    /// it does: read just before the freeze, a 4 GiB vkernel ran on 80 ms longer and its final
    /// round grew by what it wrote then; read on a thread of its own, it made the injected
    /// calls of the capture wait for that lock. So each later round reads it first, before it
    /// looks for the pages written since the round before.
    fn read_smaps(&mut self) {
        self.smaps = crate::capture::smaps_of(self.mms.iter().map(|m| m.pid));
    }

    /// Start tracking the writes of every address space (write-protecting all of its pages
    /// takes about 7 ms per 256 MiB): call it while waiting for something else, such as the
    /// destination's answer to the offer; the first round or sample does it otherwise.
    /// Tracking starts after the capture's thaw and round 0 reads pages after it, so a write
    /// in between is either read by round 0 or reported by round 1. An address space that
    /// cannot be tracked goes whole in the final round.
    pub fn track(&mut self) {
        if std::mem::replace(&mut self.tracking, true) {
            return;
        }
        for m in &mut self.mms {
            match DirtyTracker::attach(m.pid) {
                Ok(t) => m.tracker = Some(t),
                Err(e) => {
                    tracing::warn!(pid = m.pid, error = %e, "address space not tracked: its pages go in the final round");
                }
            }
        }
    }

    /// Bytes per second the vkernel writes through its own address spaces, measured over
    /// `over` with the trackers pre-copy uses anyway (an evacuation orders vkernels by it).
    /// Writes to memory objects are not counted: those are compared by content, which costs
    /// a hash of every page, too much for an estimate. Call it before the first round only:
    /// it consumes what the trackers saw.
    pub fn sample_dirty_rate(&mut self, over: Duration) -> Result<f64, SrcError> {
        self.track();
        for m in &mut self.mms {
            if let Some(t) = m.tracker.as_mut() {
                t.collect_tracked()?;
            }
        }
        let t0 = Instant::now();
        std::thread::sleep(over);
        let mut bytes = 0u64;
        for m in &mut self.mms {
            if let Some(t) = m.tracker.as_mut() {
                bytes += t.collect_tracked()?.iter().map(|(s, e)| e - s).sum::<u64>();
            }
        }
        Ok(bytes as f64 / t0.elapsed().as_secs_f64().max(1e-3))
    }

    /// Frames sent so far on each stream.
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// Send one round: the first sends every page with state, the others what changed since.
    pub fn round(&mut self, sink: &dyn PageSink) -> Result<RoundStats, SrcError> {
        self.track();
        let t0 = Instant::now();
        let first = std::mem::replace(&mut self.full, false);
        if !first {
            // Any later round may be the last before the freeze.
            self.read_smaps();
        }
        let mut chunks = Vec::new();
        for m in &mut self.mms {
            let Some(tracker) = m.tracker.as_mut() else {
                continue;
            };
            // Pages outside the skeleton's private VMAs have nowhere to go until the final
            // delta: written there, they would land in whatever the skeleton maps, a shared
            // object's pages included.
            let vmas: Vec<Vma> = skeleton_vmas(&self.skeleton, m.id)
                .iter()
                .filter(|v| v.own_pages().is_some())
                .cloned()
                .collect();
            let vmas = vmas.as_slice();
            let found = if first {
                state_runs_now(m.pid, vmas)
            } else {
                tracker.collect().map(|d| clip(&d, vmas))
            };
            let ranges = match found {
                Ok(r) => r,
                // The process exited (a short-lived child): nothing of it to send; the final
                // state will show the tree changed.
                Err(_) if !has_memory(m.pid) => {
                    tracing::debug!(pid = m.pid, "a tracked process exited during pre-copy");
                    m.tracker = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            push_chunks(&mut chunks, Space::Mm(m.id), &merge_ranges(ranges));
        }
        if first {
            self.mm_bytes = chunks.iter().map(|c| c.end - c.start).sum();
        }
        for o in &mut self.objects {
            let ranges = changed_pages(o)?;
            push_chunks(&mut chunks, Space::Object(o.id), &ranges);
        }
        let t_found = t0.elapsed();
        // A full round goes to a new skeleton, whose address spaces are all zero. An object's
        // page is found changed only where the destination holds other contents than it has
        // now (see `changed_pages`), so one that is zero now is news there.
        let zero_is_news = ZeroIsNews {
            mms: !first,
            objects: true,
        };
        let mut stats = self.send(sink, &chunks, zero_is_news, false)?;
        tracing::debug!(
            round = self.round,
            find_ms = ms(t_found),
            send_ms = ms(t0.elapsed() - t_found),
            "round sent"
        );
        stats.round = self.round;
        stats.full = first;
        stats.duration_ms = ms(t0.elapsed());
        self.round += 1;
        Ok(stats)
    }

    /// Encode and send chunks on their streams (see [`encode_round`]).
    fn send(
        &mut self,
        sink: &dyn PageSink,
        chunks: &[Chunk],
        keep_zero: ZeroIsNews,
        strict: bool,
    ) -> Result<RoundStats, SrcError> {
        let (stats, frames) = encode_round(
            &Encoding {
                sink,
                streams: self.frames.len(),
                compression: self.opts.compression,
                mms: &self.mms,
                objects: &self.objects,
                keep_zero,
                strict,
            },
            chunks,
        )?;
        for (total, f) in self.frames.iter_mut().zip(frames) {
            *total += f;
        }
        Ok(stats)
    }

    /// Stop the vkernel and work out what is left: the final state, and which pages the
    /// destination's skeleton lacks. `interrupted` runs once every thread has been told to
    /// stop, before we wait for them (see [`Frozen::freeze_with`]): a throttled vkernel must
    /// be let go at full speed to stop at once.
    ///
    /// Every page stream gets its barrier here; then, while the state is captured, the pages
    /// written since the last round go (the *early* final pages), and a second barrier ends
    /// them. They are valid unless the skeleton must be rebuilt, which only the capture tells:
    /// the destination then drops them (`Final::rebuild`), and every page goes again.
    pub fn freeze(
        mut self,
        interrupted: impl FnOnce(),
        sink: &dyn PageSink,
    ) -> Result<Final, SrcError> {
        let mut copts = self.opts.capture.clone();
        copts.skip_page_runs = true;
        // Netlink dumps cost milliseconds: read the devices the vkernel holds while it runs
        // (guest MACs learnt until now included); only a device new since the skeleton is
        // read while frozen.
        copts.known_net = self
            .skeleton
            .net
            .iter()
            .map(|d| crate::capture::read_net(&d.name))
            .collect::<Result<_, _>>()?;
        // The capture reads smaps again for an address space whose mappings changed since.
        let mut known = std::mem::take(&mut self.smaps);
        let missing: Vec<i32> = self
            .mms
            .iter()
            .map(|m| m.pid)
            .filter(|pid| !known.contains_key(pid))
            .collect();
        known.extend(crate::capture::smaps_of(missing));
        copts.known_smaps = known;
        let t0 = Instant::now();
        let mconsole = self.skeleton.mconsole.as_deref().map(std::path::Path::new);
        let mut frozen = Frozen::freeze_with(self.opts.init_pid, mconsole, interrupted)?;
        frozen.hide_mconsole()?;
        let t_frozen = t0.elapsed();
        // The pages written since the last round are found, and the objects' contents
        // compared, on the other CPU while this one (which the frozen threads share with us)
        // captures. (A scan holds its address space's lock while it walks it, so the capture's
        // scratch mapping there may wait for the rest of that walk; the scans used to wait
        // for the whole capture.) The results are used unless the process tree changed.
        let streams = self.frames.len();
        for stream in 0..streams {
            sink.send(stream, PAGE_STREAM_BARRIER.to_vec(), 0)?;
        }
        let frames_before = self.frames.clone();
        let compression = self.opts.compression;
        let objects = &self.objects;
        let mms = &mut self.mms;
        let frozen_ref = &frozen;
        let (layouts_read, layouts) = std::sync::mpsc::channel::<crate::capture::FilesToCapture>();
        let (captured, (scanned, sent, barrier)) = std::thread::scope(|scope| {
            let helper = scope.spawn(move || {
                // It inherited our single CPU: on it, it would hold up the threads the capture
                // starts and waits for by a scheduler tick each (1 ms here).
                frozen_ref.move_elsewhere();
                let t = Instant::now();
                let scanned = scan_final(mms, objects);
                let t_scan = t.elapsed();
                let mut chunks = Vec::new();
                if let Ok(sc) = &scanned {
                    for (m, (dirty, _)) in mms.iter().zip(&sc.written) {
                        push_chunks(&mut chunks, Space::Mm(m.id), dirty);
                    }
                    for (o, ranges) in objects.iter().zip(&sc.changes) {
                        push_chunks(&mut chunks, Space::Object(o.id), ranges);
                    }
                }
                // Only a few pages go early, on this one CPU, in the slack the capture leaves
                // it. Megabytes (a busy vkernel) would hold the capture up: they go after it,
                // on every CPU, as before.
                let bytes: u64 = chunks.iter().map(|c| c.end - c.start).sum();
                let early = scanned.is_ok() && bytes <= INLINE_BYTES;
                let sent = early.then(|| {
                    let encoding = Encoding {
                        sink,
                        streams,
                        compression,
                        mms,
                        objects,
                        keep_zero: ZeroIsNews {
                            mms: true,
                            objects: true,
                        },
                        strict: true,
                    };
                    encode_round(&encoding, &chunks)
                });
                // The second barrier goes whatever happened: on a rebuild the destination
                // drops everything up to it.
                let barrier = (0..streams)
                    .try_for_each(|stream| sink.send(stream, PAGE_STREAM_BARRIER.to_vec(), 0));
                tracing::debug!(
                    scans_ms = ms(t_scan),
                    early_ms = ms(t.elapsed() - t_scan),
                    "final scans, early pages sent"
                );
                // Then the fd tables, once the capture has read the layouts (none if it failed).
                let files = layouts.recv().ok().map(|f| f.capture());
                (scanned, sent, barrier, files)
            });
            // This thread froze the vkernel: only it may inject, so it reads the processes.
            let begun = crate::capture::begin(frozen_ref, &copts);
            let processes = begun.map(|(files, processes)| {
                // The helper is gone only if it panicked, which its join passes on.
                let _ = layouts_read.send(files);
                processes.capture(frozen_ref)
            });
            drop(layouts_read);
            // A panic there is a bug of ours: it goes on here as one.
            let (scanned, sent, barrier, files) = helper
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            let captured = processes.and_then(|processes| {
                let files = files.ok_or_else(|| SrcError::Unsupported {
                    pid: 0,
                    what: "the fd tables were not read".into(),
                })?;
                crate::capture::finish(frozen_ref, &copts, files?, processes?)
            });
            (captured, (scanned, sent, barrier))
        });
        frozen.unpin();
        let mut captured = captured?;
        barrier?;
        // How many frames went early must be known, or the destination would wait for the
        // wrong number: a failure there fails the migration, rebuild or not.
        let went_early = sent.is_some();
        let early = match sent {
            Some(sent) => sent?,
            None => (RoundStats::default(), vec![0; streams]),
        };
        for (total, f) in self.frames.iter_mut().zip(&early.1) {
            *total += f;
        }
        let capture_ms = ms(t0.elapsed() - t_frozen);
        tracing::info!(freeze_ms = ms(t_frozen), capture_ms, "frozen and captured");
        let misfit = skeleton_misfit(&self.skeleton, &captured.vk);
        let rebuild = misfit.is_some();
        if let Some(why) = &misfit {
            tracing::info!(
                why = %why,
                "the vkernel changed during pre-copy: the destination rebuilds its skeleton and every page goes again"
            );
        }
        let kept = rebuild && objects_kept(&self.skeleton, &captured.vk);
        let mut chunks = Vec::new();
        let mut fresh = Vec::new();
        if rebuild {
            // Everything, as a checkpoint would.
            for (m, fm) in captured.memory.mms.iter().zip(&captured.vk.mms) {
                push_chunks(
                    &mut chunks,
                    Space::Mm(m.id),
                    &state_runs_now(m.pid, &fm.vmas)?,
                );
            }
            if kept {
                // The destination keeps its memory objects across the rebuild (UML's guest
                // processes come and go all the time; its RAM file stays): only what changed.
                // (It dropped the early pages, these among them.)
                let changes = scanned.map(|sc| sc.changes)?;
                for (o, ranges) in self.objects.iter().zip(changes) {
                    push_chunks(&mut chunks, Space::Object(o.id), &ranges);
                }
            } else {
                for o in &captured.memory.objects {
                    push_chunks(
                        &mut chunks,
                        Space::Object(o.id),
                        &data_extents(&o.file, o.size)?,
                    );
                }
            }
        } else {
            // The pages written since the last round, unless they went early; and mappings the
            // skeleton lacks, or that tracking did not cover, whole.
            let scanned = scanned?;
            for ((m, fm), written) in self.mms.iter().zip(&captured.vk.mms).zip(scanned.written) {
                let pid = captured
                    .memory
                    .mms
                    .iter()
                    .find(|p| p.id == fm.id)
                    .map_or(m.pid, |p| p.pid);
                let (dirty, tracked) = written;
                let before = skeleton_vmas(&self.skeleton, fm.id);
                let mut ranges = Vec::new();
                let mut untracked = Vec::new();
                for v in &fm.vmas {
                    if v.own_pages().is_none() {
                        continue;
                    }
                    let kept = before.contains(v)
                        && tracked.iter().any(|&(s, e)| s <= v.start && v.end <= e);
                    if kept {
                        if !went_early {
                            ranges.extend(clip(&dirty, std::slice::from_ref(v)));
                        }
                    } else {
                        tracing::debug!(
                            start = v.start,
                            end = v.end,
                            changed = !before.contains(v),
                            "mapping sent whole"
                        );
                        fresh.push((fm.id, v.start));
                        untracked.push(v.clone());
                    }
                }
                if !untracked.is_empty() {
                    ranges.extend(state_runs_now(pid, &untracked)?);
                }
                push_chunks(&mut chunks, Space::Mm(m.id), &merge_ranges(ranges));
            }
            if !went_early {
                for (o, ranges) in self.objects.iter().zip(&scanned.changes) {
                    push_chunks(&mut chunks, Space::Object(o.id), ranges);
                }
            }
        }
        if rebuild {
            // The final pages are read through the final capture's processes and objects
            // (kept objects are the same files as the tracked ones).
            if !kept {
                self.objects = std::mem::take(&mut captured.memory.objects)
                    .into_iter()
                    .map(|o| TrackedObject {
                        id: o.id,
                        file: o.file,
                        size: o.size,
                        hashes: Vec::new(),
                    })
                    .collect();
            }
            self.mms = captured
                .memory
                .mms
                .iter()
                .map(|m| TrackedMm {
                    id: m.id,
                    pid: m.pid,
                    tracker: None,
                })
                .collect();
        }
        tracing::info!(
            dirty_ms = ms(t0.elapsed() - t_frozen) - capture_ms,
            chunks = chunks.len(),
            "final pages found"
        );
        Ok(Final {
            frozen_at: t0,
            precopy: self,
            frozen: Some(frozen),
            captured,
            chunks,
            frames_before,
            early: early.0,
            fresh,
            rebuild,
            // A rebuilt skeleton's address spaces are new; its objects are new unless kept.
            zero_is_news: ZeroIsNews {
                mms: !rebuild,
                objects: !rebuild || kept,
            },
        })
    }
}

/// The vkernel is frozen; its state and last pages are ready to go.
pub struct Final {
    /// When the freeze began: the vkernel's pause starts here.
    pub frozen_at: Instant,
    precopy: Precopy,
    frozen: Option<Frozen>,
    captured: Captured,
    chunks: Vec<Chunk>,
    /// Frames per stream before the barriers (what the destination applies before the final
    /// layout).
    frames_before: Vec<u64>,
    /// What went between the barriers (see [`Precopy::freeze`]).
    early: RoundStats,
    /// VMAs (mm, start) the destination must map anew.
    pub fresh: Vec<(u32, u64)>,
    /// The process tree or memory objects changed: the destination builds a new skeleton.
    pub rebuild: bool,
    /// Where the destination holds earlier contents of the pages that go now.
    zero_is_news: ZeroIsNews,
}

impl Final {
    pub fn vk(&self) -> &Vkernel {
        &self.captured.vk
    }

    /// Frames sent per stream before the final pages.
    pub fn frames(&self) -> Vec<u64> {
        self.frames_before.clone()
    }

    /// Send the last pages. Returns the stats and the frames per stream in total.
    pub fn send_pages(&mut self, sink: &dyn PageSink) -> Result<(RoundStats, Vec<u64>), SrcError> {
        let t0 = Instant::now();
        let chunks = std::mem::take(&mut self.chunks);
        let mut s = self.precopy.send(sink, &chunks, self.zero_is_news, true)?;
        add(&mut s, &self.early);
        s.round = self.precopy.round;
        s.duration_ms = ms(t0.elapsed());
        Ok((s, self.precopy.frames.clone()))
    }

    /// The destination runs the vkernel: end this copy.
    pub fn commit(mut self) -> Result<(), SrcError> {
        // Trackers first: their userfaultfds hold the address spaces.
        for m in &mut self.precopy.mms {
            m.tracker = None;
        }
        if let Some(f) = self.frozen.take() {
            f.kill()?;
        }
        crate::checkpoint::release_net(&self.captured.vk.net);
        Ok(())
    }

    /// The migration failed before the destination ran anything: the vkernel runs on here,
    /// where it stopped, with the signals held during capture.
    pub fn abort(mut self) {
        if let Some(mut f) = self.frozen.take() {
            f.thaw();
        }
        crate::checkpoint::redeliver(&self.captured.held);
    }
}

/// Pages of `vmas` that carry state, as pagemap shows them now (round 0 reads this after
/// tracking began; the final round for mappings it did not track).
fn state_runs_now(pid: i32, vmas: &[Vma]) -> Result<Vec<(u64, u64)>, SrcError> {
    let path = proc::pid_path(pid, "pagemap");
    let pagemap = File::open(&path).map_err(|e| vkm_sys::SysError::Path { path, source: e })?;
    let mut runs = Vec::new();
    for v in vmas {
        if let Some(file_backed) = v.own_pages() {
            runs.extend(state_runs(&pagemap, v.start, v.end, file_backed)?);
        }
    }
    Ok(runs)
}

/// Sorted host tids of each process (by host pid) below `init`; `None` when a process went
/// away while it was read.
fn read_tree(init: i32) -> Option<BTreeMap<i32, Vec<i32>>> {
    let mut tree = BTreeMap::new();
    for pid in proc::descendants(init).ok()? {
        let mut tids = proc::list_numeric(proc::pid_path(pid, "task")).ok()?;
        tids.sort_unstable();
        tree.insert(pid, tids);
    }
    Some(tree)
}

/// Whether process `pid` still has its memory: not when it is gone, nor when it is a zombie
/// whose parent has yet to reap it (its /proc entry stays, its pagemap cannot be opened).
fn has_memory(pid: i32) -> bool {
    crate::freeze::dead_status(pid) == Some(None)
}

/// The skeleton's VMAs of address space `mm`.
fn skeleton_vmas(skeleton: &Vkernel, mm: u32) -> &[Vma] {
    skeleton
        .mms
        .iter()
        .find(|m| m.id == mm)
        .map_or(&[], |m| m.vmas.as_slice())
}

/// The parts of `ranges` inside the VMAs.
fn clip(ranges: &[(u64, u64)], vmas: &[Vma]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        for v in vmas {
            let (a, b) = (s.max(v.start), e.min(v.end));
            if a < b {
                out.push((a, b));
            }
        }
    }
    out
}

/// Cut ranges at [`CHUNK`] boundaries.
fn push_chunks(out: &mut Vec<Chunk>, space: Space, ranges: &[(u64, u64)]) {
    for &(s, e) in ranges {
        let mut a = s;
        while a < e {
            let b = ((a / CHUNK + 1) * CHUNK).min(e);
            out.push(Chunk {
                space,
                start: a,
                end: b,
            });
            a = b;
        }
    }
}

type Ranges = Vec<(u64, u64)>;

/// The final scans: per address space the pages written since the last round and the ranges
/// tracked; per memory object the pages that changed.
struct Scanned {
    written: Vec<(Ranges, Ranges)>,
    changes: Vec<Ranges>,
}

fn scan_final(mms: &mut [TrackedMm], objects: &[TrackedObject]) -> Result<Scanned, SrcError> {
    let written = mms
        .iter_mut()
        .map(|m| match m.tracker.as_mut() {
            Some(t) => Ok((t.collect_tracked()?, t.tracked().to_vec())),
            None => Ok((Vec::new(), Vec::new())),
        })
        .collect::<Result<Vec<_>, SrcError>>()?;
    let t = Instant::now();
    let changes = objects
        .iter()
        .map(changed_pages)
        .collect::<Result<Vec<_>, SrcError>>()?;
    tracing::debug!(objects_ms = ms(t.elapsed()), "memory objects compared");
    Ok(Scanned { written, changes })
}

/// What a round's encoders need.
struct Encoding<'a> {
    sink: &'a dyn PageSink,
    streams: usize,
    compression: bool,
    mms: &'a [TrackedMm],
    objects: &'a [TrackedObject],
    keep_zero: ZeroIsNews,
    /// A page that cannot be read is an error (the vkernel is frozen); otherwise it belongs to
    /// a mapping that went away meanwhile, which the final round handles.
    strict: bool,
}

/// Encode and send chunks on their streams, one encoder thread per stream; returns when
/// every chunk is queued (the barrier between rounds), with the frames sent per stream.
fn encode_round(e: &Encoding, chunks: &[Chunk]) -> Result<(RoundStats, Vec<u64>), SrcError> {
    let n = e.streams;
    let mine = |i: usize| -> Vec<Chunk> {
        chunks
            .iter()
            .filter(|c| stream_of(c.space, c.start, n) == i)
            .copied()
            .collect()
    };
    let bytes: u64 = chunks.iter().map(|c| c.end - c.start).sum();
    // A few pages (the final round of an idle vkernel) are encoded here: starting threads
    // would take longer than the work, in the pause.
    let results: Vec<Result<(RoundStats, u64), SrcError>> = if bytes <= INLINE_BYTES {
        (0..n).map(|i| encode_stream(e, i, &mine(i))).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let mine = mine(i);
                    scope.spawn(move || encode_stream(e, i, &mine))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SrcError::Unsupported {
                            pid: 0,
                            what: "a page encoder thread panicked".into(),
                        })
                    })
                })
                .collect()
        })
    };
    let mut total = RoundStats::default();
    let mut frames = vec![0; n];
    for (i, r) in results.into_iter().enumerate() {
        let (s, f) = r?;
        frames[i] = f;
        add(&mut total, &s);
    }
    Ok((total, frames))
}

/// The stream a chunk goes on: the same for every round.
fn stream_of(space: Space, addr: u64, n: usize) -> usize {
    let id = match space {
        Space::Mm(id) => u64::from(id) * 2,
        Space::Object(id) => u64::from(id) * 2 + 1,
    };
    let x = (addr / CHUNK).wrapping_add(id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    usize::try_from(x % n as u64).unwrap_or(0)
}

/// Pages of an object whose content differs from what was sent last (holes count as zero),
/// as ranges; the stored hashes are updated.
fn changed_pages(o: &TrackedObject) -> Result<Vec<(u64, u64)>, SrcError> {
    let zero = xxhash_rust::xxh3::xxh3_64(&[0u8; PAGE_SIZE]);
    let mut now = vec![zero; o.hashes.len()];
    let mut buf = vec![0u8; CHUNK as usize];
    for (s, e) in data_extents(&o.file, o.size)? {
        let mut a = s;
        while a < e {
            let n = usize::try_from((e - a).min(CHUNK)).unwrap_or(0);
            let want = n.min(usize::try_from(o.size - a).unwrap_or(n));
            // Past the end of a file shorter than the object's size: zeros.
            buf[want..n].fill(0);
            o.file
                .read_exact_at(&mut buf[..want], a)
                .map_err(|e| vkm_sys::SysError::Syscall {
                    op: "pread(memory object)",
                    pid: 0,
                    source: e,
                })?;
            for (i, page) in buf[..n].chunks_exact(PAGE_SIZE).enumerate() {
                if let Some(h) = now.get_mut(usize::try_from(a / PAGE).unwrap_or(0) + i) {
                    *h = xxhash_rust::xxh3::xxh3_64(page);
                }
            }
            a += n as u64;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (old, new)) in o.hashes.iter().zip(&now).enumerate() {
        // 0 = never sent: a zero page need not be sent the first time. The encoder stores what
        // it sends.
        let old = old.load(Ordering::Relaxed);
        let changed = if old == 0 { *new != zero } else { old != *new };
        if changed {
            let a = i as u64 * PAGE;
            match out.last_mut() {
                Some((_, e)) if *e == a => *e = a + PAGE,
                _ => out.push((a, a + PAGE)),
            }
        }
    }
    Ok(out)
}

/// Encoded bytes gathered into one message: a page stream's fixed costs (a hand-over to the
/// writer task, a QUIC write, a wake-up at the destination) are paid per message, and a
/// later round's dirty pages are mostly single pages.
const BATCH: usize = 256 << 10;

/// Rounds up to this size are encoded on the caller's thread (see [`Precopy::send`]).
const INLINE_BYTES: u64 = 1 << 20;

/// Consecutive chunks of one address space, at most [`CHUNK`] bytes and [`proc::MAX_IOV`]
/// chunks: they are read with one `process_vm_readv`. A memory object's chunk goes alone.
fn next_group(chunks: &[Chunk]) -> usize {
    let Some(first) = chunks.first() else {
        return 0;
    };
    if !matches!(first.space, Space::Mm(_)) {
        return 1;
    }
    let mut total = 0;
    chunks
        .iter()
        .take(proc::MAX_IOV)
        .take_while(|c| {
            total += c.end - c.start;
            c.space == first.space && total <= CHUNK
        })
        .count()
        .max(1)
}

/// One stream's share of a round (see [`encode_round`]).
fn encode_stream(
    e: &Encoding,
    stream: usize,
    chunks: &[Chunk],
) -> Result<(RoundStats, u64), SrcError> {
    let mut stats = RoundStats::default();
    let mut frames = 0u64;
    // No bigger than the stream needs: a few dirty pages must not cost zeroing a megabyte.
    let need: u64 = chunks.iter().map(|c| c.end - c.start).sum();
    let mut buf = vec![0u8; need.min(CHUNK) as usize];
    let new_msg = || Vec::with_capacity(BATCH + CHUNK as usize);
    let mut msg = new_msg();
    let mut k = 0u64;
    let mut rest = chunks;
    while !rest.is_empty() {
        let n = next_group(rest);
        let (group, after) = rest.split_at(n);
        rest = after;
        // What one read got of the group; a chunk beyond it is read on its own below (its
        // pages may have gone since they were found dirty).
        let mut got = 0;
        if let (Space::Mm(id), true) = (group[0].space, group.len() > 1) {
            let pid = pid_of(e.mms, id);
            let ranges: Vec<(u64, usize)> = group
                .iter()
                .map(|c| (c.start, usize::try_from(c.end - c.start).unwrap_or(0)))
                .collect();
            got = proc::read_vm_many(pid, &ranges, &mut buf).unwrap_or(0);
        }
        let mut off = 0;
        for c in group {
            let n = usize::try_from(c.end - c.start).unwrap_or(0);
            let data = &mut buf[off..off + n];
            let read = if off + n <= got {
                Ok(())
            } else {
                read_chunk(c, data, e.mms, e.objects)
            };
            off += n;
            if let Err((err, op)) = read {
                if e.strict {
                    return Err(vkm_sys::SysError::Syscall {
                        op,
                        pid: 0,
                        source: err,
                    }
                    .into());
                }
                tracing::debug!(start = c.start, error = %err, "pages gone since they were found dirty");
                continue;
            }
            let counts = encode_pages_wire(
                c.space,
                c.start,
                data,
                e.compression,
                e.keep_zero.of(c.space),
                &mut msg,
            )?;
            k += counts.runs;
            stats.pages += (n / PAGE_SIZE) as u64;
            stats.zero_pages += counts.zero_pages_skipped + counts.zero_pages_sent;
            stats.bytes_raw += n as u64;
        }
        if msg.len() >= BATCH || (rest.is_empty() && k > 0) {
            stats.bytes_encoded += msg.len() as u64;
            let full = std::mem::replace(&mut msg, new_msg());
            e.sink.send(stream, full, k)?;
            frames += k;
            k = 0;
        }
    }
    Ok((stats, frames))
}

/// The process whose memory address space `id` is read through (0: none, which fails).
fn pid_of(mms: &[TrackedMm], id: u32) -> i32 {
    mms.iter().find(|m| m.id == id).map_or(0, |m| m.pid)
}

/// Read one chunk on its own: an address space's pages with `process_vm_readv`, an object's
/// from its file (recording the hash of what is sent).
fn read_chunk(
    c: &Chunk,
    data: &mut [u8],
    mms: &[TrackedMm],
    objects: &[TrackedObject],
) -> Result<(), (std::io::Error, &'static str)> {
    match c.space {
        Space::Mm(id) => {
            proc::read_vm(pid_of(mms, id), c.start, data).map_err(|e| (e, "process_vm_readv"))
        }
        Space::Object(id) => {
            let Some(o) = objects.iter().find(|o| o.id == id) else {
                return Err((
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such memory object"),
                    "pread(memory object)",
                ));
            };
            let n = data.len();
            let want = n.min(usize::try_from(o.size.saturating_sub(c.start)).unwrap_or(n));
            // Past the end of a file shorter than the object's size: zeros.
            data[want..].fill(0);
            o.file
                .read_exact_at(&mut data[..want], c.start)
                .map_err(|e| (e, "pread(memory object)"))?;
            let first = usize::try_from(c.start / PAGE).unwrap_or(usize::MAX);
            for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                if let Some(h) = o.hashes.get(first.saturating_add(i)) {
                    h.store(xxhash_rust::xxh3::xxh3_64(page), Ordering::Relaxed);
                }
            }
            Ok(())
        }
    }
}

fn add(a: &mut RoundStats, b: &RoundStats) {
    a.pages += b.pages;
    a.zero_pages += b.zero_pages;
    a.bytes_raw += b.bytes_raw;
    a.bytes_encoded += b.bytes_encoded;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zombie keeps its /proc entry but not its memory: a round must take it for gone.
    #[test]
    fn a_zombie_has_no_memory() {
        assert!(has_memory(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().expect("test");
        let pid = child.id() as i32;
        let t0 = Instant::now();
        while has_memory(pid) {
            assert!(t0.elapsed() < Duration::from_secs(10), "true never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "not reaped yet"
        );
        child.wait().expect("test");
        assert!(!has_memory(pid));
    }
}
