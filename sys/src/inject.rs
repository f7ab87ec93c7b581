//! Running system calls inside a ptrace-stopped thread ("injection").
//!
//! The thread's registers are pointed at a `syscall` instruction with the call's number and
//! arguments, it is resumed with `PTRACE_SYSCALL` up to the syscall's exit stop, and the result is
//! read from `rax`. `orig_rax = -1` keeps the kernel's restart logic away from an injected call
//! when the thread was stopped inside an interrupted syscall. Signals that arrive meanwhile are
//! kept (not delivered) and handed back to the caller, who decides whether they become pending
//! signals of the image or are re-delivered on detach.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::ptrace::{self, Regs, Stop};
use crate::{proc, Result, SysError};

/// A stopped thread that syscalls can be injected into.
pub struct Remote {
    pub tid: i32,
    /// Address of a `0f 05` (syscall) instruction mapped executable in the thread's mm.
    pub gadget: u64,
    /// Writable scratch memory for syscall arguments (at least [`SCRATCH_ARGS`] bytes).
    pub scratch: u64,
    /// The stack pointer the thread runs the injected syscall with.
    pub stack: u64,
    /// Registers the thread had before the first injection.
    pub saved: Regs,
    /// `/proc/PID/mem` of the thread's process.
    pub mem: File,
    /// Signals that arrived during injections, as raw siginfos, in arrival order.
    pub swallowed: Vec<Vec<u8>>,
    /// Pids (tracer's namespace) of tasks created by the last injected call (fork/clone events).
    pub children: Vec<i32>,
    /// The gadget is followed by an `int3` ([`TRAP_GADGET`]): a call runs to that trap, one
    /// ptrace stop, instead of stopping at the syscall's entry and exit, two. Only where the
    /// thread may run one instruction past the syscall: never for a call that unmaps the
    /// gadget (it must end at the syscall's exit stop).
    pub traps: bool,
}

/// `syscall; int3`, for a gadget in memory of our own (see [`Remote::traps`]).
pub const TRAP_GADGET: [u8; 3] = [0x0f, 0x05, 0xcc];

/// Bytes of scratch memory that injected calls may use for their arguments.
pub const SCRATCH_ARGS: u64 = 8192;

impl Remote {
    /// Prepare a stopped thread for injection. `mem` must be `/proc/PID/mem` of its process.
    pub fn new(tid: i32, gadget: u64, scratch: u64, stack: u64, mem: File) -> Result<Self> {
        let saved = ptrace::getregs(tid)?;
        Ok(Remote {
            tid,
            gadget,
            scratch,
            stack,
            saved,
            mem,
            swallowed: Vec::new(),
            children: Vec::new(),
            traps: false,
        })
    }

    /// A stopped thread ready for injection through a `syscall` instruction of its vDSO, on
    /// its own stack.
    pub fn through_vdso(tid: i32) -> Result<Remote> {
        let mut r = Remote::new(tid, vdso_gadget(tid)?, 0, 0, proc::open_mem(tid)?)?;
        r.stack = r.saved.rsp;
        Ok(r)
    }

    /// Run syscall `nr` with `args` in the thread; returns the raw result (negative errno on
    /// failure).
    pub fn raw(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let mut r = self.saved;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let slots = [
            &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.r10, &mut r.r8, &mut r.r9,
        ];
        for (slot, a) in slots
            .into_iter()
            .zip(args.iter().copied().chain(std::iter::repeat(0)))
        {
            *slot = a;
        }
        r.rip = self.gadget;
        r.rsp = self.stack;
        // Through a trap gadget the call ends at its `int3`, otherwise at its exit stop.
        let trap_at = self.traps.then_some(self.gadget + TRAP_GADGET.len() as u64);
        self.run(&r, trap_at, nr)
    }

    /// Run the thread from `regs` until it stops at `trap_at` (just past an `int3`) or, when
    /// that is `None`, at the exit of the syscall it starts with; returns `rax` there.
    fn run(&mut self, regs: &Regs, trap_at: Option<u64>, nr: i64) -> Result<i64> {
        ptrace::setregs(self.tid, regs)?;
        self.children.clear();
        let resume = |tid| {
            if trap_at.is_some() {
                ptrace::cont(tid, 0)
            } else {
                ptrace::syscall(tid, 0)
            }
        };
        resume(self.tid)?;
        let mut entered = false;
        loop {
            match ptrace::wait(self.tid)? {
                Stop::Syscall if trap_at.is_none() && !entered => entered = true,
                Stop::Syscall if trap_at.is_none() => break,
                Stop::Signal(libc::SIGTRAP) if trap_at.is_some() => {
                    let out = ptrace::getregs(self.tid)?;
                    if Some(out.rip) == trap_at {
                        return Ok(out.rax as i64);
                    }
                    self.swallowed.push(ptrace::getsiginfo(self.tid)?);
                }
                Stop::Signal(_) => self.swallowed.push(ptrace::getsiginfo(self.tid)?),
                Stop::Event(ev)
                    if ev == ptrace::PTRACE_EVENT_FORK
                        || ev == ptrace::PTRACE_EVENT_VFORK
                        || ev == ptrace::PTRACE_EVENT_CLONE =>
                {
                    let child = ptrace::geteventmsg(self.tid)?;
                    self.children.push(i32::try_from(child).unwrap_or(-1));
                }
                Stop::Event(_) | Stop::Syscall => {}
                Stop::Exited(code) => {
                    return Err(SysError::Unexpected {
                        pid: self.tid,
                        what: format!("exited with status {code} during an injected syscall {nr}"),
                    })
                }
                Stop::Killed(sig) => {
                    return Err(SysError::Unexpected {
                        pid: self.tid,
                        what: format!("was killed by signal {sig} during an injected syscall {nr}"),
                    })
                }
            }
            resume(self.tid)?;
        }
        let out = ptrace::getregs(self.tid)?;
        Ok(out.rax as i64)
    }

    /// Run `calls` one after the other in the thread, stopping once per batch of
    /// `area.capacity` calls instead of once or twice per call; returns their results. A call
    /// that fails does not stop the ones after it (they should not depend on it): the error
    /// names the first that failed. Only for calls that cannot unmap or move `area`.
    pub fn batch(&mut self, area: &BatchArea, calls: &[Call]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(calls.len());
        for chunk in calls.chunks(area.capacity.max(1)) {
            let code = batch_code(area.results, chunk);
            self.write(area.code, &code)?;
            let mut r = self.saved;
            r.orig_rax = u64::MAX;
            r.rip = area.code;
            r.rsp = self.stack;
            let nr = chunk.first().map_or(-1, |c| c.nr);
            self.run(&r, Some(area.code + code.len() as u64), nr)?;
            let raw = self.read(area.results, chunk.len() * 8)?;
            for (c, w) in chunk.iter().zip(raw.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                out.push(checked(c.op, self.tid, i64::from_le_bytes(b))?);
            }
        }
        Ok(out)
    }

    /// Like [`Remote::raw`], mapping a negative result to [`SysError::Remote`] naming `op`.
    pub fn call(&mut self, op: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        checked(op, self.tid, r)
    }

    /// Map `len` bytes of private anonymous read-write memory anywhere in the thread's
    /// process (for out-parameters, so that nothing of the process's own memory changes);
    /// returns its address. The caller unmaps it with [`Remote::unmap`].
    pub fn map_anon(&mut self, len: u64) -> Result<u64> {
        self.mmap_anon(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Map `len` bytes of private anonymous memory that can hold code, with a
    /// [`TRAP_GADGET`] at its start which every later call goes through. Returns its address;
    /// arguments belong past the gadget. Undo with [`Remote::unmap`].
    pub fn map_trap_gadget(&mut self, len: u64) -> Result<u64> {
        let addr = self.mmap_anon(len, libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC)?;
        self.use_trap_gadget(addr)?;
        Ok(addr)
    }

    /// Write a [`TRAP_GADGET`] at `addr` (executable memory of the thread's process) and make
    /// every later call go through it.
    pub fn use_trap_gadget(&mut self, addr: u64) -> Result<()> {
        self.write(addr, &TRAP_GADGET)?;
        self.gadget = addr;
        self.traps = true;
        Ok(())
    }

    fn mmap_anon(&mut self, len: u64, prot: i32) -> Result<u64> {
        self.call(
            "mmap(scratch)",
            libc::SYS_mmap,
            &[
                0,
                len,
                prot as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
    }

    /// Unmap what [`Remote::map_anon`] or [`Remote::map_trap_gadget`] mapped. A gadget inside
    /// it is used a last time, ending at the syscall's exit stop: no instruction runs there
    /// once it is gone. The caller must not inject through it again.
    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<()> {
        if (addr..addr.saturating_add(len)).contains(&self.gadget) {
            self.traps = false;
        }
        self.call("munmap(scratch)", libc::SYS_munmap, &[addr, len])
            .map(drop)
    }

    /// Write bytes into the thread's memory (through `/proc/PID/mem`, which also writes
    /// read-only private pages).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|e| SysError::Syscall {
                op: "pwrite(/proc/PID/mem)",
                pid: self.tid,
                source: e,
            })
    }

    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_exact_at(&mut buf, addr)
            .map_err(|e| SysError::Syscall {
                op: "pread(/proc/PID/mem)",
                pid: self.tid,
                source: e,
            })?;
        Ok(buf)
    }

    /// Put the registers the thread had before the injections back.
    pub fn restore_regs(&self) -> Result<()> {
        ptrace::setregs(self.tid, &self.saved)
    }
}

/// A raw syscall result of thread `tid`: a negative errno becomes [`SysError::Remote`] naming
/// `op`.
fn checked(op: &'static str, tid: i32, raw: i64) -> Result<u64> {
    if (-4095..0).contains(&raw) {
        return Err(SysError::Remote {
            op,
            pid: tid,
            source: std::io::Error::from_raw_os_error(i32::try_from(-raw).unwrap_or(libc::EIO)),
        });
    }
    Ok(raw as u64)
}

/// One system call of a [`Remote::batch`].
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// What the call does, for errors.
    pub op: &'static str,
    pub nr: i64,
    pub args: [u64; 6],
}

impl Call {
    /// Syscall `nr` with `args` (missing ones are 0).
    pub fn new(op: &'static str, nr: i64, args: &[u64]) -> Call {
        let mut a = [0u64; 6];
        for (slot, v) in a.iter_mut().zip(args) {
            *slot = *v;
        }
        Call { op, nr, args: a }
    }
}

/// Where a [`Remote::batch`] puts its code and results in the thread's memory: executable
/// scratch memory for `capacity` calls' code ([`batch_code_len`]) and writable room for
/// their results (8 bytes each).
#[derive(Debug, Clone, Copy)]
pub struct BatchArea {
    pub code: u64,
    pub results: u64,
    pub capacity: usize,
}

/// Bytes of machine code a batch of `n` calls takes.
pub const fn batch_code_len(n: usize) -> usize {
    n * CALL_CODE_LEN + 1
}

/// `movabs` of each register a call sets up, and the moves' length.
const CALL_CODE_LEN: usize = 7 * 10 + 2 + 10;

/// x86-64 code running `calls` in order, storing each result (`rax`) at `results_at + 8 * i`,
/// ending with an `int3`. Seven `movabs reg, imm64` (number and six arguments), `syscall`,
/// `movabs [results_at + 8 * i], rax`. Written by hand: a handful of fixed encodings, which
/// no assembler crate is needed for.
fn batch_code(results_at: u64, calls: &[Call]) -> Vec<u8> {
    // REX.W B8+r (rax), BF (rdi), BE (rsi), BA (rdx); REX.WB BA (r10), B8 (r8), B9 (r9).
    const MOVS: [[u8; 2]; 7] = [
        [0x48, 0xb8],
        [0x48, 0xbf],
        [0x48, 0xbe],
        [0x48, 0xba],
        [0x49, 0xba],
        [0x49, 0xb8],
        [0x49, 0xb9],
    ];
    let mut code = Vec::with_capacity(batch_code_len(calls.len()));
    for (i, c) in calls.iter().enumerate() {
        let values = std::iter::once(c.nr as u64).chain(c.args);
        for (op, v) in MOVS.iter().zip(values) {
            code.extend_from_slice(op);
            code.extend_from_slice(&v.to_le_bytes());
        }
        code.extend_from_slice(&[0x0f, 0x05]);
        // REX.W A3: mov moffs64, rax.
        code.extend_from_slice(&[0x48, 0xa3]);
        code.extend_from_slice(&(results_at + 8 * i as u64).to_le_bytes());
    }
    code.push(0xcc);
    code
}

/// A `syscall` instruction in the vDSO of `tid`'s process.
pub fn vdso_gadget(tid: i32) -> Result<u64> {
    let path = proc::pid_path(tid, "maps");
    let maps = vkm_common::procfs::parse_maps(&proc::read(&path)?)
        .map_err(|e| proc::parse_error(path, e))?;
    let vdso = maps
        .iter()
        .find(|v| v.path.as_deref() == Some("[vdso]"))
        .ok_or_else(|| SysError::Unexpected {
            pid: tid,
            what: "has no [vdso] to borrow a syscall instruction from".into(),
        })?;
    let mut code = vec![0u8; usize::try_from(vdso.end - vdso.start).unwrap_or(0)];
    proc::read_vm(tid, vdso.start, &mut code).map_err(|source| SysError::Syscall {
        op: "read the vDSO of",
        pid: tid,
        source,
    })?;
    find_syscall_insn(&code, vdso.start).ok_or_else(|| SysError::Unexpected {
        pid: tid,
        what: "has no syscall instruction in its [vdso]".into(),
    })
}

/// Find a `syscall` instruction (`0f 05`) in a code blob (the vDSO) mapped at `base`.
pub fn find_syscall_insn(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| base + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sleep` child, seized and stopped; killed and reaped on drop.
    struct Stopped(std::process::Child);

    impl Stopped {
        fn new() -> Stopped {
            let child = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("spawn sleep");
            let pid = child.id() as i32;
            let s = Stopped(child);
            // Syscall stops must be told from signals (the non-trap calls end at one).
            ptrace::seize(pid, ptrace::PTRACE_O_TRACESYSGOOD).expect("seize");
            ptrace::interrupt(pid).expect("interrupt");
            assert!(matches!(ptrace::wait(pid), Ok(Stop::Event(_))));
            s
        }
    }

    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_batch_runs_its_calls_in_order_and_names_the_one_that_failed() {
        let child = Stopped::new();
        let pid = child.0.id() as i32;
        let mut r = Remote::through_vdso(pid).expect("remote");
        let area = r.map_trap_gadget(65536).expect("scratch");
        let batch = BatchArea {
            code: area + 8192,
            results: area + 4096,
            capacity: 2,
        };
        // Three calls through batches of two: each result lands where it belongs.
        let got = r
            .batch(
                &batch,
                &[
                    Call::new("getpid", libc::SYS_getpid, &[]),
                    Call::new("getppid", libc::SYS_getppid, &[]),
                    Call::new("getpid", libc::SYS_getpid, &[]),
                ],
            )
            .expect("batch");
        assert_eq!(got, [pid as u64, std::process::id() as u64, pid as u64]);
        // A call with arguments: the child writes its own sigaltstack into its memory.
        let out = area + 1024;
        r.batch(
            &batch,
            &[Call::new("sigaltstack", libc::SYS_sigaltstack, &[0, out])],
        )
        .expect("sigaltstack");
        let ss = r.read(out, 24).expect("read");
        assert_eq!(ss[8..12], (libc::SS_DISABLE as u32).to_le_bytes());
        let err = r
            .batch(
                &batch,
                &[
                    Call::new("getpid", libc::SYS_getpid, &[]),
                    Call::new("close(bad fd)", libc::SYS_close, &[100_000]),
                ],
            )
            .expect_err("closing a bad fd fails");
        assert!(err.to_string().contains("close(bad fd)"), "{err}");
        r.unmap(area, 65536).expect("unmap");
        r.restore_regs().expect("registers");
        ptrace::detach(pid, 0).expect("detach");
    }

    #[test]
    fn finds_syscall_instruction() {
        assert_eq!(
            find_syscall_insn(&[0x90, 0x0f, 0x05, 0xc3], 0x1000),
            Some(0x1001)
        );
        assert_eq!(find_syscall_insn(&[0x0f, 0x90, 0x05], 0), None);
    }
}
