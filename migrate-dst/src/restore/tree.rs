//! Stage 1 of a restore: the process tree (the stages are listed in `restore`).

use super::*;

impl Restorer {
    pub(super) fn build_tree(
        &mut self,
        order: &[usize],
        sandbox: &mut Sandbox,
    ) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let vk = &*vk_arc;
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
    pub(super) fn make_zombies(&mut self, order: &[usize]) -> Result<(), DstError> {
        let vk_arc = Arc::clone(&self.vk);
        let vk = &*vk_arc;
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
    pub(super) fn adopt(&self, host: i32, gadget: u64, attached: bool) -> Result<Remote, DstError> {
        if !attached {
            ptrace::seize(
                host,
                // No EXITKILL: should we die, init (which dies with us until the commit
                // point, see `Sandbox::commit`) takes every skeleton with it; after that
                // point, a skeleton whose restorer dies while letting it go must run on like
                // the rest of the vkernel, not be killed alone.
                ptrace::PTRACE_O_TRACESYSGOOD
                    | ptrace::PTRACE_O_TRACECLONE
                    | ptrace::PTRACE_O_TRACEFORK
                    | ptrace::PTRACE_O_TRACEVFORK,
            )?;
            ptrace::interrupt(host)?;
            wait_stopped(host)?;
        }
        ptrace::set_sigmask(host, u64::MAX)?;
        let mut r = Remote::new(host, gadget, 0, 0, proc::open_mem(host)?)?;
        // A task cloned from a skeleton shares or copied its scratch area and its gadget.
        r.traps = gadget == self.scratch;
        r.stack = r.saved.rsp;
        Ok(r)
    }

    pub(super) fn map_scratch(&self, r: &mut Remote) -> Result<(), DstError> {
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
        r.use_trap_gadget(self.scratch)?;
        r.scratch = self.scratch + ARGS_OFF;
        r.stack = self.scratch + SCRATCH_LEN - 256;
        Ok(())
    }

    /// Inject `clone3` into process #`parent` to create a child at namespace pid `pid`; returns
    /// the child's host pid (it is auto-attached and stopped).
    pub(super) fn clone_in(
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
}
