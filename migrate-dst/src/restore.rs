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
use std::time::{Duration, Instant};

use vkm_common::image::{Frame, ImageReader, Space};
use vkm_common::model::{self, prot, Backing, MemObject, ObjectKind, SysvShm, Vkernel};
use vkm_sys::calls::{self, CloneArgs};
use vkm_sys::inject::Remote;
use vkm_sys::proc;
use vkm_sys::ptrace::{self, Stop};

use crate::sandbox::AGENT_PIDFD;
use crate::{DstError, Sandbox};

const SCRATCH_LEN: u64 = 1 << 20;
/// Where injected calls find their arguments inside the scratch area.
const ARGS_OFF: u64 = 4096;
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
/// is the pty slave that replaces the one the vkernel had. On success every process runs; on
/// error the caller must [`Sandbox::kill`] the sandbox.
pub fn restore<R: Read + Send>(
    reader: &mut ImageReader<R>,
    vk: &Vkernel,
    sandbox: &mut Sandbox,
    console: Option<&OwnedFd>,
) -> Result<RestoreReport, DstError> {
    let t0 = Instant::now();
    check_image(vk)?;
    let order = process_order(vk)?;
    let scratch = pick_scratch(vk)?;
    let mut r = Restorer {
        vk,
        scratch,
        procs: BTreeMap::new(),
        objects: BTreeMap::new(),
        hosts: BTreeMap::new(),
        pages: 0,
    };
    r.build_tree(&order, sandbox)?;
    r.create_objects()?;
    for mm in &vk.mms {
        let rep = rep_of(vk, &order, |p| p.mm == mm.id)?;
        r.layout(mm, rep)
            .map_err(|e| step("layout", vk.processes[rep].pid, e))?;
    }
    r.receive_pages(reader, &order)?;
    r.remove_sysv()?;
    let agent_files = r.prepare_files(console)?;
    for table in &vk.fd_tables {
        let rep = rep_of(vk, &order, |p| p.fd_table == table.id)?;
        r.install_fds(rep, table, &agent_files.files)
            .map_err(|e| step("files", vk.processes[rep].pid, e))?;
    }
    drop(agent_files);
    for &i in &order {
        if vk.processes[i].zombie.is_some() {
            continue;
        }
        let pid = vk.processes[i].pid;
        r.process_state(i)
            .map_err(|e| step("process state", pid, e))?;
    }
    r.resume(&order)?;
    Ok(RestoreReport {
        processes: vk.processes.len(),
        threads: vk.processes.iter().map(|p| p.threads.len()).sum(),
        pages: r.pages,
        elapsed: t0.elapsed(),
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

struct Restorer<'a> {
    vk: &'a Vkernel,
    scratch: u64,
    /// By index into `vk.processes`.
    procs: BTreeMap<usize, RProc>,
    /// Object id → the agent's memfd (for a SysV segment: its shmem file).
    objects: BTreeMap<u32, OwnedFd>,
    /// Namespace pid → host pid of every process created, zombies included.
    hosts: BTreeMap<i32, i32>,
    pages: u64,
}

impl Restorer<'_> {
    fn args(&self) -> u64 {
        self.scratch + ARGS_OFF
    }

    fn leader(&mut self, i: usize) -> Result<&mut Remote, DstError> {
        self.procs
            .get_mut(&i)
            .and_then(|p| p.threads.first_mut())
            .ok_or_else(|| DstError::Inconsistent(format!("process #{i} was not created")))
    }

    // ---- stage 1: the process tree -------------------------------------------------------

    fn build_tree(&mut self, order: &[usize], sandbox: &mut Sandbox) -> Result<(), DstError> {
        let vk = self.vk;
        for &i in order {
            let p = &vk.processes[i];
            let remote = if p.ppid == 1 {
                let host = sandbox.spawn_parked(p.pid)?;
                let r = self
                    .adopt(host, calls::own_syscall_gadget(), false)
                    .map_err(|e| step("seize", p.pid, e))?;
                let mut r = r;
                self.map_scratch(&mut r)
                    .map_err(|e| step("scratch", p.pid, e))?;
                r
            } else {
                let parent_idx = vk
                    .processes
                    .iter()
                    .position(|q| q.pid == p.ppid)
                    .ok_or_else(|| {
                        DstError::Inconsistent(format!(
                            "process {} has no parent {}",
                            p.pid, p.ppid
                        ))
                    })?;
                let parent = &vk.processes[parent_idx];
                let mut flags = 0u64;
                if parent.mm == p.mm {
                    flags |= libc::CLONE_VM as u64;
                }
                if parent.fd_table == p.fd_table {
                    flags |= libc::CLONE_FILES as u64;
                }
                let exit_signal = u64::try_from(p.exit_signal).unwrap_or(0);
                if p.zombie.is_some() {
                    flags = 0;
                }
                let host = self
                    .clone_in(parent_idx, flags, exit_signal, p.pid)
                    .map_err(|e| step("clone", p.pid, e))?;
                let scratch = self.scratch;
                let mut r = self.adopt(host, scratch, true)?;
                r.scratch = scratch + ARGS_OFF;
                r.stack = scratch + SCRATCH_LEN - 256;
                r
            };
            self.hosts.insert(p.pid, remote.tid);
            self.procs.insert(
                i,
                RProc {
                    threads: vec![remote],
                },
            );
            let args = self.args();
            let r = self.leader(i)?;
            if p.zombie.is_none() {
                unregister_rseq(r).map_err(|e| step("rseq", p.pid, e))?;
            }
            if p.sid == p.pid {
                r.call("setsid", libc::SYS_setsid, &[])
                    .map_err(|e| step("setsid", p.pid, e.into()))?;
            }
            let _ = args;
        }
        // Groups: leaders first, so that members have a group to join.
        for pass in 0..2 {
            for &i in order {
                let p = &vk.processes[i];
                if p.pgid == 0 || p.pgid == p.sid || (pass == 0) != (p.pgid == p.pid) {
                    continue;
                }
                let pgid = u64::try_from(p.pgid).unwrap_or(0);
                self.leader(i)?
                    .call("setpgid", libc::SYS_setpgid, &[0, pgid])
                    .map_err(|e| step("setpgid", p.pid, e.into()))?;
            }
        }
        self.make_zombies(order)
    }

    /// Processes that had exited but were not reaped: they exit again now, with the same
    /// status, and wait for their (restored) parent to reap them.
    fn make_zombies(&mut self, order: &[usize]) -> Result<(), DstError> {
        let vk = self.vk;
        for &i in order {
            let p = &vk.processes[i];
            let Some(status) = p.zombie else { continue };
            let args = self.args();
            let mut rp = self
                .procs
                .remove(&i)
                .ok_or_else(|| DstError::Inconsistent("lost process".into()))?;
            let r = &mut rp.threads[0];
            let sig = status & 0x7f;
            let mut regs = r.saved;
            if sig == 0 {
                regs.rax = libc::SYS_exit_group as u64;
                regs.rdi = u64::try_from((status >> 8) & 0xff).unwrap_or(0);
            } else {
                // Killed by a signal: the signal's default action with every signal unblocked.
                r.write(args, &[0u8; 32])?;
                r.call(
                    "rt_sigaction",
                    libc::SYS_rt_sigaction,
                    &[u64::try_from(sig).unwrap_or(0), args, 0, 8],
                )?;
                ptrace::set_sigmask(r.tid, 0)?;
                regs.rax = libc::SYS_tgkill as u64;
                regs.rdi = u64::try_from(p.pid).unwrap_or(0);
                regs.rsi = regs.rdi;
                regs.rdx = u64::try_from(sig).unwrap_or(0);
            }
            regs.orig_rax = u64::MAX;
            regs.rip = r.gadget;
            ptrace::setregs(r.tid, &regs)?;
            ptrace::cont(r.tid, 0)?;
            loop {
                match ptrace::wait(r.tid)? {
                    Stop::Exited(_) | Stop::Killed(_) => break,
                    Stop::Signal(s) => ptrace::cont(r.tid, s)?,
                    _ => ptrace::cont(r.tid, 0)?,
                }
            }
        }
        Ok(())
    }

    /// Seize a fresh task, stop it, block all its signals (nothing may be delivered while we
    /// inject; the saved mask is set at the very end).
    /// `attached`: the task was auto-attached (created by an injected clone) and its first
    /// stop has been waited for already.
    fn adopt(&self, host: i32, gadget: u64, attached: bool) -> Result<Remote, DstError> {
        if !attached {
            ptrace::seize(
                host,
                ptrace::PTRACE_O_TRACESYSGOOD
                    | ptrace::PTRACE_O_TRACECLONE
                    | ptrace::PTRACE_O_TRACEFORK
                    | ptrace::PTRACE_O_TRACEVFORK
                    | ptrace::PTRACE_O_EXITKILL,
            )?;
            ptrace::interrupt(host)?;
            wait_stopped(host)?;
        }
        ptrace::set_sigmask(host, u64::MAX)?;
        let mem = open_mem(host)?;
        let regs = ptrace::getregs(host)?;
        Remote::new(host, gadget, 0, regs.rsp, mem).map_err(Into::into)
    }

    fn map_scratch(&self, r: &mut Remote) -> Result<(), DstError> {
        let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64;
        let got = r.call(
            "mmap(scratch)",
            libc::SYS_mmap,
            &[self.scratch, SCRATCH_LEN, prot, flags, u64::MAX, 0],
        )?;
        if got != self.scratch {
            return Err(DstError::Inconsistent(format!(
                "scratch area landed at {got:#x}"
            )));
        }
        // syscall; int3
        r.write(self.scratch, &[0x0f, 0x05, 0xcc])?;
        r.gadget = self.scratch;
        r.scratch = self.scratch + ARGS_OFF;
        r.stack = self.scratch + SCRATCH_LEN - 256;
        Ok(())
    }

    /// Inject `clone3` into process #`parent` to create a child at namespace pid `pid`; returns
    /// the child's host pid (it is auto-attached and stopped).
    fn clone_in(
        &mut self,
        parent: usize,
        flags: u64,
        exit_signal: u64,
        pid: i32,
    ) -> Result<i32, DstError> {
        let args = self.args();
        let r = self.leader(parent)?;
        let tid_addr = args + 128;
        let ca = CloneArgs {
            flags,
            exit_signal,
            set_tid: tid_addr,
            set_tid_size: 1,
            ..Default::default()
        };
        r.write(args, &ca.to_bytes())?;
        r.write(tid_addr, &pid.to_le_bytes())?;
        let got = r.call("clone3", libc::SYS_clone3, &[args, 88])?;
        if got != u64::try_from(pid).unwrap_or(0) {
            return Err(DstError::Inconsistent(format!(
                "clone3 gave pid {got}, wanted {pid}"
            )));
        }
        let host = *r
            .children
            .first()
            .ok_or_else(|| DstError::Inconsistent("clone3 reported no child".into()))?;
        wait_stopped(host)?;
        Ok(host)
    }

    // ---- stage 2: layouts ----------------------------------------------------------------

    fn create_objects(&mut self) -> Result<(), DstError> {
        let mut sysv = Vec::new();
        for o in &self.vk.objects {
            if let ObjectKind::SysV(seg) = &o.kind {
                sysv.push((o, seg));
                continue;
            }
            let name = o
                .name
                .trim_start_matches("/memfd:")
                .trim_end_matches(" (deleted)");
            let cname = std::ffi::CString::new(name).unwrap_or_default();
            let fd = nix::sys::memfd::memfd_create(
                &cname,
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
                    | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
            )
            .map_err(|e| DstError::Sys(calls::errno("memfd_create", 0, e as i32)))?;
            let size = i64::try_from(o.size)
                .map_err(|_| DstError::Inconsistent("object too large".into()))?;
            nix::unistd::ftruncate(&fd, size)
                .map_err(|e| DstError::Sys(calls::errno("ftruncate(memfd)", 0, e as i32)))?;
            self.objects.insert(o.id, fd);
        }
        if !sysv.is_empty() {
            // Segments are created by a thread of ours that joins the sandbox's IPC namespace
            // (that of any skeleton): shm_next_id and shmget act in the caller's namespace, and
            // the segment's file comes back as an fd that pages are written to like a memfd's.
            let pid = self.ipc_ns_pid()?;
            let files = calls::in_ipc_namespace(pid, || {
                sysv.iter()
                    .map(|(o, seg)| Ok((o.id, create_segment(o, seg)?)))
                    .collect::<Result<Vec<_>, DstError>>()
            })?;
            self.objects.extend(files);
        }
        Ok(())
    }

    /// Host pid of a live skeleton, whose IPC namespace is the sandbox's.
    fn ipc_ns_pid(&self) -> Result<i32, DstError> {
        self.procs
            .values()
            .find_map(|p| p.threads.first())
            .map(|r| r.tid)
            .ok_or_else(|| DstError::Inconsistent("no process to restore SysV segments in".into()))
    }

    /// Segments that were marked removed while attached: removed again, now that every
    /// process has attached them (the kernel destroys them when the last one detaches).
    fn remove_sysv(&mut self) -> Result<(), DstError> {
        let removed: Vec<i32> = self
            .vk
            .objects
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectKind::SysV(seg) if seg.removed => Some(seg.shmid),
                _ => None,
            })
            .collect();
        if removed.is_empty() {
            return Ok(());
        }
        let pid = self.ipc_ns_pid()?;
        calls::in_ipc_namespace(pid, || {
            removed
                .iter()
                .try_for_each(|&id| calls::shm_rmid(id).map_err(DstError::from))
        })
    }

    fn layout(&mut self, mm: &model::Mm, rep: usize) -> Result<(), DstError> {
        let scratch = self.scratch;
        let args = self.args();
        let objects: BTreeMap<u32, i32> = self
            .objects
            .iter()
            .map(|(k, v)| (*k, v.as_raw_fd()))
            .collect();
        let vk = self.vk;
        let sysv: BTreeMap<u32, (&MemObject, &SysvShm)> = vk
            .objects
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectKind::SysV(seg) => Some((o.id, (o, seg))),
                _ => None,
            })
            .collect();
        let r = self.leader(rep)?;
        r.call("munmap(low)", libc::SYS_munmap, &[0, scratch])?;
        let top = scratch + SCRATCH_LEN;
        r.call("munmap(high)", libc::SYS_munmap, &[top, TASK_SIZE - top])?;
        if let Some(vvar) = mm.vmas.iter().find(|v| matches!(v.backing, Backing::Vvar)) {
            r.call(
                "arch_prctl(ARCH_MAP_VDSO_64)",
                libc::SYS_arch_prctl,
                &[ARCH_MAP_VDSO_64, vvar.start],
            )?;
        }
        for v in &mm.vmas {
            let len = v.end - v.start;
            let p = u64::from(v.prot & (prot::READ | prot::WRITE | prot::EXEC));
            let share = if v.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            } as u64;
            let fixed = libc::MAP_FIXED as u64;
            match &v.backing {
                Backing::Vdso | Backing::Vvar | Backing::VvarVclock | Backing::Vsyscall => continue,
                Backing::Anon => {
                    let mut flags = share | fixed | libc::MAP_ANONYMOUS as u64;
                    if v.growsdown {
                        flags |= libc::MAP_GROWSDOWN as u64;
                    }
                    r.call(
                        "mmap(anon)",
                        libc::SYS_mmap,
                        &[v.start, len, p, flags, u64::MAX, 0],
                    )?;
                }
                Backing::File { path, offset, .. } => {
                    let mode = if v.shared && v.prot & prot::WRITE != 0 {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    r.write(args, &cstr(path))?;
                    let fd = r.call(
                        "openat(mapped file)",
                        libc::SYS_openat,
                        &[
                            libc::AT_FDCWD as u64,
                            args,
                            (mode | libc::O_CLOEXEC) as u64,
                            0,
                        ],
                    )?;
                    let res = r.call(
                        "mmap(file)",
                        libc::SYS_mmap,
                        &[v.start, len, p, share | fixed, fd, *offset],
                    );
                    r.call("close", libc::SYS_close, &[fd])?;
                    res?;
                }
                Backing::Object { id, offset } if sysv.contains_key(id) => {
                    let (o, seg) = sysv[id];
                    attach_sysv(r, mm, v, o.size, seg, *offset, scratch)?;
                }
                Backing::Object { id, offset } => {
                    let afd = objects
                        .get(id)
                        .ok_or_else(|| DstError::Inconsistent(format!("object {id} is missing")))?;
                    let fd = r.call(
                        "pidfd_getfd(object)",
                        libc::SYS_pidfd_getfd,
                        &[AGENT_PIDFD as u64, *afd as u64, 0],
                    )?;
                    let res = r.call(
                        "mmap(object)",
                        libc::SYS_mmap,
                        &[v.start, len, p, share | fixed, fd, *offset],
                    );
                    r.call("close", libc::SYS_close, &[fd])?;
                    res?;
                }
            }
            for a in &v.advise {
                let advice = match a.as_str() {
                    "dc" => libc::MADV_DONTFORK,
                    "dd" => libc::MADV_DONTDUMP,
                    "wf" => libc::MADV_WIPEONFORK,
                    "hg" => libc::MADV_HUGEPAGE,
                    "nh" => libc::MADV_NOHUGEPAGE,
                    _ => continue,
                };
                r.call("madvise", libc::SYS_madvise, &[v.start, len, advice as u64])?;
            }
        }
        // PR_SET_MM_MAP needs an fd of the executable in the target.
        let f = &mm.fields;
        let auxv_addr = args + 1024;
        let auxv: Vec<u8> = f.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
        if auxv.len() > 2048 {
            return Err(DstError::Inconsistent("auxv too large".into()));
        }
        r.write(auxv_addr, &auxv)?;
        r.write(args + 3072, &cstr(&mm.exe))?;
        let exe_fd = r.call(
            "openat(exe)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                args + 3072,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )?;
        let mut map = Vec::with_capacity(104);
        for w in [
            f.start_code,
            f.end_code,
            f.start_data,
            f.end_data,
            f.start_brk,
            f.brk,
            f.start_stack,
            f.arg_start,
            f.arg_end,
            f.env_start,
            f.env_end,
            auxv_addr,
        ] {
            map.extend_from_slice(&w.to_le_bytes());
        }
        map.extend_from_slice(&u32::try_from(auxv.len()).unwrap_or(0).to_le_bytes());
        map.extend_from_slice(&u32::try_from(exe_fd).unwrap_or(0).to_le_bytes());
        r.write(args, &map)?;
        let res = r.call(
            "prctl(PR_SET_MM_MAP)",
            libc::SYS_prctl,
            &[
                libc::PR_SET_MM as u64,
                libc::PR_SET_MM_MAP as u64,
                args,
                104,
                0,
            ],
        );
        r.call("close", libc::SYS_close, &[exe_fd])?;
        res?;
        Ok(())
    }

    // ---- stage 3: pages ------------------------------------------------------------------

    /// Apply every page frame of the image. A reader thread reads, decompresses and verifies
    /// frames while this (the tracing) thread writes the previous ones into the targets.
    fn receive_pages<R: Read + Send>(
        &mut self,
        reader: &mut ImageReader<R>,
        order: &[usize],
    ) -> Result<(), DstError> {
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
            let mut result = Ok(());
            while let Ok(frame) = rx.recv() {
                let applied = match frame {
                    Frame::Pages { space, addr, data } => {
                        self.apply_pages(order, space, addr, &data)
                    }
                    Frame::Meta(_) => Err(DstError::Inconsistent(
                        "a second vkernel description".into(),
                    )),
                    Frame::Blob { .. } => Ok(()),
                };
                if let Err(e) = applied {
                    result = Err(e);
                    break;
                }
            }
            drop(rx);
            let read = producer.join().unwrap_or_else(|_| {
                Err(DstError::Inconsistent(
                    "the image reader thread panicked".into(),
                ))
            });
            result.and(read)
        })
    }

    fn apply_pages(
        &mut self,
        order: &[usize],
        space: Space,
        addr: u64,
        data: &[u8],
    ) -> Result<(), DstError> {
        self.pages += (data.len() / 4096) as u64;
        match space {
            Space::Mm(id) => {
                let rep = rep_of(self.vk, order, |p| p.mm == id)?;
                let r = self.leader(rep)?;
                r.write(addr, data)
                    .map_err(|e| step("pages", r.tid, e.into()))
            }
            Space::Object(id) => {
                let fd = self.objects.get(&id).ok_or_else(|| {
                    DstError::Inconsistent(format!("pages for unknown object {id}"))
                })?;
                let size = self
                    .vk
                    .objects
                    .iter()
                    .find(|o| o.id == id)
                    .map_or(0, |o| o.size);
                // The last page of an object may be partial.
                let end = (addr + data.len() as u64).min(size);
                let n = usize::try_from(end.saturating_sub(addr)).unwrap_or(0);
                nix::sys::uio::pwrite(fd, &data[..n], i64::try_from(addr).unwrap_or(0))
                    .map_err(|e| DstError::Sys(calls::errno("pwrite(memfd)", 0, e as i32)))?;
                Ok(())
            }
        }
    }

    // ---- stage 4: files and process state -------------------------------------------------

    fn prepare_files(
        &mut self,
        console: Option<&OwnedFd>,
    ) -> Result<crate::files::Prepared, DstError> {
        crate::files::prepare(self.vk, &self.objects, &self.hosts, console)
    }

    fn install_fds(
        &mut self,
        rep: usize,
        table: &model::FdTable,
        agent: &BTreeMap<u32, OwnedFd>,
    ) -> Result<(), DstError> {
        let saved: Vec<i32> = table.fds.iter().map(|f| f.fd).collect();
        let f = (3..).find(|n| !saved.contains(n)).unwrap_or(3);
        let r = self.leader(rep)?;
        let fu = f as u64;
        if f != AGENT_PIDFD {
            r.call(
                "dup3(agent pidfd)",
                libc::SYS_dup3,
                &[AGENT_PIDFD as u64, fu, libc::O_CLOEXEC as u64],
            )?;
        }
        if f > 0 {
            r.call("close_range", libc::SYS_close_range, &[0, fu - 1, 0])?;
        }
        r.call(
            "close_range",
            libc::SYS_close_range,
            &[fu + 1, u64::from(u32::MAX), 0],
        )?;
        for e in &table.fds {
            let afd = agent
                .get(&e.file)
                .ok_or_else(|| DstError::Inconsistent(format!("file {} missing", e.file)))?;
            let tmp = r.call(
                "pidfd_getfd",
                libc::SYS_pidfd_getfd,
                &[fu, afd.as_raw_fd() as u64, 0],
            )?;
            let target = e.fd as u64;
            if tmp == target {
                if !e.cloexec {
                    r.call(
                        "fcntl(F_SETFD)",
                        libc::SYS_fcntl,
                        &[target, libc::F_SETFD as u64, 0],
                    )?;
                }
            } else {
                let fl = if e.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                r.call("dup3", libc::SYS_dup3, &[tmp, target, fl])?;
                r.call("close", libc::SYS_close, &[tmp])?;
            }
        }
        r.call("close", libc::SYS_close, &[fu])?;
        self.posix_locks(table)
    }

    /// POSIX (fcntl) locks belong to a process, not to a file: each owner sets its own again
    /// once its fds are in place (any close of the file by the owner would drop them).
    fn posix_locks(&mut self, table: &model::FdTable) -> Result<(), DstError> {
        let vk = self.vk;
        let args = self.args();
        for (i, p) in vk.processes.iter().enumerate() {
            if p.fd_table != table.id || p.zombie.is_some() {
                continue;
            }
            for (k, e) in table.fds.iter().enumerate() {
                // Once per open file, through its first fd.
                if table.fds[..k].iter().any(|o| o.file == e.file) {
                    continue;
                }
                let Some(f) = vk.files.iter().find(|f| f.id == e.file) else {
                    continue;
                };
                for l in f.locks.iter() {
                    if l.kind != model::LockKind::Posix || l.pid != p.pid {
                        continue;
                    }
                    let (start, len) = l.range();
                    let ty = if l.write {
                        libc::F_WRLCK
                    } else {
                        libc::F_RDLCK
                    } as i16;
                    let mut fl = [0u8; 32]; // struct flock
                    fl[0..2].copy_from_slice(&ty.to_le_bytes());
                    fl[2..4].copy_from_slice(&(libc::SEEK_SET as i16).to_le_bytes());
                    fl[8..16].copy_from_slice(&start.to_le_bytes());
                    fl[16..24].copy_from_slice(&len.to_le_bytes());
                    let r = self.leader(i)?;
                    r.write(args, &fl)?;
                    r.call(
                        "fcntl(F_SETLK)",
                        libc::SYS_fcntl,
                        &[e.fd as u64, libc::F_SETLK as u64, args],
                    )?;
                }
            }
        }
        Ok(())
    }

    fn process_state(&mut self, i: usize) -> Result<(), DstError> {
        let vk = self.vk;
        let p = &vk.processes[i];
        let args = self.args();
        {
            let r = self.leader(i)?;
            for sig in 1..=64i32 {
                if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                    continue;
                }
                let a = p.sigactions.iter().find(|a| a.signo == sig);
                let words = a.map_or([0u64; 4], |a| [a.handler, a.flags, a.restorer, a.mask]);
                r.write(
                    args,
                    &words
                        .iter()
                        .flat_map(|w| w.to_le_bytes())
                        .collect::<Vec<u8>>(),
                )?;
                r.call(
                    "rt_sigaction",
                    libc::SYS_rt_sigaction,
                    &[sig as u64, args, 0, 8],
                )?;
            }
            r.write(args, &cstr(&p.cwd))?;
            r.call("chdir", libc::SYS_chdir, &[args])?;
            if p.root != "/" {
                r.write(args, &cstr(&p.root))?;
                r.call("chroot", libc::SYS_chroot, &[args])?;
            }
            r.call("umask", libc::SYS_umask, &[u64::from(p.umask)])?;
            if p.personality != 0 {
                r.call("personality", libc::SYS_personality, &[p.personality])?;
            }
            for l in &p.rlimits {
                let mut b = l.soft.to_le_bytes().to_vec();
                b.extend_from_slice(&l.hard.to_le_bytes());
                r.write(args, &b)?;
                if let Err(e) = r.call(
                    "prlimit64",
                    libc::SYS_prlimit64,
                    &[0, u64::from(l.resource), args, 0],
                ) {
                    // Raising a hard limit needs CAP_SYS_RESOURCE, which hosts may lack.
                    tracing::warn!(pid = p.pid, resource = l.resource, error = %e, "rlimit not restored");
                }
            }
            if p.pdeathsig != 0 {
                let sig = u64::try_from(p.pdeathsig).unwrap_or(0);
                r.call(
                    "prctl(PR_SET_PDEATHSIG)",
                    libc::SYS_prctl,
                    &[libc::PR_SET_PDEATHSIG as u64, sig, 0, 0, 0],
                )?;
            }
            if p.ctty {
                // The console is the controlling terminal of this session again; any fd of the
                // process that holds the console serves for the ioctls.
                let console_fd = vk
                    .fd_tables
                    .iter()
                    .find(|t| t.id == p.fd_table)
                    .and_then(|t| {
                        t.fds.iter().find(|f| {
                            vk.files.iter().any(|o| {
                                o.id == f.file && matches!(o.kind, model::FileKind::Console)
                            })
                        })
                    })
                    .map(|f| f.fd);
                match console_fd {
                    Some(fd) => {
                        let fd = u64::try_from(fd).unwrap_or(0);
                        r.call(
                            "ioctl(TIOCSCTTY)",
                            libc::SYS_ioctl,
                            &[fd, libc::TIOCSCTTY, 0],
                        )?;
                        if p.tty_pgrp != 0 {
                            r.write(args, &p.tty_pgrp.to_le_bytes())?;
                            r.call(
                                "ioctl(TIOCSPGRP)",
                                libc::SYS_ioctl,
                                &[fd, libc::TIOCSPGRP, args],
                            )?;
                        }
                    }
                    None => tracing::warn!(
                        pid = p.pid,
                        "the console was its controlling terminal, but it holds no fd of it"
                    ),
                }
            }
            for t in &p.itimers {
                let value = if t.value_us == 0 { 1 } else { t.value_us };
                let w = [
                    t.interval_us / 1_000_000,
                    t.interval_us % 1_000_000,
                    value / 1_000_000,
                    value % 1_000_000,
                ];
                r.write(
                    args,
                    &w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                )?;
                r.call(
                    "setitimer",
                    libc::SYS_setitimer,
                    &[u64::try_from(t.which).unwrap_or(0), args, 0],
                )?;
            }
        }
        // Threads, with their TIDs, created by the leader.
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        for t in p.threads.iter().skip(1) {
            let host = self
                .clone_in(i, flags, 0, t.tid)
                .map_err(|e| step("thread", t.tid, e))?;
            let scratch = self.scratch;
            let mut rt = self.adopt(host, scratch, true)?;
            rt.scratch = args;
            rt.stack = scratch + SCRATCH_LEN - 256;
            self.procs
                .get_mut(&i)
                .ok_or_else(|| DstError::Inconsistent("lost process".into()))?
                .threads
                .push(rt);
        }
        let rp = self
            .procs
            .get_mut(&i)
            .ok_or_else(|| DstError::Inconsistent("lost process".into()))?;
        for (t, r) in p.threads.iter().zip(rp.threads.iter_mut()) {
            thread_state(r, t, args)?;
        }
        let r = &mut rp.threads[0];
        if !p.posix_timers.is_empty() {
            r.call(
                "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
                libc::SYS_prctl,
                &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0],
            )?;
            for t in &p.posix_timers {
                let mut ev = vec![0u8; 64];
                ev[0..8].copy_from_slice(&t.sigev_value.to_le_bytes());
                ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
                ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
                ev[16..20].copy_from_slice(&t.notify_tid.to_le_bytes());
                ev.extend_from_slice(&t.id.to_le_bytes());
                r.write(args, &ev)?;
                r.call(
                    "timer_create",
                    libc::SYS_timer_create,
                    &[u64::try_from(t.clockid).unwrap_or(0), args, args + 64],
                )?;
                let value = if t.value_ns == 0 && t.interval_ns != 0 {
                    1
                } else {
                    t.value_ns
                };
                let w = [
                    t.interval_ns / 1_000_000_000,
                    t.interval_ns % 1_000_000_000,
                    value / 1_000_000_000,
                    value % 1_000_000_000,
                ];
                r.write(
                    args + 128,
                    &w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                )?;
                r.call(
                    "timer_settime",
                    libc::SYS_timer_settime,
                    &[u64::try_from(t.id).unwrap_or(0), 0, args + 128, 0],
                )?;
            }
            r.call(
                "prctl(PR_TIMER_CREATE_RESTORE_IDS)",
                libc::SYS_prctl,
                &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0],
            )?;
        }
        // Pending signals last: every signal is blocked until resume, so none is delivered
        // into our injections.
        let tgid = u64::try_from(p.pid).unwrap_or(0);
        for si in &p.pending_shared {
            queue_signal(r, args, si, None, tgid)?;
        }
        for (t, r) in p.threads.iter().zip(rp.threads.iter_mut()) {
            for si in &t.pending {
                queue_signal(r, args, si, Some(u64::try_from(t.tid).unwrap_or(0)), tgid)?;
            }
        }
        Ok(())
    }

    // ---- stage 5: resume -------------------------------------------------------------------

    fn resume(&mut self, order: &[usize]) -> Result<(), DstError> {
        let vk = self.vk;
        let scratch = self.scratch;
        let mut unmapped = Vec::new();
        for &i in order {
            let p = &vk.processes[i];
            if p.zombie.is_some() {
                continue;
            }
            let rp = self
                .procs
                .get_mut(&i)
                .ok_or_else(|| DstError::Inconsistent("lost process".into()))?;
            if !unmapped.contains(&p.mm) {
                // The last injected call removes the scratch area; the thread stops at the
                // syscall's exit and never runs another instruction there.
                rp.threads[0].call("munmap(scratch)", libc::SYS_munmap, &[scratch, SCRATCH_LEN])?;
                unmapped.push(p.mm);
            }
            for (t, r) in p.threads.iter().zip(rp.threads.iter()) {
                let mut regs = ptrace::regs_from_bytes(&t.regs).ok_or_else(|| {
                    DstError::Inconsistent(format!("thread {} has a bad register blob", t.tid))
                })?;
                ptrace::fixup_restart(&mut regs);
                ptrace::set_xstate(r.tid, &t.xstate)
                    .map_err(|e| step("xstate", t.tid, e.into()))?;
                ptrace::setregs(r.tid, &regs)?;
                ptrace::set_sigmask(r.tid, t.sigmask)?;
            }
        }
        // The barrier: everything is in place, now every thread runs.
        for rp in self.procs.values() {
            for r in &rp.threads {
                ptrace::detach(r.tid, 0)?;
            }
        }
        Ok(())
    }
}

/// Create SysV segment `o` with its saved key and id. Runs on a thread that has joined the
/// sandbox's IPC namespace. Returns the segment's shmem file, opened for writing its pages.
fn create_segment(o: &MemObject, seg: &SysvShm) -> Result<OwnedFd, DstError> {
    let what = || {
        format!(
            "SysV segment {} (key {:#010x}, {} bytes)",
            seg.shmid, seg.key as u32, o.size
        )
    };
    calls::set_shm_next_id(seg.shmid)?;
    // A removed segment's key is private already (the kernel made it so); recreating it under
    // its old key could clash with a segment created with that key since.
    let key = if seg.removed {
        libc::IPC_PRIVATE
    } else {
        seg.key
    };
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | i32::try_from(seg.mode & 0o777).unwrap_or(0);
    // The creator's ids (shm_perm.cuid/cgid) are those of the calling thread: become them for
    // the shmget only (this thread only), then root again for what follows.
    let as_creator = seg.cuid != 0 || seg.cgid != 0;
    if as_creator {
        calls::set_thread_effective_ids(seg.cuid, seg.cgid)?;
    }
    let got = calls::shmget(key, o.size, flags);
    if as_creator {
        calls::set_thread_effective_ids(0, 0)?;
    }
    let id = got.map_err(|e| {
        DstError::Incompatible(format!(
            "{}: shmget failed: {}",
            what(),
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)
        ))
    })?;
    if id != seg.shmid {
        let _ = calls::shm_rmid(id);
        return Err(DstError::Incompatible(format!(
            "{}: shmget gave id {id}, the vkernel knows it as {}",
            what(),
            seg.shmid
        )));
    }
    calls::shm_set(id, seg.uid, seg.gid, seg.mode)?;
    if seg.locked {
        if let Err(e) = calls::shm_lock(id) {
            tracing::warn!(shmid = id, error = %e, "SysV segment not locked in memory again");
        }
    }
    let at = calls::ShmAttachment::new(id, o.size, false)?;
    let path = at.map_files_path();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DstError::Sys(vkm_sys::SysError::Path { path, source: e }))?;
    Ok(OwnedFd::from(file))
}

/// Attach SysV segment `seg` (of `size` bytes) for VMA `v` of `mm`, which starts `offset` bytes
/// into the segment: injected `shmat` at the VMA's address, read-only if it was attached so.
/// A VMA that is only a piece of an attachment (the rest was mprotected differently, which
/// splits it, or unmapped) is cut out of a whole attachment made at a free address.
fn attach_sysv(
    r: &mut Remote,
    mm: &model::Mm,
    v: &model::Vma,
    size: u64,
    seg: &SysvShm,
    offset: u64,
    scratch: u64,
) -> Result<(), DstError> {
    let page = 4096;
    let len = v.end - v.start;
    let full = size.div_ceil(page) * page;
    let base = v.start.wrapping_sub(offset);
    let rdonly = seg
        .attaches
        .iter()
        .find(|a| a.mm == mm.id && a.addr == base)
        .map_or(v.prot & prot::WRITE == 0, |a| a.rdonly);
    let exec = v.prot & prot::EXEC != 0;
    let mut flags = 0;
    if rdonly {
        flags |= libc::SHM_RDONLY;
    }
    if exec {
        flags |= calls::SHM_EXEC;
    }
    let flags = u64::try_from(flags).unwrap_or(0);
    let shmid = u64::try_from(seg.shmid).unwrap_or(0);
    if offset == 0 && len == full {
        let got = r.call("shmat", libc::SYS_shmat, &[shmid, v.start, flags])?;
        if got != v.start {
            return Err(DstError::Inconsistent(format!(
                "SysV segment {} attached at {got:#x}, not {:#x}",
                seg.shmid, v.start
            )));
        }
    } else {
        if offset.checked_add(len).is_none_or(|e| e > full) {
            return Err(DstError::Inconsistent(format!(
                "a mapping of SysV segment {} reaches beyond its {size} bytes",
                seg.shmid
            )));
        }
        let tmp = free_range(mm, scratch, full).ok_or_else(|| {
            DstError::Inconsistent(format!(
                "no free address to attach SysV segment {}",
                seg.shmid
            ))
        })?;
        r.call("shmat(whole)", libc::SYS_shmat, &[shmid, tmp, flags])?;
        let moved = r.call(
            "mremap(SysV piece)",
            libc::SYS_mremap,
            &[
                tmp + offset,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                v.start,
            ],
        );
        r.call("munmap(rest of attachment)", libc::SYS_munmap, &[tmp, full])?;
        moved?;
    }
    let mut given = prot::READ;
    if !rdonly {
        given |= prot::WRITE;
    }
    if exec {
        given |= prot::EXEC;
    }
    let want = v.prot & (prot::READ | prot::WRITE | prot::EXEC);
    if want != given {
        r.call(
            "mprotect(SysV)",
            libc::SYS_mprotect,
            &[v.start, len, u64::from(want)],
        )?;
    }
    Ok(())
}

/// An address range of `len` bytes that no saved VMA of `mm` and not the scratch area uses,
/// hence free while the layout is rebuilt.
fn free_range(mm: &model::Mm, scratch: u64, len: u64) -> Option<u64> {
    let mut cand: u64 = 0x2_0000_0000;
    while cand + len < TASK_SIZE {
        let end = cand + len;
        let clash = mm.vmas.iter().any(|v| v.start < end && cand < v.end)
            || (scratch < end && cand < scratch + SCRATCH_LEN);
        if !clash {
            return Some(cand);
        }
        cand += 0x1000_0000;
    }
    None
}

fn thread_state(r: &mut Remote, t: &model::Thread, args: u64) -> Result<(), DstError> {
    if let Some(rs) = t.rseq {
        r.call(
            "rseq",
            libc::SYS_rseq,
            &[rs.addr, u64::from(rs.len), 0, u64::from(rs.sig)],
        )?;
    }
    if t.robust_list != 0 {
        r.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list, t.robust_list_len],
        )?;
    }
    r.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    )?;
    let ss = t.sigaltstack;
    let disabled = ss.flags & libc::SS_DISABLE != 0;
    let w: [u64; 3] = if disabled {
        [0, libc::SS_DISABLE as u64, 0]
    } else {
        // SS_ONSTACK is a report, not a setting.
        [
            ss.sp,
            u64::try_from(ss.flags & !libc::SS_ONSTACK).unwrap_or(0),
            ss.size,
        ]
    };
    r.write(
        args,
        &w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )?;
    r.call("sigaltstack", libc::SYS_sigaltstack, &[args, 0])?;
    let mut name = t.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    r.write(args, &name)?;
    r.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, args, 0, 0, 0],
    )?;
    Ok(())
}

fn queue_signal(
    r: &mut Remote,
    args: u64,
    si: &[u8],
    tid: Option<u64>,
    tgid: u64,
) -> Result<(), DstError> {
    if si.len() != ptrace::SIGINFO_SIZE {
        return Err(DstError::Inconsistent(
            "a pending signal has a bad siginfo".into(),
        ));
    }
    let sig = u64::from(u32::from_le_bytes([si[0], si[1], si[2], si[3]]));
    if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 || sig == 0 || sig > 64 {
        return Ok(());
    }
    r.write(args, si)?;
    match tid {
        Some(tid) => r.call(
            "rt_tgsigqueueinfo",
            libc::SYS_rt_tgsigqueueinfo,
            &[tgid, tid, sig, args],
        )?,
        None => r.call(
            "rt_sigqueueinfo",
            libc::SYS_rt_sigqueueinfo,
            &[tgid, sig, args],
        )?,
    };
    Ok(())
}

fn unregister_rseq(r: &mut Remote) -> Result<(), DstError> {
    let c = ptrace::rseq_config(r.tid)?;
    if c.rseq_abi_pointer != 0 {
        r.call(
            "rseq(unregister)",
            libc::SYS_rseq,
            &[
                c.rseq_abi_pointer,
                u64::from(c.rseq_abi_size),
                RSEQ_FLAG_UNREGISTER,
                u64::from(c.signature),
            ],
        )?;
    }
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

fn open_mem(pid: i32) -> Result<File, DstError> {
    let path = proc::pid_path(pid, "mem");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DstError::Sys(vkm_sys::SysError::Path { path, source: e }))
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
    for v in vk.mms.iter().flat_map(|m| m.vmas.iter()) {
        if let Backing::File {
            path,
            size,
            mtime_ns,
            ..
        } = &v.backing
        {
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
