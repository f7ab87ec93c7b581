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
        ptrace::setregs(self.tid, &r)?;
        self.children.clear();
        // Through a trap gadget the call ends at its `int3`, otherwise at its exit stop.
        let resume = |tid| {
            if self.traps {
                ptrace::cont(tid, 0)
            } else {
                ptrace::syscall(tid, 0)
            }
        };
        let trap_at = self.gadget + TRAP_GADGET.len() as u64;
        resume(self.tid)?;
        let mut entered = false;
        loop {
            match ptrace::wait(self.tid)? {
                Stop::Syscall if !self.traps && !entered => entered = true,
                Stop::Syscall if !self.traps => break,
                Stop::Signal(libc::SIGTRAP) if self.traps => {
                    let out = ptrace::getregs(self.tid)?;
                    if out.rip == trap_at {
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

    /// Like [`Remote::raw`], mapping a negative result to [`SysError::Remote`] naming `op`.
    pub fn call(&mut self, op: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(SysError::Remote {
                op,
                pid: self.tid,
                source: std::io::Error::from_raw_os_error(i32::try_from(-r).unwrap_or(libc::EIO)),
            });
        }
        Ok(r as u64)
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
    #[test]
    fn finds_syscall_instruction() {
        assert_eq!(
            super::find_syscall_insn(&[0x90, 0x0f, 0x05, 0xc3], 0x1000),
            Some(0x1001)
        );
        assert_eq!(super::find_syscall_insn(&[0x0f, 0x90, 0x05], 0), None);
    }
}
