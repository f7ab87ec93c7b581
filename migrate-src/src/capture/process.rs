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

/// The scratch area mapped in a process while its state is read: a trap gadget, then each
/// batched call's out-parameter (32 bytes each), their results, and the batch's code.
const SCRATCH_LEN: u64 = 64 * 1024;
const OUT_OFF: u64 = 64;
const OUT_LEN: u64 = 32;
/// Calls per batch: their out-parameters, results and code fit the scratch area.
const BATCH: usize = 256;
const RESULTS_OFF: u64 = OUT_OFF + OUT_LEN * BATCH as u64;
const CODE_OFF: u64 = 16 * 1024;
const _: () = assert!(RESULTS_OFF + 8 * BATCH as u64 <= CODE_OFF);
const _: () = assert!(CODE_OFF + inject::batch_code_len(BATCH) as u64 <= SCRATCH_LEN);

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

/// What one batched call reads.
#[derive(Clone, Copy)]
enum Read {
    SigAction(i32),
    ITimer(u64),
    /// The POSIX timer `index` of the process's list, whose id is `id`.
    TimerGet {
        index: usize,
        id: u64,
    },
    TimerOverrun {
        id: u64,
    },
    Brk,
    Personality,
    PdeathSig,
    TidAddress,
    AltStack,
}

impl Read {
    fn op(self) -> &'static str {
        match self {
            Read::SigAction(_) => "rt_sigaction",
            Read::ITimer(_) => "getitimer",
            Read::TimerGet { .. } => "timer_gettime",
            Read::TimerOverrun { .. } => "timer_getoverrun",
            Read::Brk => "brk",
            Read::Personality => "personality",
            Read::PdeathSig => "prctl(PR_GET_PDEATHSIG)",
            Read::TidAddress => "prctl(PR_GET_TID_ADDRESS)",
            Read::AltStack => "sigaltstack",
        }
    }

    /// The call, its out-parameter (if any) at `out`.
    fn call(self, out: u64) -> inject::Call {
        let (nr, args): (i64, &[u64]) = match self {
            Read::SigAction(sig) => (libc::SYS_rt_sigaction, &[sig as u64, 0, out, 8]),
            Read::ITimer(which) => (libc::SYS_getitimer, &[which, out]),
            Read::TimerGet { id, .. } => (libc::SYS_timer_gettime, &[id, out]),
            Read::TimerOverrun { id } => (libc::SYS_timer_getoverrun, &[id]),
            Read::Brk => (libc::SYS_brk, &[0]),
            Read::Personality => (libc::SYS_personality, &[0xffff_ffff]),
            Read::PdeathSig => (libc::SYS_prctl, &[libc::PR_GET_PDEATHSIG as u64, out]),
            Read::TidAddress => (libc::SYS_prctl, &[libc::PR_GET_TID_ADDRESS as u64, out]),
            Read::AltStack => (libc::SYS_sigaltstack, &[0, out]),
        };
        inject::Call::new(self.op(), nr, args)
    }
}

/// Run `reads` in the thread of `r` in batches (one ptrace stop each, where one call each
/// costs about 12 µs here, all while the vkernel is frozen); returns each one's result and
/// out-parameter.
fn run_reads(r: &mut Remote, area: u64, reads: &[Read]) -> Result<Vec<(u64, [u64; 4])>, SrcError> {
    let mut out = Vec::with_capacity(reads.len());
    for chunk in reads.chunks(BATCH) {
        let calls: Vec<inject::Call> = chunk
            .iter()
            .enumerate()
            .map(|(i, rd)| rd.call(area + OUT_OFF + OUT_LEN * i as u64))
            .collect();
        let batch = inject::BatchArea {
            code: area + CODE_OFF,
            results: area + RESULTS_OFF,
            capacity: BATCH,
        };
        let results = r.batch(&batch, &calls)?;
        let outs = words(&r.read(area + OUT_OFF, OUT_LEN as usize * chunk.len())?);
        for (i, res) in results.into_iter().enumerate() {
            let mut o = [0u64; 4];
            o.copy_from_slice(&outs[i * 4..i * 4 + 4]);
            out.push((res, o));
        }
    }
    Ok(out)
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
    // A private scratch area for the calls' code and out-parameters, so that nothing of the
    // target's memory is touched; it is unmapped again before we return.
    let area = r.map_trap_gadget(SCRATCH_LEN)?;
    let out = (|| -> Result<Injected, SrcError> {
        // Only caught or ignored signals can have a handler; SIGCHLD's flags matter even at
        // SIG_DFL (SA_NOCLDSTOP, SA_NOCLDWAIT).
        let mut reads: Vec<Read> = (1..=64i32)
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| handled & (1u64 << (sig - 1)) != 0 || sig == libc::SIGCHLD)
            .map(Read::SigAction)
            .collect();
        reads.extend((0..3).map(Read::ITimer));
        for (index, t) in timers.iter().enumerate() {
            let id = t.id as u64;
            reads.extend([Read::TimerGet { index, id }, Read::TimerOverrun { id }]);
        }
        reads.extend([Read::Brk, Read::Personality, Read::PdeathSig]);
        let results = run_reads(r, area, &reads)?;

        let mut inj = Injected {
            sigactions: Vec::new(),
            itimers: Vec::new(),
            posix_timers: Vec::new(),
            brk: 0,
            personality: 0,
            pdeathsig: 0,
        };
        let us = |s: u64, u: u64| (s as i64) * 1_000_000 + u as i64;
        let ns = |s: u64, n: u64| (s as i64) * 1_000_000_000 + n as i64;
        for (rd, (res, f)) in reads.iter().zip(&results) {
            match *rd {
                Read::SigAction(sig) if f[0] != 0 || f[1] != 0 => {
                    inj.sigactions.push(SigAction {
                        signo: sig,
                        handler: f[0],
                        flags: f[1],
                        restorer: f[2],
                        mask: f[3],
                    });
                }
                Read::ITimer(which) => {
                    let t = ITimer {
                        which: which as i32,
                        interval_us: us(f[0], f[1]),
                        value_us: us(f[2], f[3]),
                    };
                    if t.interval_us != 0 || t.value_us != 0 {
                        inj.itimers.push(t);
                    }
                }
                Read::TimerGet { index, .. } => {
                    let Some(t) = timers.get(index) else { continue };
                    inj.posix_timers.push(PosixTimer {
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
                        overrun: 0,
                    });
                }
                Read::TimerOverrun { .. } => {
                    if let Some(t) = inj.posix_timers.last_mut() {
                        t.overrun = i32::try_from(*res).unwrap_or(0);
                    }
                }
                Read::Brk => inj.brk = *res,
                Read::Personality => inj.personality = *res,
                Read::PdeathSig => inj.pdeathsig = i32::try_from(f[0] & 0xffff_ffff).unwrap_or(0),
                _ => {}
            }
        }
        // Per-thread values only readable from inside: each thread runs its own batch.
        for (i, &tid) in p.threads.iter().enumerate() {
            let mem = r.mem.try_clone().map_err(|e| vkm_sys::SysError::Syscall {
                op: "dup(/proc/PID/mem)",
                pid: tid,
                source: e,
            })?;
            let mut t = if tid == r.tid {
                None
            } else {
                let mut t = Remote::new(tid, r.gadget, 0, 0, mem)?;
                t.stack = t.saved.rsp;
                t.traps = r.traps;
                Some(t)
            };
            let rem: &mut Remote = match t.as_mut() {
                Some(t) => t,
                None => &mut *r,
            };
            let res = per_thread(rem, area, &mut threads[i]);
            if let Some(t) = t.as_mut() {
                t.restore_regs()?;
                for si in t.swallowed.drain(..) {
                    held.push((tid, signo_of(&si)));
                    threads[i].pending.push(si);
                }
            }
            res?;
        }
        Ok(inj)
    })();
    let unmapped = r.unmap(area, SCRATCH_LEN);
    let out = out?;
    unmapped?;
    Ok(out)
}

fn per_thread(r: &mut Remote, area: u64, t: &mut Thread) -> Result<(), SrcError> {
    let got = run_reads(r, area, &[Read::TidAddress, Read::AltStack])?;
    if let [(_, tid_address), (_, alt)] = got.as_slice() {
        t.clear_child_tid = tid_address[0];
        t.sigaltstack = SigAltStack {
            sp: alt[0],
            flags: (alt[1] & 0xffff_ffff) as i32,
            size: alt[2],
        };
    }
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
