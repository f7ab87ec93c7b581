//! Stopping every thread of a vkernel (and letting them go again).
//!
//! Every thread is seized and interrupted with ptrace; the task lists are rescanned until no new
//! thread or process appears, since a thread may clone while we stop its siblings. Seizing does
//! not change the vkernel: detaching without touching registers lets it continue exactly.
//!
//! A task that a process of the vkernel traces (UML's guest processes, traced by the UML kernel
//! process) cannot be seized. Such a vkernel is first quiesced through UML's mconsole (`stop`:
//! the UML kernel then only waits for the next mconsole request, every guest process is in a
//! ptrace stop whose notification UML has consumed, and all their state is in guest memory),
//! and each traced task is borrowed from its tracer ([`vkm_sys::tracee`]) and given back on
//! thaw, before `go`. The mconsole was chosen over freezing UML wherever it happens to be
//! because a UML frozen inside `wait4` for a running guest process has no consistent point.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vkm_sys::cpu::OneCpu;
use vkm_sys::proc;
use vkm_sys::ptrace::{self, Stop};
use vkm_sys::tracee;

use vkm_common::mconsole::Client;

use crate::SrcError;

/// After a `stop` that failed: it may only have been late (a UML short of CPU answers after
/// the request's timeout, and then stays stopped), so `go` follows it, which UML carries out
/// after it, or refuses as "not stopped".
fn undo_stop(socket: &Path) {
    if let Err(e) = vkm_common::mconsole::request(socket, "go") {
        tracing::debug!(socket = %socket.display(), error = %e, "no go after a failed stop");
    }
}

/// A UML stopped through its mconsole (`stop`).
#[derive(Debug)]
struct StoppedUml {
    socket: PathBuf,
    /// The client it was stopped through, connected to the socket itself: `go` reaches the
    /// UML through it whatever becomes of the socket's file meanwhile.
    client: Client,
    hidden: Option<Hidden>,
}

/// The mconsole socket's file moved aside, and what the umid directory held besides.
#[derive(Debug)]
struct Hidden {
    at: PathBuf,
    /// The UML's pid file (`<umid dir>/pid`) as it was.
    pid_file: Option<Vec<u8>>,
}

impl StoppedUml {
    fn stop(socket: &Path) -> Result<StoppedUml, vkm_common::error::CommonError> {
        let client = Client::connect(socket)?;
        if let Err(e) = client.request("stop") {
            undo_stop(socket);
            return Err(e);
        }
        Ok(StoppedUml {
            socket: socket.to_path_buf(),
            client,
            hidden: None,
        })
    }

    /// Move the socket's file next to the umid directory, not into it: a UML that exits
    /// removes its umid directory with everything in it, and on a filesystem both hosts share
    /// the destination's UML has the same one (a UML that fails on arrival takes the file
    /// with it, and the source's UML would have no mconsole left).
    fn hide(&mut self) -> Result<(), SrcError> {
        let (Some(umid_dir), Some(name)) = (self.socket.parent(), self.socket.file_name()) else {
            return Ok(());
        };
        let umid = umid_dir.file_name().unwrap_or_default().to_string_lossy();
        let at = umid_dir.parent().unwrap_or(umid_dir).join(format!(
            ".{umid}.{}.vkmigrate-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let pid_file = std::fs::read(umid_dir.join("pid")).ok();
        std::fs::rename(&self.socket, &at).map_err(|source| SrcError::Output {
            step: "move aside the mconsole socket",
            path: self.socket.clone(),
            source,
        })?;
        self.hidden = Some(Hidden { at, pid_file });
        Ok(())
    }

    /// Put the socket's file back (over whatever the destination bound there: it is gone when
    /// we thaw) with the umid directory and pid file if they went meanwhile, and tell the UML
    /// `go`. Errors are logged: the UML runs again if it can be reached at all.
    fn resume(self) {
        if let Some(h) = &self.hidden {
            h.put_back(&self.socket);
        }
        if let Err(e) = self.client.request("go") {
            tracing::error!(
                socket = %self.socket.display(),
                error = %vkm_common::error::chain(&e),
                "cannot resume the UML; run `uml_mconsole {} go`",
                self.socket.display()
            );
        }
    }
}

impl Hidden {
    fn put_back(&self, socket: &Path) {
        if let Some(dir) = socket.parent() {
            if !dir.exists() {
                tracing::warn!(
                    dir = %dir.display(),
                    "the UML's umid directory was removed while it was stopped (a UML with the \
                     same umid cleaned up after itself); making it again"
                );
                if let Err(e) = std::fs::create_dir_all(dir) {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot make it again");
                }
            }
            let pid = dir.join("pid");
            if let (Some(text), false) = (&self.pid_file, pid.exists()) {
                if let Err(e) = std::fs::write(&pid, text) {
                    tracing::warn!(
                        path = %pid.display(),
                        error = %e,
                        "cannot write the UML's pid file again"
                    );
                }
            }
        }
        if let Err(e) = std::fs::rename(&self.at, socket) {
            tracing::error!(
                hidden = %self.at.display(),
                socket = %socket.display(),
                error = %e,
                "cannot move the mconsole socket's file back: the UML runs again, but nothing \
                 can reach its mconsole, so it cannot be stopped or moved; move the file back \
                 by hand if it is there, or restart the UML when you can"
            );
        }
    }
}

/// One stopped process of the vkernel.
#[derive(Debug)]
pub struct FrozenProcess {
    pub host_pid: i32,
    pub ns_pid: i32,
    /// Host tids, leader first.
    pub threads: Vec<i32>,
    /// Signals (number, siginfo) that were being delivered to a thread when we interrupted
    /// it, per thread, in order: taken from it, to be made pending again on thaw.
    pub stop_signals: BTreeMap<i32, Vec<ptrace::Taken>>,
    /// A process that has exited but was not reaped yet: its wait status. It has no threads
    /// left to stop; restore recreates it as a zombie so that its parent can still reap it.
    pub zombie: Option<i32>,
    /// Host tid of the vkernel's task that traces this (single-threaded) process, which we
    /// borrowed from it.
    pub tracer: Option<i32>,
}

/// A task borrowed from its tracer inside the vkernel: host tids, and the task's tid in the
/// vkernel's namespace (what the tracer calls it).
#[derive(Debug, Clone)]
struct Borrowed {
    tracer: i32,
    tid: i32,
    ns_tid: i32,
    /// Signals that were pending for it and were taken on the way; sent again on thaw.
    taken: Vec<i32>,
}

/// A vkernel whose every thread is in a ptrace stop of ours.
#[derive(Debug)]
pub struct Frozen {
    /// Host pid of the namespace's init (the shim's reaper, not part of the vkernel).
    pub init: i32,
    /// Parents before children.
    pub processes: Vec<FrozenProcess>,
    /// Seized and interrupted threads that have not stopped yet.
    stopping: Vec<i32>,
    /// The UML that was quiesced (`stop`) before the freeze; thawing tells it `go`.
    uml: Option<StoppedUml>,
    borrowed: Vec<Borrowed>,
    /// We and every stopped thread share one CPU while frozen (see [`vkm_sys::cpu`]).
    cpu: Option<OneCpu>,
}

/// How often a freeze is tried when some task cannot stop at the moment.
const FREEZE_ATTEMPTS: u32 = 12;
/// How long a thread may take to stop after PTRACE_INTERRUPT before we call it stuck.
const STOP_TIMEOUT: Duration = Duration::from_millis(200);

impl Frozen {
    /// Stop every process below `init` (the pid-1 reaper of the vkernel's namespace).
    pub fn freeze(init: i32) -> Result<Frozen, SrcError> {
        Frozen::freeze_with(init, None, || {})
    }

    /// [`Frozen::freeze`], running `interrupted` once every thread has been told to stop and
    /// before we wait for the first (or before a retry, or at the end, whichever comes
    /// first; for a UML stopped through its mconsole, just before that request). A live
    /// migration lifts its CPU throttle there: a throttled thread must run to stop, and one
    /// lifted before it was interrupted would first pay back, at full speed, the writing it
    /// was kept from (the final round would carry it).
    ///
    /// `mconsole`: the socket of a UML found in an earlier freeze of the same vkernel, stopped
    /// first (see [`Frozen::quiesce`]) instead of after a freeze that finds its traced guest
    /// processes and has to let everything go again.
    pub fn freeze_with(
        init: i32,
        mconsole: Option<&Path>,
        interrupted: impl FnOnce(),
    ) -> Result<Frozen, SrcError> {
        let mut hook = Some(interrupted);
        let mut run_hook = || {
            if let Some(h) = hook.take() {
                h();
            }
        };
        let mut frozen = Frozen {
            init,
            processes: Vec::new(),
            stopping: Vec::new(),
            uml: None,
            borrowed: Vec::new(),
            cpu: None,
        };
        if let Some(socket) = mconsole {
            // The UML stops at this request, which a throttled one would take its time over
            // (past the request's timeout at 0.1 % of a CPU): the hook lifts the throttle.
            run_hook();
            match StoppedUml::stop(socket) {
                Ok(uml) => frozen.uml = Some(uml),
                // Gone or changed since: found again the long way.
                Err(e) => {
                    tracing::debug!(socket = %socket.display(), error = %e, "UML not stopped ahead");
                    undo_stop(socket);
                }
            }
        }
        // A task that cannot stop now (a vfork parent waits, uninterruptibly, for its child,
        // which we may have stopped already) makes us let go of everything and try again: the
        // child runs on, execs or exits, and releases its parent.
        let mut attempt = 0;
        loop {
            // Every thread is interrupted at once the first time; after a task that would not
            // stop (a vfork parent waits for its child, which we had stopped too), one after
            // the other, parents first, so that such a child runs on until its parent stops.
            let result = frozen.freeze_all(attempt == 0, &mut run_hook);
            run_hook();
            match result {
                Ok(()) => return Ok(frozen),
                Err(SrcError::Traced { pid, tracer }) if frozen.uml.is_none() => {
                    frozen.thaw();
                    frozen.quiesce(pid, tracer)?;
                }
                Err(SrcError::NotStopping { pid }) if attempt + 1 < FREEZE_ATTEMPTS => {
                    tracing::debug!(pid, attempt, "a task does not stop; thawing and retrying");
                    frozen.thaw();
                    std::thread::sleep(Duration::from_millis(5 << attempt.min(6)));
                    attempt += 1;
                }
                Err(e) => {
                    frozen.thaw();
                    return Err(e);
                }
            }
        }
    }

    /// Stop the UML whose kernel process `tracer` (host pid) traces `pid` through its mconsole,
    /// or refuse a vkernel that traces its own processes in any other way.
    fn quiesce(&mut self, pid: i32, tracer: i32) -> Result<(), SrcError> {
        let Some(socket) = crate::uml::mconsole_of(tracer)? else {
            return Err(SrcError::Traced { pid, tracer });
        };
        let uml = StoppedUml::stop(&socket).map_err(|source| SrcError::Mconsole {
            pid: tracer,
            command: "stop",
            source,
        })?;
        tracing::debug!(socket = %socket.display(), "UML stopped through its mconsole");
        self.uml = Some(uml);
        Ok(())
    }

    fn freeze_all(
        &mut self,
        pipelined: bool,
        interrupted: &mut dyn FnMut(),
    ) -> Result<(), SrcError> {
        if self.cpu.is_none() {
            self.cpu = OneCpu::new();
        }
        loop {
            let mut changed = false;
            // Traced by a task of the vkernel: (host pid, tid, tracer), borrowed once
            // everything else is stopped (the tracer must be). By pid: a process that vanished
            // meanwhile is removed from the list, which moves the indices.
            let mut traced: Vec<(i32, i32, i32)> = Vec::new();
            // Seized and interrupted, not yet stopped: (host pid, tid, threads the process had).
            let mut waiting: Vec<(i32, i32, usize)> = Vec::new();
            for pid in proc::descendants(self.init)? {
                let idx = match self.processes.iter().position(|p| p.host_pid == pid) {
                    Some(i) => i,
                    None => {
                        let ns_pid = match proc::ns_pid(pid) {
                            Ok(n) => n,
                            // Reaped between listing and reading: not part of the vkernel.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                            Err(e) => return Err(e.into()),
                        };
                        self.processes.push(FrozenProcess {
                            host_pid: pid,
                            ns_pid,
                            threads: Vec::new(),
                            stop_signals: BTreeMap::new(),
                            zombie: None,
                            tracer: None,
                        });
                        self.processes.len() - 1
                    }
                };
                if self.processes[idx].zombie.is_some() {
                    continue;
                }
                let tids = match proc::list_numeric(proc::pid_path(pid, "task")) {
                    Ok(t) => t,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        self.processes.remove(idx);
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                for &tid in &tids {
                    if self.processes[idx].threads.contains(&tid) {
                        continue;
                    }
                    changed = true;
                    match begin_stop(tid)? {
                        // Until it has stopped, a thaw must wait for it before it can let go.
                        Begin::Interrupted => {
                            self.stopping.push(tid);
                            if pipelined {
                                waiting.push((pid, tid, tids.len()));
                            } else {
                                changed |= self.collect_stop(pid, tid, tids.len())?;
                            }
                        }
                        Begin::Gone => {}
                        Begin::Traced(tracer) => traced.push((pid, tid, tracer)),
                        Begin::Dead(status) if tid == pid => {
                            self.leader_exited(idx, tids.len(), Some(status))?;
                        }
                        Begin::Dead(_) => {}
                    }
                }
            }
            // (Pipelined:) every thread was interrupted before we wait for the first: they
            // stop side by side instead of one after the other.
            interrupted();
            for (pid, tid, ntids) in waiting {
                changed |= self.collect_stop(pid, tid, ntids)?;
            }
            for (pid, tid, tracer) in traced {
                let Some(idx) = self.processes.iter().position(|p| p.host_pid == pid) else {
                    continue;
                };
                self.borrow(idx, tid, tracer)?;
            }
            if !changed {
                break;
            }
        }
        self.processes.sort_by_key(|p| p.ns_pid);
        Ok(())
    }

    /// Move the calling thread, started by us while frozen, off the CPU we and the frozen
    /// threads share (see [`OneCpu::move_elsewhere`]).
    pub fn move_elsewhere(&self) {
        if let Some(c) = &self.cpu {
            c.move_elsewhere();
        }
    }

    /// Every frozen thread gets its own CPUs back, and so do we: call it once the injections
    /// are done. Threads we start from now on (page readers, encoders) would otherwise inherit
    /// our single CPU and queue up behind each other.
    pub fn unpin(&mut self) {
        drop(self.cpu.take());
    }

    /// Wait for the stop of the interrupted thread `tid` of process `pid` (which had `ntids`
    /// threads) and file it; true when the process list must be read again.
    fn collect_stop(&mut self, pid: i32, tid: i32, ntids: usize) -> Result<bool, SrcError> {
        // A vanished process's threads stay in `stopping` for the thaw to collect.
        let Some(idx) = self.processes.iter().position(|p| p.host_pid == pid) else {
            return Ok(false);
        };
        let stopped = wait_for_stop(tid, &mut self.processes[idx].stop_signals)?;
        self.stopping.retain(|&t| t != tid);
        if !stopped && tid == pid {
            // The process exited between our interrupt and its stop: a zombie its frozen
            // parent has yet to reap, or gone already.
            match dead_status(pid) {
                Some(Some(status)) => self.leader_exited(idx, ntids, Some(status))?,
                None => self.leader_exited(idx, ntids, None)?,
                // Still on its way out: the next pass sees how it ended.
                Some(None) => return Ok(true),
            }
            return Ok(false);
        }
        if stopped {
            if let Some(c) = self.cpu.as_mut() {
                c.add(tid);
            }
            let p = &mut self.processes[idx];
            if tid == p.host_pid {
                p.threads.insert(0, tid);
            } else {
                p.threads.push(tid);
            }
        }
        Ok(false)
    }

    /// The main thread of process #`idx`, which had `ntids` threads, has exited: with its wait
    /// `status` the process is a zombie its parent has yet to reap, without one it is gone.
    fn leader_exited(
        &mut self,
        idx: usize,
        ntids: usize,
        status: Option<i32>,
    ) -> Result<(), SrcError> {
        if ntids > 1 {
            return Err(SrcError::Unsupported {
                pid: self.processes[idx].ns_pid,
                what: "its main thread has exited while other threads run".into(),
            });
        }
        match status {
            Some(s) => self.processes[idx].zombie = Some(s),
            None => {
                self.processes.remove(idx);
            }
        }
        Ok(())
    }

    /// The mconsole socket of the UML stopped for this freeze, if any.
    pub fn mconsole(&self) -> Option<&Path> {
        self.uml.as_ref().map(|u| u.socket.as_path())
    }

    /// Move the quiesced UML's mconsole socket file aside, so that the destination can bind the
    /// same path when both hosts see one filesystem (a shared /tmp, or the test lab). The socket
    /// stays bound to the moved file; thawing moves it back, killing removes it.
    pub fn hide_mconsole(&mut self) -> Result<(), SrcError> {
        match &mut self.uml {
            Some(uml) => uml.hide(),
            None => Ok(()),
        }
    }

    /// Take the traced task `tid` of process #`idx` from its `tracer`, which must be a stopped
    /// task of ours, while the vkernel is quiesced.
    fn borrow(&mut self, idx: usize, tid: i32, tracer: i32) -> Result<(), SrcError> {
        let pid = self.processes[idx].ns_pid;
        let tracer_ours = self
            .processes
            .iter()
            .any(|p| p.threads.contains(&tracer) && p.tracer.is_none());
        if self.uml.is_none() || !tracer_ours || tid != self.processes[idx].host_pid {
            return Err(SrcError::Traced { pid, tracer });
        }
        let ns_tid = proc::ns_pid(tid)?;
        let taken = tracee::take(tracer, tid, ns_tid)?;
        if let Some(c) = self.cpu.as_mut() {
            c.add(tid);
        }
        let p = &mut self.processes[idx];
        // Pending for it again wherever it runs next: on thaw they are sent again (see
        // `thaw`), and a capture finds them with the signals taken during the freeze.
        p.stop_signals
            .entry(tid)
            .or_default()
            .extend(taken.iter().map(|&sig| (sig, ptrace::tkill_siginfo(sig))));
        p.tracer = Some(tracer);
        p.threads.insert(0, tid);
        self.borrowed.push(Borrowed {
            tracer,
            tid,
            ns_tid,
            taken,
        });
        Ok(())
    }

    /// Let every thread run again. Errors are logged, not returned: a thaw must try every
    /// thread even when one of them has gone.
    pub fn thaw(&mut self) {
        // Borrowed tasks go back while their tracers are still stopped (they run the seize).
        let borrowed = std::mem::take(&mut self.borrowed);
        for b in &borrowed {
            match tracee::give(b.tracer, b.tid, b.ns_tid) {
                Ok(more) => {
                    // Pending again, as they were: UML takes a stray SIGALRM for a reschedule.
                    for &sig in b.taken.iter().chain(&more) {
                        if let Err(e) = vkm_sys::calls::tgkill(b.tid, b.tid, sig) {
                            tracing::warn!(tid = b.tid, sig, error = %e, "could not re-send a signal");
                        }
                    }
                }
                Err(e) => tracing::error!(
                    tid = b.tid,
                    tracer = b.tracer,
                    error = %vkm_common::error::chain(&e),
                    "cannot give a guest process back to its tracer; the UML will kill it when it next runs it"
                ),
            }
        }
        // Their own CPUs back before any of them runs.
        drop(self.cpu.take());
        for p in self.processes.drain(..) {
            for t in p.threads {
                if borrowed.iter().any(|b| b.tid == t) {
                    continue;
                }
                // Signals taken as it stopped are pending again before it runs (a lost
                // SIGALRM leaves a UML without its one-shot timer, spinning for good).
                let taken = p.stop_signals.get(&t).map_or(&[][..], Vec::as_slice);
                if let Err(e) = ptrace::release(p.host_pid, t, taken) {
                    tracing::warn!(tid = t, error = %e, "detach failed");
                }
            }
        }
        // Seized but not yet stopped: each stops as soon as whatever held it lets go (the others
        // run again now), and only a stopped tracee can be detached. All are watched at once:
        // one may wait for another (a vfork parent for its child) that stops later.
        let mut pending = std::mem::take(&mut self.stopping);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pending.is_empty() {
            pending.retain(|&t| match ptrace::wait_timeout(t, Duration::ZERO) {
                Ok(None) => true,
                Ok(Some(Stop::Exited(_) | Stop::Killed(_))) | Err(_) => false,
                Ok(Some(stop)) => {
                    // A signal that was on its way when it stopped goes on with it.
                    let sig = match stop {
                        Stop::Signal(sig) => sig,
                        _ => 0,
                    };
                    if let Err(e) = ptrace::detach(t, sig) {
                        tracing::warn!(tid = t, error = %e, "detach failed");
                    }
                    false
                }
            });
            if std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // They stay attached until this process exits, which detaches them.
        for t in pending {
            tracing::warn!(
                tid = t,
                "a task never stopped; it is released when vkmigrate exits"
            );
        }
        if let Some(uml) = self.uml.take() {
            uml.resume();
        }
    }

    /// Kill the whole vkernel: SIGKILL its namespace's init, which makes the kernel kill every
    /// process in the namespace. Used once its state is safely elsewhere. As their tracer we
    /// must also collect every killed thread (non-leaders first: a leader's exit is reported
    /// only once its thread group is empty), or they stay zombies and init never exits.
    pub fn kill(mut self) -> Result<(), SrcError> {
        let processes = std::mem::take(&mut self.processes);
        self.borrowed.clear();
        drop(self.cpu.take());
        if let Some(hidden) = self.uml.take().and_then(|u| u.hidden) {
            let _ = std::fs::remove_file(hidden.at);
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.init),
            nix::sys::signal::SIGKILL,
        )
        .map_err(|e| SrcError::Kill {
            pid: self.init,
            source: e.into(),
        })?;
        for p in &processes {
            for &t in p.threads.iter().rev() {
                loop {
                    match ptrace::wait(t) {
                        Ok(Stop::Exited(_)) | Ok(Stop::Killed(_)) | Err(_) => break,
                        // A stop reported before the kill landed; the kill follows.
                        Ok(_) => {}
                    }
                }
            }
        }
        Ok(())
    }

    pub fn host_pid_of(&self, ns_pid: i32) -> Option<i32> {
        self.processes
            .iter()
            .find(|p| p.ns_pid == ns_pid)
            .map(|p| p.host_pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

enum Begin {
    /// Seized (or ours already) and interrupted: its stop is on its way.
    Interrupted,
    /// The thread no longer exists.
    Gone,
    /// The thread has exited (a zombie, or on its way out) with this wait status.
    Dead(i32),
    /// Another task of the vkernel traces it (host tid of the tracer).
    Traced(i32),
}

/// Seize `tid` and interrupt it, or say why it cannot be.
fn begin_stop(tid: i32) -> Result<Begin, SrcError> {
    if let Err(e) = ptrace::seize(tid, ptrace::PTRACE_O_TRACESYSGOOD) {
        // A child that a seized thread cloned with CLONE_PTRACE is ours already; it stops
        // like any seized task.
        let ours =
            e.raw_os_error() == Some(libc::EPERM) && tracer_of(tid) == Some(std::process::id());
        if !ours {
            if e.raw_os_error() == Some(libc::EPERM) {
                if let Some(tracer) = tracer_of(tid).filter(|&t| t != 0) {
                    return Ok(Begin::Traced(i32::try_from(tracer).unwrap_or(-1)));
                }
            }
            // Exited tasks cannot be seized: tell a zombie from a real refusal.
            return match e.raw_os_error() {
                Some(libc::ESRCH) | Some(libc::EPERM) => match dead_status(tid) {
                    Some(Some(status)) => Ok(Begin::Dead(status)),
                    None => Ok(Begin::Gone),
                    Some(None) => {
                        let status = proc::read(proc::pid_path(tid, "status")).unwrap_or_default();
                        tracing::warn!(tid, status = %status, "seize refused");
                        Err(e.into())
                    }
                },
                _ => Err(e.into()),
            };
        }
    }
    ptrace::interrupt(tid)?;
    Ok(Begin::Interrupted)
}

/// Wait (at most [`STOP_TIMEOUT`]) for an interrupted thread's stop: true when stopped, false
/// when it exited meanwhile. Signals taken on the way are kept to be pending again on thaw.
fn wait_for_stop(
    tid: i32,
    stop_signals: &mut BTreeMap<i32, Vec<ptrace::Taken>>,
) -> Result<bool, SrcError> {
    match ptrace::wait_interrupted(tid, STOP_TIMEOUT, stop_signals.entry(tid).or_default())? {
        ptrace::Interrupted::Stopped => Ok(true),
        ptrace::Interrupted::Exited => Ok(false),
        ptrace::Interrupted::Timeout => Err(SrcError::NotStopping { pid: tid }),
    }
}

/// None: the task is gone; Some(None): alive; Some(Some(status)): exited, with its wait status
/// (field 52 of /proc/PID/stat).
pub(crate) fn dead_status(tid: i32) -> Option<Option<i32>> {
    let stat = proc::read(proc::pid_path(tid, "stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    match fields.first() {
        Some(&"Z") | Some(&"X") => Some(Some(
            fields.get(49).and_then(|f| f.parse().ok()).unwrap_or(0),
        )),
        _ => Some(None),
    }
}

/// The TracerPid of a task, from its status.
fn tracer_of(tid: i32) -> Option<u32> {
    let status = proc::read(proc::pid_path(tid, "status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}
