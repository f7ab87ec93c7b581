//! Recreating a vkernel inside a [`Sandbox`] by injecting syscalls into parked skeletons.
//!
//! Stages, each with the previous one's result as entry condition:
//! 1. **tree**: every process exists at its PID, with its parent, session and group; every
//!    skeleton is seized, has all signals blocked and a scratch area (a `syscall` gadget, room
//!    for arguments) mapped at an address that no saved VMA uses.
//! 2. **layout**: each address space is emptied (but for the scratch) and rebuilt VMA by VMA;
//!    memory objects are memfds held by the agent and mapped into every user; SysV segments
//!    are created with their keys and ids in the sandbox's IPC namespace and attached
//!    (injected `shmat`) where they were.
//! 3. **pages**: page frames from the image go straight into the target (`/proc/PID/mem`) or
//!    the object's file (a memfd, or the shmem file of a SysV segment); nothing is buffered.
//!    SysV segments that were marked removed are removed again.
//! 4. **state**: fds, signal handlers, cwd, limits, timers; threads are created with their TIDs
//!    and get rseq, robust list, tid address, altstack, name; pending signals are queued last.
//! 5. **resume**: the scratch area is unmapped by a syscall whose exit stop is the place where
//!    the saved registers, xstate and signal mask are put back; then every thread is detached.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vkm_common::image::{Frame, ImageReader};
use vkm_common::model::{self, prot, Backing, MemObject, ObjectKind, SysvShm, Vkernel};
use vkm_sys::calls::{self, CloneArgs};
use vkm_sys::cpu::OneCpu;
use vkm_sys::inject::{BatchArea, Call, Remote};
use vkm_sys::proc;
use vkm_sys::ptrace::{self, Stop};
use vkm_sys::tracee;

use crate::sandbox::AGENT_PIDFD;
use crate::{DstError, Network, Sandbox};

mod layout;
mod pages;
mod state;
mod tree;

pub use pages::PageTargets;
use pages::{Fills, MmTarget};

const SCRATCH_LEN: u64 = 1 << 20;
/// Where injected calls find their arguments inside the scratch area.
const ARGS_OFF: u64 = 4096;
/// Batches of injected calls: their results, then their code (well past the arguments,
/// well below the stack at the area's top).
const BATCH: usize = 2048;
const BATCH_RESULTS_OFF: u64 = 128 * 1024;
const BATCH_CODE_OFF: u64 = BATCH_RESULTS_OFF + 8 * BATCH as u64;
const _: () = assert!(
    BATCH_CODE_OFF + vkm_sys::inject::batch_code_len(BATCH) as u64 <= SCRATCH_LEN - 64 * 1024
);
/// Highest user address + 1 on x86_64 with 4-level paging.
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const ARCH_MAP_VDSO_64: u64 = 0x2003;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    pub processes: usize,
    pub threads: usize,
    pub pages: u64,
    pub elapsed: Duration,
}

/// Recreate `vk` in `sandbox` (created in [`crate::InitMode::Restore`] with `vk.clocks`),
/// reading its pages from `reader`, which is positioned just after the Meta frame. `console`
/// is the pty slave that replaces the one the vkernel had. On success every process runs, and
/// the network it holds is returned for announcing; on error the caller must
/// [`Sandbox::kill`] the sandbox (the network is already removed again).
pub fn restore<R: Read + Send>(
    reader: &mut ImageReader<R>,
    vk: &Vkernel,
    sandbox: &mut Sandbox,
    console: Option<&OwnedFd>,
) -> Result<(RestoreReport, Network), DstError> {
    let t0 = Instant::now();
    let mut skel = Skeleton::build(vk.clone(), sandbox)?;
    let targets = skel.page_targets()?;
    skel.r.pages = receive_pages(reader, &targets)?;
    skel.finish(console)?;
    sandbox.commit()?;
    let (mut report, net) = skel.go()?;
    report.elapsed = t0.elapsed();
    Ok((report, net))
}

/// A vkernel being restored, built in stages so that a live migration can fill its memory
/// while the source still runs: [`Skeleton::build`] (processes and address spaces), pages
/// through [`PageTargets`] from any thread, [`Skeleton::apply_final`] (the layout as it was
/// when the source froze), [`Skeleton::finish`] (all other state), [`Skeleton::go`].
pub struct Skeleton {
    r: Restorer,
    /// The description the skeleton was built from (and [`Restorer::process_early`] applied):
    /// [`Skeleton::finish`] applies only what the final one changes.
    built_from: Arc<Vkernel>,
    order: Vec<usize>,
    /// The tun/tap devices, once [`Skeleton::finish`] created them (removed if dropped).
    net: Network,
    /// The userfaultfds that [`PageTargets`] fill anonymous memory through.
    fills: Fills,
    /// We and every thread of the skeleton share one CPU while it is built and from
    /// [`Skeleton::finish`] to [`Skeleton::go`] (see [`vkm_sys::cpu`]); they then get the mask
    /// we had, as they would have inherited it.
    cpu: Option<OneCpu>,
}

impl Skeleton {
    /// Stages 1 and 2: every process at its PID, every address space laid out, memory
    /// objects created. Nothing runs yet.
    pub fn build(vk: Vkernel, sandbox: &mut Sandbox) -> Result<Skeleton, DstError> {
        Skeleton::build_with(vk, sandbox, BTreeMap::new())
    }

    /// Replace this skeleton with one built from `vk` (the process tree changed during
    /// pre-copy). Memory objects both describe alike are kept with their contents (see
    /// [`vkm_common::live::objects_kept`]), so only their changed pages need to come again.
    pub fn rebuild(mut self, vk: Vkernel, sandbox: &mut Sandbox) -> Result<Skeleton, DstError> {
        let kept = if vkm_common::live::objects_kept(&self.r.vk, &vk) {
            std::mem::take(&mut self.r.objects)
        } else {
            BTreeMap::new()
        };
        self.discard(sandbox)?;
        Skeleton::build_with(vk, sandbox, kept)
    }

    fn build_with(
        vk: Vkernel,
        sandbox: &mut Sandbox,
        objects: BTreeMap<u32, OwnedFd>,
    ) -> Result<Skeleton, DstError> {
        check_image(&vk)?;
        let mut cpu = OneCpu::new();
        let order = process_order(&vk)?;
        let scratch = pick_scratch(&vk)?;
        let mut r = Restorer {
            vk: Arc::new(vk),
            scratch,
            procs: BTreeMap::new(),
            objects,
            hosts: BTreeMap::new(),
            pages: 0,
            interrupted: Vec::new(),
        };
        r.build_tree(&order, sandbox)?;
        if let Some(c) = cpu.as_mut() {
            r.pin_all(c);
        }
        r.create_objects()?;
        let vk = Arc::clone(&r.vk);
        for mm in &vk.mms {
            let rep = rep_of(&vk, &order, |p| p.mm == mm.id)?;
            r.layout(mm, rep)
                .map_err(|e| step("layout", vk.processes[rep].pid, e))?;
        }
        for &i in &order {
            if vk.processes[i].zombie.is_none() {
                r.process_early(i)
                    .map_err(|e| step("process state", vk.processes[i].pid, e))?;
            }
        }
        // Unpinned while pages arrive (the threads that write them are started by us), and
        // so are the threads just made.
        if let Some(c) = cpu.as_mut() {
            r.pin_all(c);
        }
        drop(cpu);
        Ok(Skeleton {
            built_from: Arc::clone(&r.vk),
            r,
            order,
            net: Network::empty(),
            fills: Fills::default(),
            cpu: None,
        })
    }

    /// Where pages go: each address space through a process using it (see [`pages`]), each
    /// memory object through its file. Usable from several threads at once, until
    /// [`Skeleton::finish`].
    pub fn page_targets(&mut self) -> Result<PageTargets, DstError> {
        let mut mms = BTreeMap::new();
        let vk = Arc::clone(&self.r.vk);
        for mm in &vk.mms {
            let rep = rep_of(&vk, &self.order, |p| p.mm == mm.id)?;
            let leader = self.r.leader(rep)?;
            let pid = leader.tid;
            let mem = leader.mem.try_clone().map_err(|e| {
                DstError::Sys(vkm_sys::SysError::Syscall {
                    op: "dup(/proc/PID/mem)",
                    pid,
                    source: e,
                })
            })?;
            let fill = self.fills.create(leader, mm);
            mms.insert(mm.id, MmTarget { pid, mem, fill });
        }
        let mut objects = BTreeMap::new();
        for o in &vk.objects {
            let fd = self
                .r
                .objects
                .get(&o.id)
                .ok_or_else(|| DstError::Inconsistent(format!("object {} is missing", o.id)))?;
            let dup = fd.try_clone().map_err(|e| {
                DstError::Sys(calls::errno(
                    "dup(object)",
                    0,
                    e.raw_os_error().unwrap_or(0),
                ))
            })?;
            objects.insert(o.id, (File::from(dup), o.size));
        }
        Ok(PageTargets { mms, objects })
    }

    /// The state the source froze in, `vk`, replaces the one the skeleton was built from:
    /// per address space, VMAs that are gone or changed are unmapped, new or changed ones
    /// (and those in `fresh`, whose pages the source did not track) mapped empty, and the mm
    /// fields set again. The caller checked [`vkm_common::live::skeleton_fits`].
    pub fn apply_final(&mut self, vk: Vkernel, fresh: &[(u32, u64)]) -> Result<(), DstError> {
        if !vkm_common::live::skeleton_fits(&self.r.vk, &vk) {
            return Err(DstError::Inconsistent(
                "the final state does not fit the skeleton (processes or memory objects differ)"
                    .into(),
            ));
        }
        let before = Arc::clone(&self.r.vk);
        self.r.vk = Arc::new(vk);
        let after = Arc::clone(&self.r.vk);
        for (old, new) in before.mms.iter().zip(&after.mms) {
            let starts: Vec<u64> = fresh
                .iter()
                .filter(|(mm, _)| *mm == new.id)
                .map(|(_, s)| *s)
                .collect();
            let delta = vkm_common::live::vma_delta(old, new, &starts);
            let rep = rep_of(&after, &self.order, |p| p.mm == new.id)?;
            // Setting the mm's fields is an injected call (0.1 ms): only when they changed.
            self.r
                .apply_delta(new, rep, &delta, old.fields != new.fields)
                .map_err(|e| step("layout delta", after.processes[rep].pid, e))?;
        }
        Ok(())
    }

    /// Stage 4 and the first half of 5: everything but letting the threads run.
    pub fn finish(&mut self, console: Option<&OwnedFd>) -> Result<(), DstError> {
        // No page comes after this; nothing may run into a page fault that waits for us.
        self.fills.release();
        self.cpu = OneCpu::new();
        if let Some(c) = self.cpu.as_mut() {
            self.r.pin_all(c);
        }
        let t0 = Instant::now();
        let r = &mut self.r;
        let vk = Arc::clone(&r.vk);
        r.remove_sysv()?;
        // Devices before the fds attached to them. Created this late (the vkernel is frozen
        // on the source by now) because a device name can exist only once per host.
        self.net = Network::create(&vk.net)?;
        let t_net = t0.elapsed();
        let agent_files = r.prepare_files(console, &self.net)?;
        let mut installed = Vec::new();
        for table in &vk.fd_tables {
            let rep = rep_of(&vk, &self.order, |p| p.fd_table == table.id)?;
            r.install_fds(rep, table, &agent_files.files)
                .map_err(|e| step("files", vk.processes[rep].pid, e))?;
            let sharers: Vec<i32> = vk
                .processes
                .iter()
                .filter(|p| p.fd_table == table.id)
                .map(|p| p.pid)
                .collect();
            installed.push((table.id, table.fds.len(), sharers));
        }
        tracing::info!(tables = ?installed, "fd tables installed (id, fds, processes)");
        drop(agent_files);
        let t_files = t0.elapsed();
        for &i in &self.order {
            if vk.processes[i].zombie.is_some() {
                continue;
            }
            let pid = vk.processes[i].pid;
            let early = self.built_from.processes.get(i).ok_or_else(|| {
                DstError::Inconsistent(format!("process {pid} is not in the skeleton"))
            })?;
            r.process_state(i, early)
                .map_err(|e| step("process state", pid, e))?;
        }
        let t_procs = t0.elapsed();
        r.prepare_resume(&self.order)?;
        tracing::debug!(
            net_ms = ms(t_net),
            files_ms = ms(t_files - t_net),
            processes_ms = ms(t_procs - t_files),
            resume_ms = ms(t0.elapsed() - t_procs),
            "state applied"
        );
        Ok(())
    }

    /// Threads made since the tree (by injected clone3) inherited our CPU: every one gets the
    /// mask it would have had, and so do we. Done by [`Skeleton::go`] at the latest, before
    /// any thread runs; a caller that waits for the word to go does it meanwhile (some
    /// 0.1 ms of the pause for a dozen threads).
    pub fn unpin(&mut self) {
        if let Some(mut c) = self.cpu.take() {
            self.r.pin_all(&mut c);
            c.release();
        }
    }

    /// Every thread runs (the barrier: until now none did). The network goes to the caller,
    /// who announces it ([`Network::announce`]).
    pub fn go(self) -> Result<(RestoreReport, Network), DstError> {
        self.go_with(|_| ())
    }

    /// [`Skeleton::go`], calling `released` with a UML's mconsole socket once every thread is
    /// let go and before the UML is told `go` (where tests inject its failure).
    pub fn go_with(
        mut self,
        released: impl FnOnce(&std::path::Path),
    ) -> Result<(RestoreReport, Network), DstError> {
        let vk = Arc::clone(&self.r.vk);
        self.unpin();
        // Traced processes go to their tracers first, while the tracers are still ours.
        let mut given = Vec::new();
        for (i, p) in vk.processes.iter().enumerate() {
            let Some(tracer) = p.tracer else { continue };
            let (Some(&tracer_host), Some(tracee)) = (
                self.r.hosts.get(&tracer),
                self.r.procs.get(&i).and_then(|rp| rp.threads.first()),
            ) else {
                return Err(DstError::Inconsistent(format!(
                    "process {} is traced by {tracer}, which is not restored",
                    p.pid
                )));
            };
            let taken = tracee::give(tracer_host, tracee.tid, p.pid)
                .map_err(|e| step("hand to its tracer", p.pid, e.into()))?;
            for sig in taken {
                calls::tgkill(tracee.tid, tracee.tid, sig)?;
            }
            given.push(tracee.tid);
        }
        // Those told EINTR deal with it first, on their own (see `settle`).
        let interrupted: Vec<i32> = (self.r.interrupted.iter())
            .filter(|t| !given.contains(t))
            .copied()
            .collect();
        settle(&interrupted);
        for rp in self.r.procs.values() {
            for r in &rp.threads {
                if !given.contains(&r.tid) && !interrupted.contains(&r.tid) {
                    ptrace::detach(r.tid, 0)?;
                }
            }
        }
        if let Some(socket) = &vk.mconsole {
            let socket = std::path::Path::new(socket);
            released(socket);
            vkm_common::mconsole::request(socket, "go").map_err(|source| DstError::Mconsole {
                command: "go",
                source,
            })?;
        }
        let report = RestoreReport {
            processes: self.r.vk.processes.len(),
            threads: self.r.vk.processes.iter().map(|p| p.threads.len()).sum(),
            pages: self.r.pages,
            elapsed: Duration::ZERO,
        };
        Ok((report, std::mem::replace(&mut self.net, Network::empty())))
    }

    /// Count pages written through [`PageTargets`] for the report.
    pub fn add_pages(&mut self, n: u64) {
        self.r.pages += n;
    }

    /// Kill every process of the skeleton and wait until their PIDs are free again (the
    /// sandbox's init reaps them), so that a new skeleton can be built in the same sandbox.
    pub fn discard(mut self, sandbox: &mut Sandbox) -> Result<(), DstError> {
        self.fills.release();
        let hosts: Vec<i32> = self.r.hosts.values().copied().collect();
        for &h in &hosts {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(h),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Our tracees report their death to us before their parent can reap them.
        for rp in self.r.procs.values() {
            for t in &rp.threads {
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(t.tid),
                    Some(nix::sys::wait::WaitPidFlag::__WALL),
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for &h in &hosts {
            while std::path::Path::new(&format!("/proc/{h}")).exists() {
                sandbox.reap()?;
                if Instant::now() > deadline {
                    return Err(DstError::Inconsistent(format!(
                        "process {h} of the old skeleton was not reaped within 5 s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }
}

/// Apply every page frame of an image. A reader thread reads, decompresses and verifies
/// frames while this thread writes the previous ones into the targets. Returns the pages.
fn receive_pages<R: Read + Send>(
    reader: &mut ImageReader<R>,
    targets: &PageTargets,
) -> Result<u64, DstError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Frame>(4);
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || -> Result<(), DstError> {
            while let Some(frame) = reader.next_frame()? {
                if tx.send(frame).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut result = Ok(0u64);
        while let Ok(frame) = rx.recv() {
            let applied = match frame {
                Frame::Pages { space, addr, data } => targets
                    .apply(space, addr, &data)
                    .map(|()| (data.len() / 4096) as u64),
                Frame::Meta(_) => Err(DstError::Inconsistent(
                    "a second vkernel description".into(),
                )),
                Frame::Blob { .. } => Ok(0),
            };
            match applied {
                Ok(n) => {
                    if let Ok(total) = result.as_mut() {
                        *total += n;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(rx);
        let read = producer.join().unwrap_or_else(|_| {
            Err(DstError::Inconsistent(
                "the image reader thread panicked".into(),
            ))
        });
        read.and(result)
    })
}

fn step(step: &'static str, pid: i32, e: DstError) -> DstError {
    match e {
        DstError::Step { .. } => e,
        other => DstError::Step {
            step,
            pid,
            source: Box::new(other),
        },
    }
}

/// A restored process under construction: its threads as injection targets (leader first).
struct RProc {
    threads: Vec<Remote>,
}

/// How long a syscall may run before the thread counts as blocked in it (see [`settle`]).
const BLOCKED_AFTER: Duration = Duration::from_millis(1);
/// How long [`settle`] gives the threads in all.
const SETTLE_TIMEOUT: Duration = Duration::from_millis(200);

/// Where a thread that [`settle`] runs is now.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// Running user code (its next syscall stop is an entry).
    User,
    /// Inside a syscall it entered then.
    Syscall(Instant),
    /// Let go, or gone.
    Done,
}

/// Let the threads `tids` (ours, stopped at a syscall's exit, told EINTR by
/// [`ptrace::fixup_restart`], sharing a TLS with another thread) run on their own until each
/// blocks in a syscall again, then let them go; every other thread stays stopped meanwhile.
/// An EINTR is within a blocking call's contract, but a thread that handles it while the rest
/// of its vkernel runs may read state another thread changes: UML's helper threads share
/// errno with the UML kernel process (one TLS block), and a helper whose `poll` saw EINTR
/// read the kernel's errno at times, took it for a failed `poll` and printed from a stack
/// with no kernel task under it: the guest panicked ("Segfault with no mm") in about one move
/// in twenty. Blocked again, a thread is interrupted and let go, and its syscall restarts in
/// place, as after any stop. Errors are logged: a thread that does not settle in time is let
/// go where it is.
fn settle(tids: &[i32]) {
    // Processes or threads they start meanwhile are not ours: they run as they are made.
    let mut at: Vec<At> = (tids.iter())
        .map(
            |&t| match ptrace::set_options(t, ptrace::PTRACE_O_TRACESYSGOOD) {
                Ok(()) => resume(t, 0, At::User),
                Err(e) => {
                    tracing::warn!(tid = t, error = %e, "cannot let an interrupted thread run");
                    let _ = ptrace::detach(t, 0);
                    At::Done
                }
            },
        )
        .collect();
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while at.iter().any(|a| *a != At::Done) && Instant::now() <= deadline {
        for (a, &t) in at.iter_mut().zip(tids).filter(|(a, _)| **a != At::Done) {
            let w = ptrace::wait_timeout(t, Duration::ZERO);
            if let Ok(Some(stop)) = &w {
                tracing::debug!(tid = t, at = ?*a, ?stop, "settling");
            }
            *a = match (*a, w) {
                (_, Err(_) | Ok(Some(Stop::Exited(_) | Stop::Killed(_)))) => At::Done,
                (At::Syscall(since), Ok(None)) if since.elapsed() >= BLOCKED_AFTER => {
                    let_go_blocked(t);
                    At::Done
                }
                (now, Ok(None)) => now,
                // Entering a syscall: let it run, and see whether it returns.
                (At::User, Ok(Some(Stop::Syscall))) => resume(t, 0, At::Syscall(Instant::now())),
                // Its exit (Done is not waited for).
                (_, Ok(Some(Stop::Syscall))) => resume(t, 0, At::User),
                (now, Ok(Some(Stop::Signal(sig)))) => resume(t, sig, now),
                (now, Ok(Some(Stop::Event(_)))) => resume(t, 0, now),
            };
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    for (a, &t) in at.iter().zip(tids) {
        if *a != At::Done {
            tracing::warn!(
                tid = t,
                "an interrupted thread did not block again in time: let go where it is"
            );
            let_go_blocked(t);
        }
    }
}

/// Send the stopped thread `tid` on to its next syscall stop with `sig` delivered: `then` is
/// where it will be, Done if it cannot go on (it was let go as it was).
fn resume(tid: i32, sig: i32, then: At) -> At {
    match ptrace::syscall(tid, sig) {
        Ok(()) => then,
        Err(e) => {
            tracing::warn!(tid, error = %e, "cannot let an interrupted thread run");
            let _ = ptrace::detach(tid, sig);
            At::Done
        }
    }
}

/// Stop the running thread `tid` (blocked in a syscall, or late) and let it go: a syscall it
/// was in restarts. Under `PTRACE_SYSCALL` the interrupt of a blocked syscall is reported as
/// that syscall's exit stop; a signal on its way is delivered as the thread goes.
fn let_go_blocked(tid: i32) {
    if let Err(e) = ptrace::interrupt(tid) {
        tracing::warn!(tid, error = %e, "cannot interrupt a thread to let it go");
        return;
    }
    let sig = match ptrace::wait_timeout(tid, SETTLE_TIMEOUT) {
        Ok(Some(Stop::Syscall | Stop::Event(_))) => 0,
        Ok(Some(Stop::Signal(sig))) => sig,
        Ok(Some(Stop::Exited(_) | Stop::Killed(_))) | Err(_) => return,
        Ok(None) => {
            tracing::warn!(tid, "a thread did not stop to be let go");
            return;
        }
    };
    if let Err(e) = ptrace::detach(tid, sig) {
        tracing::warn!(tid, error = %e, "cannot let a thread go");
    }
}

struct Restorer {
    vk: Arc<Vkernel>,
    scratch: u64,
    /// By index into `vk.processes`.
    procs: BTreeMap<usize, RProc>,
    /// Object id → the agent's memfd (for a SysV segment: its shmem file).
    objects: BTreeMap<u32, OwnedFd>,
    /// Namespace pid → host pid of every process created, zombies included.
    hosts: BTreeMap<i32, i32>,
    pages: u64,
    /// Host tids of the threads that will meet an EINTR (see [`ptrace::fixup_restart`]) and
    /// share their TLS, and with it errno, with another thread, as UML's helpers do: they meet
    /// it alone (see [`settle`]). Threads with a TLS of their own handle their EINTR
    /// side by side, as they would any.
    interrupted: Vec<i32>,
}

impl Restorer {
    fn args(&self) -> u64 {
        self.scratch + ARGS_OFF
    }

    /// Where batches of injected calls ([`Remote::batch`]) keep their code and results.
    fn batch_area(&self) -> BatchArea {
        BatchArea {
            code: self.scratch + BATCH_CODE_OFF,
            results: self.scratch + BATCH_RESULTS_OFF,
            capacity: BATCH,
        }
    }

    /// Every thread made so far onto `cpu`'s CPU (see [`vkm_sys::cpu::OneCpu::add_new`]).
    fn pin_all(&self, cpu: &mut OneCpu) {
        for t in self.procs.values().flat_map(|p| &p.threads) {
            cpu.add_new(t.tid);
        }
    }

    fn leader(&mut self, i: usize) -> Result<&mut Remote, DstError> {
        self.rproc(i)?
            .threads
            .first_mut()
            .ok_or_else(|| DstError::Inconsistent(format!("process #{i} was not created")))
    }

    fn rproc(&mut self, i: usize) -> Result<&mut RProc, DstError> {
        self.procs
            .get_mut(&i)
            .ok_or_else(|| DstError::Inconsistent(format!("process #{i} was not created")))
    }

    // ---- stage 5: resume -------------------------------------------------------------------

    fn prepare_resume(&mut self, order: &[usize]) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let vk = &*vk_arc;
        let scratch = self.scratch;
        // Capabilities go last: every injection before needs ours. They are dropped while
        // every scratch area is still mapped (processes can share one).
        let args = self.args();
        let any_caps = vk
            .processes
            .iter()
            .flat_map(|p| &p.threads)
            .any(|t| t.caps.is_some());
        let last_cap: u64 = if any_caps {
            proc::read("/proc/sys/kernel/cap_last_cap")?
                .trim()
                .parse()
                .unwrap_or(40)
        } else {
            0
        };
        for &i in order {
            let p = &vk.processes[i];
            let Some(rp) = self.procs.get_mut(&i) else {
                continue;
            };
            for (t, r) in p.threads.iter().zip(rp.threads.iter_mut()) {
                if let Some(caps) = t.caps {
                    set_caps(r, args, &caps, last_cap)
                        .map_err(|e| step("capabilities", t.tid, e))?;
                }
            }
        }
        let mut unmapped = Vec::new();
        // (host tid, told EINTR, its address space and TLS): see `interrupted`.
        let mut tls = Vec::new();
        for &i in order {
            let p = &vk.processes[i];
            if p.zombie.is_some() {
                continue;
            }
            let rp = self.rproc(i)?;
            if !unmapped.contains(&p.mm) {
                // The last injected call removes the scratch area; the thread stops at the
                // syscall's exit and never runs another instruction there.
                rp.threads[0].unmap(scratch, SCRATCH_LEN)?;
                unmapped.push(p.mm);
            }
            for (t, r) in p.threads.iter().zip(rp.threads.iter()) {
                let mut regs = ptrace::regs_from_bytes(&t.regs).ok_or_else(|| {
                    DstError::Inconsistent(format!("thread {} has a bad register blob", t.tid))
                })?;
                let eintr = ptrace::fixup_restart(&mut regs);
                tls.push((r.tid, eintr, p.mm, regs.fs_base));
                ptrace::set_xstate(r.tid, &t.xstate)
                    .map_err(|e| step("xstate", t.tid, e.into()))?;
                ptrace::setregs(r.tid, &regs)?;
                ptrace::set_sigmask(r.tid, t.sigmask)?;
            }
        }
        // Told EINTR, and sharing its TLS (so its errno) with another thread.
        self.interrupted = (tls.iter())
            .filter(|&&(tid, eintr, mm, fs)| {
                eintr && fs != 0 && (tls.iter()).any(|&(t, _, m, f)| t != tid && m == mm && f == fs)
            })
            .map(|t| t.0)
            .collect();
        Ok(())
    }
}
/// Give a thread exactly the saved capability sets: bounding set first (dropping needs
/// CAP_SETPCAP, which it still has), then `capset`, then the ambient set.
fn set_caps(r: &mut Remote, args: u64, caps: &model::Caps, last_cap: u64) -> Result<(), DstError> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const PR_CAP_AMBIENT: u64 = 47;
    const PR_CAP_AMBIENT_RAISE: u64 = 2;
    const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
    for cap in 0..=last_cap.min(63) {
        if caps.bounding & (1 << cap) == 0 {
            r.call(
                "prctl(PR_CAPBSET_DROP)",
                libc::SYS_prctl,
                &[libc::PR_CAPBSET_DROP as u64, cap, 0, 0, 0],
            )?;
        }
    }
    let mut buf = Vec::with_capacity(32);
    buf.extend_from_slice(&LINUX_CAPABILITY_VERSION_3.to_le_bytes());
    buf.extend_from_slice(&0i32.to_le_bytes());
    for half in [0u32, 32] {
        for set in [caps.effective, caps.permitted, caps.inheritable] {
            buf.extend_from_slice(
                &u32::try_from((set >> half) & 0xffff_ffff)
                    .unwrap_or(0)
                    .to_le_bytes(),
            );
        }
    }
    r.write(args, &buf)?;
    r.call("capset", libc::SYS_capset, &[args, args + 8])?;
    r.call(
        "prctl(PR_CAP_AMBIENT)",
        libc::SYS_prctl,
        &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0],
    )?;
    for cap in 0..=last_cap.min(63) {
        if caps.ambient & (1 << cap) != 0 {
            r.call(
                "prctl(PR_CAP_AMBIENT)",
                libc::SYS_prctl,
                &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0],
            )?;
        }
    }
    Ok(())
}

fn unregister_rseq(r: &mut Remote) -> Result<(), DstError> {
    let c = ptrace::rseq_config(r.tid)?;
    if c.rseq_abi_pointer != 0 {
        rseq_unregister(r, c.rseq_abi_pointer, c.rseq_abi_size, c.signature)?;
    }
    Ok(())
}

/// Unregister the rseq area at `addr` (`len` bytes, signature `sig`) of the thread behind `r`.
fn rseq_unregister(r: &mut Remote, addr: u64, len: u32, sig: u32) -> Result<(), DstError> {
    r.call(
        "rseq(unregister)",
        libc::SYS_rseq,
        &[addr, u64::from(len), RSEQ_FLAG_UNREGISTER, u64::from(sig)],
    )?;
    Ok(())
}

fn wait_stopped(tid: i32) -> Result<(), DstError> {
    loop {
        match ptrace::wait(tid)? {
            Stop::Event(_) | Stop::Syscall => return Ok(()),
            Stop::Signal(_) => ptrace::cont(tid, 0)?,
            Stop::Exited(c) => {
                return Err(DstError::Inconsistent(format!(
                    "task {tid} exited with {c} while being restored"
                )))
            }
            Stop::Killed(s) => {
                return Err(DstError::Inconsistent(format!(
                    "task {tid} was killed by signal {s} while being restored"
                )))
            }
        }
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut b = s.as_bytes().to_vec();
    b.push(0);
    b
}

/// Parents before children.
fn process_order(vk: &Vkernel) -> Result<Vec<usize>, DstError> {
    let mut order = Vec::new();
    let mut frontier = vec![1];
    while let Some(parent) = frontier.pop() {
        for (i, p) in vk.processes.iter().enumerate() {
            if p.ppid == parent && !order.contains(&i) {
                order.push(i);
                frontier.push(p.pid);
            }
        }
    }
    if order.len() != vk.processes.len() || order.is_empty() {
        return Err(DstError::Inconsistent(
            "the process tree is not rooted at the sandbox's init".into(),
        ));
    }
    Ok(order)
}

fn rep_of(
    vk: &Vkernel,
    order: &[usize],
    pred: impl Fn(&model::Process) -> bool,
) -> Result<usize, DstError> {
    order
        .iter()
        .copied()
        .find(|&i| pred(&vk.processes[i]))
        .ok_or_else(|| {
            DstError::Inconsistent("an address space or fd table no process uses".into())
        })
}

/// An address for the scratch area that no saved VMA of any address space uses.
fn pick_scratch(vk: &Vkernel) -> Result<u64, DstError> {
    let mut cand: u64 = 0x1_0000_0000;
    while cand + SCRATCH_LEN < TASK_SIZE {
        let clash = vk
            .mms
            .iter()
            .flat_map(|m| m.vmas.iter())
            .any(|v| v.start < cand + SCRATCH_LEN && cand < v.end);
        if !clash {
            return Ok(cand);
        }
        cand += 0x1000_0000;
    }
    Err(DstError::Inconsistent(
        "no free address for the scratch area".into(),
    ))
}

/// Refuse images this host cannot run, before anything is created.
fn check_image(vk: &Vkernel) -> Result<(), DstError> {
    let own = own_vdso()?;
    for m in &vk.mms {
        if !m.vdso.is_empty() && m.vdso != own {
            return Err(DstError::Incompatible(
                "the vDSO differs from the source's: restore needs the same kernel build".into(),
            ));
        }
    }
    // Pages of a file mapping that the vkernel did not change are not in the image: they come
    // from the file, which must therefore be the very same.
    // A library is mapped several times (text, data, ...) and by several processes: look at
    // each file once.
    let mut seen = std::collections::BTreeSet::new();
    for v in vk.mms.iter().flat_map(|m| m.vmas.iter()) {
        if let Backing::File {
            path,
            size,
            mtime_ns,
            ..
        } = &v.backing
        {
            if !seen.insert(path.as_str()) {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).map_err(|e| {
                DstError::Incompatible(format!(
                    "{path}, which the vkernel maps, cannot be opened here ({e})"
                ))
            })?;
            let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
            if meta.size() != *size || mtime != *mtime_ns {
                return Err(DstError::Incompatible(format!(
                    "{path}, which the vkernel maps, changed since the checkpoint (size or modification time differ)"
                )));
            }
        }
    }
    for p in &vk.processes {
        for t in &p.threads {
            if t.regs.len() != model::USER_REGS_SIZE {
                return Err(DstError::Inconsistent(format!(
                    "thread {} has a register blob of {} bytes",
                    t.tid,
                    t.regs.len()
                )));
            }
        }
    }
    Ok(())
}

fn own_vdso() -> Result<Vec<u8>, DstError> {
    let maps = proc::read("/proc/self/maps")?;
    let entries = vkm_common::procfs::parse_maps(&maps)
        .map_err(|e| proc::parse_error("/proc/self/maps", e))?;
    let Some(v) = entries.iter().find(|e| e.path.as_deref() == Some("[vdso]")) else {
        return Ok(Vec::new());
    };
    let mem = File::open("/proc/self/mem").map_err(|e| {
        DstError::Sys(vkm_sys::SysError::Path {
            path: "/proc/self/mem".into(),
            source: e,
        })
    })?;
    let mut buf = vec![0u8; usize::try_from(v.end - v.start).unwrap_or(0)];
    mem.read_exact_at(&mut buf, v.start).map_err(|e| {
        DstError::Sys(vkm_sys::SysError::Path {
            path: "/proc/self/mem".into(),
            source: e,
        })
    })?;
    Ok(buf)
}

/// Whether this host can run the vkernel an offer describes: the same kernel build (vDSO),
/// the same CPU state layout, enough memory, the same mapped files. The reason, if not.
pub fn check_offer(offer: &vkm_common::live::Offer) -> Result<(), String> {
    check_compat(offer)?;
    let avail = vkm_sys::host::mem_available().map_err(|e| e.to_string())?;
    if offer.mem_bytes > avail {
        return Err(format!(
            "not enough memory: the vkernel needs {} MiB, {} MiB are available",
            offer.mem_bytes >> 20,
            avail >> 20
        ));
    }
    Ok(())
}

/// [`check_offer`] but for memory: whether this host could run the vkernel at all, for a
/// capacity answer (the memory is answered as one number for all vkernels).
pub fn check_compat(offer: &vkm_common::live::Offer) -> Result<(), String> {
    if offer.version != vkm_common::live::PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this host speaks {})",
            offer.version,
            vkm_common::live::PROTOCOL_VERSION
        ));
    }
    let own = own_vdso().map_err(|e| format!("cannot read this host's vDSO ({e})"))?;
    if !offer.vdso_hash.is_empty() && blake3::hash(&own).as_bytes()[..] != offer.vdso_hash[..] {
        return Err(format!(
            "another kernel build (the source runs {}, this host {}); restore needs the same one",
            offer.kernel_release,
            vkm_sys::host::kernel_release()
        ));
    }
    let (xcr0, size) = vkm_sys::host::xsave_features();
    if offer.cpu.xcr0 != 0 && (offer.cpu.xcr0 != xcr0 || offer.cpu.xstate_size != size) {
        return Err(format!(
            "another CPU state layout (XCR0 {:#x}, {} bytes of xsave; this host {xcr0:#x}, {size} bytes)",
            offer.cpu.xcr0, offer.cpu.xstate_size
        ));
    }
    for d in &offer.net {
        vkm_netconf::check(d).map_err(|e| vkm_common::error::chain(&e))?;
    }
    for f in &offer.files {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&f.path)
            .map_err(|e| format!("{} (which the vkernel maps) is missing here ({e})", f.path))?;
        let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        if meta.size() != f.size || mtime != f.mtime_ns {
            return Err(format!(
                "{} (which the vkernel maps) differs here (size or modification time)",
                f.path
            ));
        }
    }
    Ok(())
}

/// The vDSO of this host, hashed, for an offer.
pub fn vdso_hash() -> Result<Vec<u8>, DstError> {
    Ok(blake3::hash(&own_vdso()?).as_bytes().to_vec())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
