//! Stage 4 of a restore: files and process and thread state.

use super::*;

impl Restorer {
    pub(super) fn prepare_files(
        &mut self,
        console: Option<&OwnedFd>,
        net: &crate::Network,
    ) -> Result<crate::files::Prepared, DstError> {
        crate::files::prepare(&self.vk, &self.objects, &self.hosts, console, net)
    }

    pub(super) fn install_fds(
        &mut self,
        rep: usize,
        table: &model::FdTable,
        agent: &BTreeMap<u32, OwnedFd>,
    ) -> Result<(), DstError> {
        let saved: Vec<i32> = table.fds.iter().map(|f| f.fd).collect();
        let f = (3..).find(|n| !saved.contains(n)).unwrap_or(3);
        let fu = f as u64;
        // One batch of calls (one ptrace stop instead of three per fd). Each fd is pulled
        // with pidfd_getfd, which takes the lowest free number: the table is emptied first
        // but for the pidfd at `f`, so which number each pull gets is known in advance, and
        // checked after.
        let mut calls = Vec::new();
        if f != AGENT_PIDFD {
            calls.push(Call::new(
                "dup3(agent pidfd)",
                libc::SYS_dup3,
                &[AGENT_PIDFD as u64, fu, libc::O_CLOEXEC as u64],
            ));
        }
        if f > 0 {
            calls.push(Call::new(
                "close_range",
                libc::SYS_close_range,
                &[0, fu - 1, 0],
            ));
        }
        calls.push(Call::new(
            "close_range",
            libc::SYS_close_range,
            &[fu + 1, u64::from(u32::MAX), 0],
        ));
        // Numbers only get taken: the lowest free one only goes up.
        let mut open = std::collections::BTreeSet::from([f]);
        let mut lowest_free = 0;
        let mut pulls = Vec::new();
        for e in &table.fds {
            let afd = agent
                .get(&e.file)
                .ok_or_else(|| DstError::Inconsistent(format!("file {} missing", e.file)))?;
            while open.contains(&lowest_free) {
                lowest_free += 1;
            }
            let (tmp, target) = (lowest_free as u64, e.fd as u64);
            pulls.push((calls.len(), tmp));
            calls.push(Call::new(
                "pidfd_getfd",
                libc::SYS_pidfd_getfd,
                &[fu, afd.as_raw_fd() as u64, 0],
            ));
            if tmp == target {
                if !e.cloexec {
                    calls.push(Call::new(
                        "fcntl(F_SETFD)",
                        libc::SYS_fcntl,
                        &[target, libc::F_SETFD as u64, 0],
                    ));
                }
            } else {
                let fl = if e.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
                calls.push(Call::new("dup3", libc::SYS_dup3, &[tmp, target, fl]));
                calls.push(Call::new("close", libc::SYS_close, &[tmp]));
            }
            open.insert(e.fd);
        }
        calls.push(Call::new("close", libc::SYS_close, &[fu]));
        let area = self.batch_area();
        let r = self.leader(rep)?;
        let got = r.batch(&area, &calls)?;
        for (i, want) in pulls {
            if got.get(i).copied() != Some(want) {
                return Err(DstError::Inconsistent(format!(
                    "an fd pulled into process {} became {:?}, not {want}",
                    r.tid,
                    got.get(i)
                )));
            }
        }
        self.posix_locks(table)
    }

    /// POSIX (fcntl) locks belong to a process, not to a file: each owner sets its own again
    /// once its fds are in place (any close of the file by the owner would drop them).
    pub(super) fn posix_locks(&mut self, table: &model::FdTable) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let vk = &*vk_arc;
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

    /// Before any page arrives: what a running vkernel rarely changes, from the description
    /// the skeleton is built from. Threads with their TIDs, and each thread's rseq, robust
    /// list, tid address, altstack and name; signal handlers, cwd, umask, personality, limits
    /// and parent-death signal. A live migration does this while the source still runs, and
    /// [`Restorer::process_state`] applies only what changed meanwhile.
    pub(super) fn process_early(&mut self, i: usize) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let p = &vk_arc.processes[i];
        let args = self.args();
        let r = self.leader(i)?;
        // A skeleton has the limits its creator had: only the others are set.
        let now = proc::read(proc::pid_path(r.tid, "limits"))?;
        let now = vkm_common::procfs::parse_limits(&now).map_err(|e| {
            DstError::Inconsistent(format!("cannot parse the limits of process {}: {e}", p.pid))
        })?;
        let limits: Vec<model::Rlimit> = now.into_iter().map(model::Rlimit::from).collect();
        process_statics(r, p, None, &limits, args)?;
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
            self.rproc(i)?.threads.push(rt);
        }
        let rp = self.rproc(i)?;
        for (t, r) in p.threads.iter().zip(rp.threads.iter_mut()) {
            thread_state(r, t, None, args)?;
        }
        Ok(())
    }

    /// Stage 4 of process `i`: what [`Restorer::process_early`] set from `early`, where the
    /// final description differs; then root, controlling terminal, timers, pending signals.
    pub(super) fn process_state(
        &mut self,
        i: usize,
        early: &model::Process,
    ) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let vk = &*vk_arc;
        let p = &vk.processes[i];
        let args = self.args();
        {
            let r = self.leader(i)?;
            process_statics(r, p, Some(early), &early.rlimits, args)?;
            if p.root != "/" {
                r.write(args, &cstr(&p.root))?;
                r.call("chroot", libc::SYS_chroot, &[args])?;
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
        let rp = self.rproc(i)?;
        if rp.threads.len() != p.threads.len() || early.threads.len() != p.threads.len() {
            return Err(DstError::Inconsistent(format!(
                "process {} has {} threads, its skeleton {}",
                p.pid,
                p.threads.len(),
                rp.threads.len()
            )));
        }
        for ((t, e), r) in p
            .threads
            .iter()
            .zip(&early.threads)
            .zip(rp.threads.iter_mut())
        {
            thread_state(r, t, Some(e), args)?;
        }
        let r = &mut rp.threads[0];
        if !p.posix_timers.is_empty() {
            // A vkernel whose clock is a one-shot timer (UML's) stops if it comes back
            // disarmed without its signal pending: say what came, for the log.
            let signo = |si: &Vec<u8>| si.get(0..4).map_or(0, |b| b[0]);
            tracing::info!(
                pid = p.pid,
                timers = ?p.posix_timers.iter().map(|t| (t.id, t.value_ns, t.interval_ns)).collect::<Vec<_>>(),
                pending_shared = ?p.pending_shared.iter().map(signo).collect::<Vec<_>>(),
                pending = ?p.threads.iter().map(|t| t.pending.iter().map(signo).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "timers restored"
            );
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
}
/// Signal handlers, cwd, umask, personality, limits and parent-death signal of `p`, through
/// its leader `r`: all of them (`before` None: a fresh skeleton, whose handlers are at their
/// defaults and whose limits are `limits`), or those that differ from `before`, the
/// description they were set from.
fn process_statics(
    r: &mut Remote,
    p: &model::Process,
    before: Option<&model::Process>,
    limits: &[model::Rlimit],
    args: u64,
) -> Result<(), DstError> {
    for sig in 1..=64i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let want = p.sigactions.iter().find(|a| a.signo == sig);
        let had = before.and_then(|b| b.sigactions.iter().find(|a| a.signo == sig));
        if want == had {
            continue;
        }
        // Gone since: back to the default.
        let words = want.map_or([0; 4], |a| [a.handler, a.flags, a.restorer, a.mask]);
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
    if before.is_none_or(|b| b.cwd != p.cwd) {
        r.write(args, &cstr(&p.cwd))?;
        r.call("chdir", libc::SYS_chdir, &[args])?;
    }
    if before.is_none_or(|b| b.umask != p.umask) {
        r.call("umask", libc::SYS_umask, &[u64::from(p.umask)])?;
    }
    if before.map_or(p.personality != 0, |b| b.personality != p.personality) {
        r.call("personality", libc::SYS_personality, &[p.personality])?;
    }
    for l in &p.rlimits {
        if limits.contains(l) {
            continue;
        }
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
    if before.map_or(p.pdeathsig != 0, |b| b.pdeathsig != p.pdeathsig) {
        let sig = u64::try_from(p.pdeathsig).unwrap_or(0);
        r.call(
            "prctl(PR_SET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_SET_PDEATHSIG as u64, sig, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// A thread's rseq, robust list, tid address, altstack and name: all of them (`before` None:
/// a thread just made, with none of them), or those that differ from `before`, the
/// description they were set from.
pub(super) fn thread_state(
    r: &mut Remote,
    t: &model::Thread,
    before: Option<&model::Thread>,
    args: u64,
) -> Result<(), DstError> {
    let had_rseq = before.and_then(|b| b.rseq);
    if t.rseq != had_rseq {
        if let Some(old) = had_rseq {
            rseq_unregister(r, old.addr, old.len, old.sig)?;
        }
        if let Some(rs) = t.rseq {
            r.call(
                "rseq",
                libc::SYS_rseq,
                &[rs.addr, u64::from(rs.len), 0, u64::from(rs.sig)],
            )?;
        }
    }
    let robust = (t.robust_list, t.robust_list_len);
    if before.map_or(t.robust_list != 0, |b| {
        (b.robust_list, b.robust_list_len) != robust
    }) {
        // The kernel takes only its own head size, also to clear the list.
        let len = if t.robust_list_len == 0 {
            ROBUST_LIST_HEAD_LEN
        } else {
            t.robust_list_len
        };
        r.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list, len],
        )?;
    }
    if before.is_none_or(|b| b.clear_child_tid != t.clear_child_tid) {
        r.call(
            "set_tid_address",
            libc::SYS_set_tid_address,
            &[t.clear_child_tid],
        )?;
    }
    let ss = t.sigaltstack;
    if before.is_none_or(|b| b.sigaltstack != ss) {
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
    }
    if before.is_none_or(|b| b.comm != t.comm) {
        let mut name = t.comm.as_bytes().to_vec();
        name.truncate(15);
        name.push(0);
        r.write(args, &name)?;
        r.call(
            "prctl(PR_SET_NAME)",
            libc::SYS_prctl,
            &[libc::PR_SET_NAME as u64, args, 0, 0, 0],
        )?;
    }
    Ok(())
}

/// `sizeof(struct robust_list_head)` on x86_64.
const ROBUST_LIST_HEAD_LEN: u64 = 24;

pub(super) fn queue_signal(
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
