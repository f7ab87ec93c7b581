//! Per-process and per-thread state: registers, signals, timers, limits; what no /proc file
//! shows is read by injecting the syscall into the stopped thread.

use std::collections::BTreeMap;

use vkm_common::model::{
    ITimer, PosixTimer, Process, Rlimit, Rseq, SigAction, SigAltStack, Thread,
};
use vkm_common::procfs;
use vkm_sys::inject::{self, Remote};
use vkm_sys::{proc, ptrace};

use crate::freeze::FrozenProcess;
use crate::SrcError;

const SCRATCH_LEN: u64 = 64 * 1024;
/// Where injected calls' arguments start in the scratch area (after its gadget).
const ARGS_OFF: u64 = 64;

/// Signals that arrived while we injected and were held back: (host tid, signal number). A
/// vkernel that keeps running gets them again.
pub type Held = Vec<(i32, i32)>;

/// Capture one process. Returns it, its exact program break (`brk(0)`) and the held signals.
pub fn capture_process(
    p: &FrozenProcess,
    host_to_ns: &BTreeMap<i32, i32>,
    own_caps: &vkm_common::model::Caps,
    mm: u32,
    fd_table: u32,
    vdso: Option<(u64, Vec<u8>)>,
) -> Result<(Process, u64, Held), SrcError> {
    let pid = p.host_pid;
    let st = super::read_stat(pid)?;
    let status = super::read_status(pid)?;
    if status.seccomp != 0 {
        return Err(SrcError::Unsupported {
            pid: p.ns_pid,
            what: "a seccomp filter is installed".into(),
        });
    }
    // Restored processes are created by root; a process with other ids would come back with
    // more rights than it had, so it is refused instead. (Capabilities are restored.)
    if status.uid.iter().chain(&status.gid).any(|&id| id != 0) {
        return Err(SrcError::Unsupported {
            pid: p.ns_pid,
            what: format!(
                "it runs as uid {} gid {}; restoring other user or group ids than root's is not supported yet",
                status.uid[1], status.gid[1]
            ),
        });
    }
    let ns = |host: i32| host_to_ns.get(&host).copied();
    let ppid = ns(st.ppid).ok_or(SrcError::Unsupported {
        pid: p.ns_pid,
        what: format!("its parent {} is outside the vkernel", st.ppid),
    })?;
    let limits_text = proc::read(proc::pid_path(pid, "limits"))?;
    let rlimits = procfs::parse_limits(&limits_text)
        .map_err(|source| SrcError::Parse {
            what: "limits",
            pid,
            source,
        })?
        .into_iter()
        .map(Rlimit::from)
        .collect();
    let timers_text = proc::read(proc::pid_path(pid, "timers")).unwrap_or_default();
    let timers = procfs::parse_timers(&timers_text).map_err(|source| SrcError::Parse {
        what: "timers",
        pid,
        source,
    })?;

    let Some((vdso_base, vdso_code)) = vdso else {
        return Err(SrcError::Unsupported {
            pid: p.ns_pid,
            what: "it has no [vdso] to borrow a syscall instruction from".into(),
        });
    };
    let gadget = inject::find_syscall_insn(&vdso_code, vdso_base).ok_or(SrcError::Unsupported {
        pid: p.ns_pid,
        what: "its [vdso] has no syscall instruction".into(),
    })?;

    // Registers etc. are read before any injection changes them.
    let mut threads = Vec::new();
    for &tid in &p.threads {
        threads.push(capture_thread_outside(tid, own_caps, p)?);
    }

    let mut leader = Remote::new(pid, gadget, 0, 0, proc::open_mem(pid)?)?;
    leader.stack = leader.saved.rsp;
    // Block every signal while we inject: a vkernel whose timers fire faster than an injection
    // takes would otherwise keep us busy with signal-delivery stops forever. What arrives
    // meanwhile stays pending and is delivered when the vkernel runs again.
    for &tid in &p.threads {
        ptrace::set_sigmask(tid, u64::MAX)?;
    }
    let mut thread_held: Held = Vec::new();
    let result = inject_reads(
        &mut leader,
        p,
        &mut threads,
        &timers,
        host_to_ns,
        &mut thread_held,
        status.sig_cgt | status.sig_ign,
    );
    // Registers and masks go back whatever happened; the scratch page is gone already on success.
    let restored = leader.restore_regs();
    for (t, &tid) in threads.iter().zip(&p.threads) {
        ptrace::set_sigmask(tid, t.sigmask)?;
    }
    let inj = result?;
    restored?;
    let mut held: Held = Vec::new();
    for si in leader.swallowed.drain(..) {
        held.push((pid, signo_of(&si)));
        threads[0].pending.push(si);
    }
    held.append(&mut thread_held);

    let proc = Process {
        pid: p.ns_pid,
        ppid,
        pgid: ns(st.pgrp).unwrap_or(0),
        sid: ns(st.session).unwrap_or(0),
        comm: st.comm.clone(),
        mm,
        fd_table,
        exit_signal: st.exit_signal,
        cwd: proc::readlink(proc::pid_path(pid, "cwd"))?,
        root: proc::readlink(proc::pid_path(pid, "root"))?,
        umask: status.umask.unwrap_or(0o022),
        personality: inj.personality,
        rlimits,
        sigactions: inj.sigactions,
        itimers: inj.itimers,
        posix_timers: inj.posix_timers,
        pending_shared: ptrace::peek_siginfo(pid, true)?,
        threads,
        zombie: None,
        pdeathsig: inj.pdeathsig,
        ctty: st.tty_nr != 0 && st.session == pid,
        tty_pgrp: ns(st.tpgid).unwrap_or(0),
        tracer: p.tracer.and_then(ns),
    };
    Ok((proc, inj.brk, held))
}

/// Process state only readable from inside the process.
struct Injected {
    sigactions: Vec<SigAction>,
    itimers: Vec<ITimer>,
    posix_timers: Vec<PosixTimer>,
    brk: u64,
    personality: u64,
    pdeathsig: i32,
}

fn inject_reads(
    r: &mut Remote,
    p: &FrozenProcess,
    threads: &mut [Thread],
    timers: &[procfs::PosixTimerInfo],
    host_to_ns: &BTreeMap<i32, i32>,
    held: &mut Held,
    handled: u64,
) -> Result<Injected, SrcError> {
    // A private scratch page for out-parameters, so that nothing of the target's memory is
    // touched; it is unmapped again before we return.
    // It holds the gadget the calls below go through (one ptrace stop each instead of two),
    // then their arguments.
    let code = r.map_trap_gadget(SCRATCH_LEN)?;
    let scratch = code + ARGS_OFF;
    r.scratch = scratch;
    let out = (|| -> Result<Injected, SrcError> {
        let mut sigactions = Vec::new();
        for sig in 1..=64i32 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // Only caught or ignored signals can have a handler; SIGCHLD's flags matter even
            // at SIG_DFL (SA_NOCLDSTOP, SA_NOCLDWAIT). Each read is an injected syscall, and
            // this runs while the vkernel is frozen.
            if handled & (1u64 << (sig - 1)) == 0 && sig != libc::SIGCHLD {
                continue;
            }
            r.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[sig as u64, 0, scratch, 8],
            )?;
            let b = r.read(scratch, 32)?;
            let f = words(&b);
            if f[0] != 0 || f[1] != 0 {
                sigactions.push(SigAction {
                    signo: sig,
                    handler: f[0],
                    flags: f[1],
                    restorer: f[2],
                    mask: f[3],
                });
            }
        }
        let mut itimers = Vec::new();
        for which in 0..3 {
            r.call("getitimer", libc::SYS_getitimer, &[which, scratch])?;
            let f = words(&r.read(scratch, 32)?);
            let us = |s: u64, u: u64| (s as i64) * 1_000_000 + u as i64;
            let t = ITimer {
                which: which as i32,
                interval_us: us(f[0], f[1]),
                value_us: us(f[2], f[3]),
            };
            if t.interval_us != 0 || t.value_us != 0 {
                itimers.push(t);
            }
        }
        let mut posix = Vec::new();
        for t in timers {
            r.call(
                "timer_gettime",
                libc::SYS_timer_gettime,
                &[t.id as u64, scratch],
            )?;
            let f = words(&r.read(scratch, 32)?);
            let ns = |s: u64, n: u64| (s as i64) * 1_000_000_000 + n as i64;
            let overrun = r.raw(libc::SYS_timer_getoverrun, &[t.id as u64])?;
            posix.push(PosixTimer {
                id: t.id,
                clockid: t.clockid,
                notify: t.sigev_notify(),
                signo: t.signal,
                sigev_value: t.sigev_value,
                notify_tid: if t.thread {
                    host_to_ns_tid(host_to_ns, t.target)
                } else {
                    0
                },
                interval_ns: ns(f[0], f[1]),
                value_ns: ns(f[2], f[3]),
                overrun: i32::try_from(overrun.max(0)).unwrap_or(0),
            });
        }
        let brk = r.call("brk", libc::SYS_brk, &[0])?;
        let personality = r.call("personality", libc::SYS_personality, &[0xffff_ffff])?;
        r.call(
            "prctl(PR_GET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_GET_PDEATHSIG as u64, scratch],
        )?;
        let pdeathsig = i32::try_from(words(&r.read(scratch, 8)?)[0] & 0xffff_ffff).unwrap_or(0);
        // Per-thread values only readable from inside: each thread runs its own injection.
        for (i, &tid) in p.threads.iter().enumerate() {
            let mem = r.mem.try_clone().map_err(|e| vkm_sys::SysError::Syscall {
                op: "dup(/proc/PID/mem)",
                pid: tid,
                source: e,
            })?;
            let mut t = if tid == r.tid {
                None
            } else {
                let mut t = Remote::new(tid, r.gadget, scratch, 0, mem)?;
                t.stack = t.saved.rsp;
                t.traps = r.traps;
                Some(t)
            };
            let rem: &mut Remote = match t.as_mut() {
                Some(t) => t,
                None => &mut *r,
            };
            let res = per_thread(rem, scratch, &mut threads[i]);
            if let Some(t) = t.as_mut() {
                t.restore_regs()?;
                for si in t.swallowed.drain(..) {
                    held.push((tid, signo_of(&si)));
                    threads[i].pending.push(si);
                }
            }
            res?;
        }
        Ok(Injected {
            sigactions,
            itimers,
            posix_timers: posix,
            brk,
            personality,
            pdeathsig,
        })
    })();
    let unmapped = r.unmap(code, SCRATCH_LEN);
    let out = out?;
    unmapped?;
    Ok(out)
}

fn per_thread(r: &mut Remote, scratch: u64, t: &mut Thread) -> Result<(), SrcError> {
    r.call(
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[libc::PR_GET_TID_ADDRESS as u64, scratch],
    )?;
    t.clear_child_tid = words(&r.read(scratch, 8)?)[0];
    r.call("sigaltstack", libc::SYS_sigaltstack, &[0, scratch])?;
    let f = words(&r.read(scratch, 24)?);
    t.sigaltstack = SigAltStack {
        sp: f[0],
        flags: (f[1] & 0xffff_ffff) as i32,
        size: f[2],
    };
    Ok(())
}

fn capture_thread_outside(
    tid: i32,
    own_caps: &vkm_common::model::Caps,
    p: &FrozenProcess,
) -> Result<Thread, SrcError> {
    let regs = ptrace::getregs(tid)?;
    let xstate = ptrace::get_xstate(tid)?;
    let sigmask = ptrace::get_sigmask(tid)?;
    let rseq = ptrace::rseq_config(tid)?;
    let (robust_list, robust_list_len) = vkm_sys::calls::get_robust_list(tid)?;
    let comm = proc::read(format!("/proc/{}/task/{tid}/comm", p.host_pid))?
        .trim_end()
        .to_string();
    // One read of the thread's status for its namespace tid and its capabilities.
    let status = proc::read(format!("/proc/{}/task/{tid}/status", p.host_pid))?;
    let ns_tid = proc::ns_pid_in(tid, &status)?;
    let mut pending = ptrace::peek_siginfo(tid, false)?;
    // (A fault comes again where the thread resumes, at the faulting instruction.)
    pending.extend(
        p.stop_signals
            .get(&tid)
            .into_iter()
            .flatten()
            .filter(|(sig, si)| !ptrace::comes_again(*sig, si))
            .map(|(_, si)| si.clone()),
    );
    let caps = caps_of(&status);
    Ok(Thread {
        caps: (caps != *own_caps).then_some(caps),
        tid: ns_tid,
        comm,
        regs: ptrace::regs_to_bytes(&regs),
        xstate,
        sigmask,
        sigaltstack: SigAltStack::default(),
        robust_list,
        robust_list_len,
        clear_child_tid: 0,
        rseq: (rseq.rseq_abi_pointer != 0).then_some(Rseq {
            addr: rseq.rseq_abi_pointer,
            len: rseq.rseq_abi_size,
            sig: rseq.signature,
        }),
        pending,
    })
}

fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect()
}

fn signo_of(siginfo: &[u8]) -> i32 {
    siginfo
        .get(0..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, i32::from_le_bytes)
}

/// Namespace TID of a host TID of the vkernel (threads are not in the pid map, ask /proc).
fn host_to_ns_tid(host_to_ns: &BTreeMap<i32, i32>, host: i32) -> i32 {
    host_to_ns
        .get(&host)
        .copied()
        .or_else(|| proc::ns_pid(host).ok())
        .unwrap_or(0)
}

/// A process that exited and waits for its parent to reap it.
pub fn capture_zombie(
    p: &FrozenProcess,
    host_to_ns: &BTreeMap<i32, i32>,
    status: i32,
) -> Result<Process, SrcError> {
    let pid = p.host_pid;
    let st = super::read_stat(pid)?;
    let ns = |host: i32| host_to_ns.get(&host).copied();
    Ok(Process {
        pid: p.ns_pid,
        ppid: ns(st.ppid).unwrap_or(1),
        pgid: ns(st.pgrp).unwrap_or(0),
        sid: ns(st.session).unwrap_or(0),
        comm: st.comm,
        mm: vkm_common::model::NONE,
        fd_table: vkm_common::model::NONE,
        exit_signal: st.exit_signal,
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o022,
        personality: 0,
        rlimits: Vec::new(),
        sigactions: Vec::new(),
        itimers: Vec::new(),
        posix_timers: Vec::new(),
        pending_shared: Vec::new(),
        threads: Vec::new(),
        zombie: Some(status),
        pdeathsig: 0,
        ctty: false,
        tty_pgrp: 0,
        tracer: None,
    })
}

/// The capability sets of a /proc status text (missing lines read as empty sets).
pub(super) fn caps_of(status: &str) -> vkm_common::model::Caps {
    let get = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    vkm_common::model::Caps {
        inheritable: get("CapInh:"),
        permitted: get("CapPrm:"),
        effective: get("CapEff:"),
        bounding: get("CapBnd:"),
        ambient: get("CapAmb:"),
    }
}
