//! The state model of a vkernel: what a checkpoint holds and a restore recreates.
//!
//! A vkernel is a process tree inside its own PID namespace, under a shim that vkmigrate owns.
//! Things that several processes can share (an address space, an fd table, an open file
//! description, a memory object, a pipe) are stored once, in tables on [`Vkernel`], and referenced
//! by id, so that restore can recreate the sharing exactly (`CLONE_VM` without `CLONE_THREAD`,
//! `CLONE_FILES`, `dup`ed descriptors, UML's RAM file mapped by every address space).
//!
//! Page contents are not part of this model: they travel in `Pages` frames of the image (see
//! [`crate::image`]) keyed by [`crate::image::Space`]. Kernel ABI structs (registers, xsave) are
//! kept as sized byte blobs and their length is checked on load rather than guessed.

use serde::{Deserialize, Serialize};

/// Size of `struct user_regs_struct` on x86_64 (27 × u64).
pub const USER_REGS_SIZE: usize = 27 * 8;

/// Feature flags of an image (see [`crate::image`] for required vs optional bits).
pub mod features {
    /// Threads carry an `NT_X86_XSTATE` area.
    pub const XSTATE: u64 = 1 << 0;
    /// The vkernel ran in a time namespace; [`super::Clocks`] must be honoured.
    pub const TIME_NS: u64 = 1 << 1;
}

/// Everything about one vkernel, except page contents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vkernel {
    pub name: String,
    /// The command line `vkmigrate run` started, for `ps` and `inspect`.
    pub argv: Vec<String>,
    /// Where the vkernel was captured (host name), for humans.
    pub source_host: String,
    pub clocks: Clocks,
    /// Host CPU facts that restore must match (xsave layout).
    pub cpu: CpuInfo,
    /// Ordered so that every parent comes before its children.
    pub processes: Vec<Process>,
    pub mms: Vec<Mm>,
    pub objects: Vec<MemObject>,
    pub fd_tables: Vec<FdTable>,
    pub files: Vec<OpenFile>,
    pub pipes: Vec<Pipe>,
    /// Terminal settings of the console pty that the shim held.
    pub console: Option<Console>,
    /// The tun/tap devices the vkernel holds open and their host-side configuration, which
    /// restore recreates before it opens [`FileKind::Tun`] fds on them.
    #[serde(default)]
    pub net: Vec<crate::net::NetDev>,
    /// The mconsole socket of a User-Mode Linux that was quiesced (`stop`) for the capture:
    /// the restored UML waits for `go` on it.
    #[serde(default)]
    pub mconsole: Option<String>,
}

/// The vkernel's view of its clocks at the freeze, so that CLOCK_MONOTONIC and CLOCK_BOOTTIME
/// continue where they stopped (the pause is hidden from it).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Clocks {
    pub monotonic_ns: i128,
    pub boottime_ns: i128,
    /// CLOCK_REALTIME at the freeze, for reports (not namespaced, so not restored).
    pub realtime_ns: i128,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct CpuInfo {
    /// Size of the xsave area the kernel returned for `NT_X86_XSTATE`.
    pub xstate_size: u32,
    /// XCR0 as saved in the xsave header's software area (bytes 464..472 of the area).
    pub xcr0: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    /// PID inside the vkernel's PID namespace.
    pub pid: i32,
    /// Parent's PID inside the namespace; 1 is the shim's reaper (not restored, always there).
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    /// Index into [`Vkernel::mms`].
    pub mm: u32,
    /// Index into [`Vkernel::fd_tables`].
    pub fd_table: u32,
    /// Signal sent to the parent when this process exits (SIGCHLD, or 0 for UML's helpers).
    pub exit_signal: i32,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub personality: u64,
    pub rlimits: Vec<Rlimit>,
    /// Signals 1..=64 with a non-default disposition.
    pub sigactions: Vec<SigAction>,
    pub itimers: Vec<ITimer>,
    pub posix_timers: Vec<PosixTimer>,
    /// Signals pending for the whole process, as raw `siginfo_t` (128 bytes each).
    pub pending_shared: Vec<Vec<u8>>,
    /// The thread-group leader first.
    pub threads: Vec<Thread>,
    /// An exited process its parent has not reaped yet: its wait status. Such a process has
    /// no threads, address space or fds (`mm` and `fd_table` are [`NONE`]).
    #[serde(default)]
    pub zombie: Option<i32>,
    /// Signal the process gets when its parent dies (`PR_SET_PDEATHSIG`), 0 = none.
    #[serde(default)]
    pub pdeathsig: i32,
    /// A session leader whose controlling terminal is the console.
    #[serde(default)]
    pub ctty: bool,
    /// The console's foreground process group (namespace pgid), when `ctty`.
    #[serde(default)]
    pub tty_pgrp: i32,
    /// The process of the vkernel that traces this one (namespace pid): UML's kernel process
    /// traces every guest process. Restore hands the process to it, stopped, with nothing to
    /// report (see `vkm_sys::tracee`).
    #[serde(default)]
    pub tracer: Option<i32>,
}

/// Index value meaning "none" for [`Process::mm`] and [`Process::fd_table`].
pub const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

impl From<crate::procfs::Limit> for Rlimit {
    fn from(l: crate::procfs::Limit) -> Rlimit {
        Rlimit {
            resource: l.resource,
            soft: l.soft,
            hard: l.hard,
        }
    }
}

/// `struct kernel_sigaction` as the raw `rt_sigaction` syscall sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimer {
    /// ITIMER_REAL = 0, ITIMER_VIRTUAL = 1, ITIMER_PROF = 2.
    pub which: i32,
    pub interval_us: i64,
    pub value_us: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    pub id: i32,
    pub clockid: i32,
    /// `sigev_notify` (SIGEV_SIGNAL = 0, SIGEV_NONE = 1, SIGEV_THREAD_ID = 4).
    pub notify: i32,
    pub signo: i32,
    pub sigev_value: u64,
    /// Target thread (namespace TID) for SIGEV_THREAD_ID.
    pub notify_tid: i32,
    pub interval_ns: i64,
    pub value_ns: i64,
    pub overrun: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Thread {
    /// TID inside the vkernel's PID namespace.
    pub tid: i32,
    pub comm: String,
    /// `struct user_regs_struct`, [`USER_REGS_SIZE`] bytes, after the syscall-restart fix-up
    /// has been decided (see `restart`).
    #[serde(with = "serde_bytes")]
    pub regs: Vec<u8>,
    /// `NT_X86_XSTATE` area as returned by the kernel (length = [`CpuInfo::xstate_size`]).
    #[serde(with = "serde_bytes")]
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    pub sigaltstack: SigAltStack,
    pub robust_list: u64,
    pub robust_list_len: u64,
    pub clear_child_tid: u64,
    pub rseq: Option<Rseq>,
    /// Signals pending for this thread only, as raw `siginfo_t` (128 bytes each).
    pub pending: Vec<Vec<u8>>,
    /// Capability sets, when the thread had other capabilities than the checkpointing agent.
    #[serde(default)]
    pub caps: Option<Caps>,
}

/// A thread's capability sets (bit masks, as in /proc/PID/status).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Caps {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SigAltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// One address space (a vmspace).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Mm {
    pub id: u32,
    pub vmas: Vec<Vma>,
    pub fields: MmFields,
    /// Path of `/proc/PID/exe`, for `PR_SET_MM_MAP`'s `exe_fd`.
    pub exe: String,
    /// The `[vdso]` bytes: restore refuses when the destination's vDSO differs, because the
    /// code that jumps into it keeps working only with the very same kernel build.
    #[serde(with = "serde_bytes")]
    pub vdso: Vec<u8>,
}

/// The `struct prctl_mm_map` fields, plus auxv.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

pub mod prot {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const EXEC: u32 = 4;
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// [`prot`] bits.
    pub prot: u32,
    pub shared: bool,
    pub growsdown: bool,
    /// `madvise` flags to reapply: "dc" (DONTCOPY), "dd" (DONTDUMP), "wf" (WIPEONFORK), "hg".
    pub advise: Vec<String>,
    pub backing: Backing,
}

impl Vma {
    /// Whether the mapping's own pages carry state, and so travel as its pages: `Some(false)`
    /// for private anonymous memory (every present page), `Some(true)` for a private mapping
    /// of a file or memory object (only the pages it copied on write), `None` otherwise
    /// (shared mappings travel as their object or file, special ones not at all).
    pub fn own_pages(&self) -> Option<bool> {
        if self.shared {
            return None;
        }
        match self.backing {
            Backing::Anon => Some(false),
            Backing::File { .. } | Backing::Object { .. } => Some(true),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (heap, stacks, malloc arenas). Its present pages travel.
    Anon,
    /// A file on a filesystem both hosts see. Private mappings send only their COW pages.
    File {
        path: String,
        offset: u64,
        size: u64,
        mtime_ns: i128,
    },
    /// A shared memory object (memfd, unlinked tmpfs file, /dev/shm file, SysV segment) by id.
    Object {
        id: u32,
        offset: u64,
    },
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
}

impl Backing {
    /// A mapping the kernel places itself (vDSO, vvar, vsyscall): restore asks for it, it is
    /// never mapped like the others, and a layout delta cannot move it.
    pub fn is_special(&self) -> bool {
        matches!(
            self,
            Backing::Vdso | Backing::Vvar | Backing::VvarVclock | Backing::Vsyscall
        )
    }
}

/// A memory object whose contents travel (memfd, O_TMPFILE or unlinked tmpfs/shm file, SysV
/// shared memory segment).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemObject {
    pub id: u32,
    /// The name shown in /proc maps (e.g. `/memfd:vkload-ram (deleted)`).
    pub name: String,
    pub kind: ObjectKind,
    pub size: u64,
    pub seals: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ObjectKind {
    Memfd,
    /// An unlinked file on tmpfs (`/dev/shm`, `$TMPDIR`): recreated as an O_TMPFILE there.
    TmpFile,
    /// A System V shared memory segment (`shmget`), recreated with its key and id in the
    /// vkernel's IPC namespace and attached with `shmat` where it was. [`MemObject::size`] is
    /// the segment's size (`shm_segsz`), its pages travel as those of any object.
    SysV(SysvShm),
}

/// A System V shared memory segment as `shmctl(IPC_STAT)` showed it inside the vkernel's IPC
/// namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SysvShm {
    /// The key (`IPC_PRIVATE`, 0, for a private segment and for one marked removed: the
    /// kernel makes the key of a removed segment private).
    pub key: i32,
    /// The id `shmget` returned, which the vkernel keeps using: restored exactly.
    pub shmid: i32,
    /// Permission bits (`0o777` of `shm_perm.mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Creator's uid and gid.
    #[serde(default)]
    pub cuid: u32,
    #[serde(default)]
    pub cgid: u32,
    /// Marked with `IPC_RMID` while still attached (`SHM_DEST`): removed again once every
    /// restored process has attached it.
    #[serde(default)]
    pub removed: bool,
    /// `SHM_LOCK`ed (`SHM_LOCKED`).
    #[serde(default)]
    pub locked: bool,
    /// Where address spaces have it attached (none: a segment that exists unattached).
    #[serde(default)]
    pub attaches: Vec<SysvAttach>,
}

/// One `shmat` of a segment into an address space.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysvAttach {
    /// Index into [`Vkernel::mms`].
    pub mm: u32,
    /// The address `shmat` returned (the VMAs of the attachment start there plus their offset).
    pub addr: u64,
    /// Attached with `SHM_RDONLY` (the mapping may never become writable).
    pub rdonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FdTable {
    pub id: u32,
    pub fds: Vec<Fd>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fd {
    pub fd: i32,
    /// Index into [`Vkernel::files`].
    pub file: u32,
    pub cloexec: bool,
}

/// An open file description (several fds may share one: `dup`, fork).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenFile {
    pub id: u32,
    /// `O_*` status flags (O_ACCMODE, O_APPEND, O_NONBLOCK, ...), from fdinfo.
    pub flags: u32,
    pub pos: u64,
    /// `F_SETOWN` pid (namespace pid; negative = process group) and `F_SETSIG`.
    pub owner: i32,
    pub sig: i32,
    pub kind: FileKind,
    /// Locks held on the file's inode through this description: its flock and OFD locks,
    /// and the POSIX (fcntl) locks of processes that set them through it.
    #[serde(default)]
    pub locks: Vec<FileLock>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum LockKind {
    /// `fcntl(F_SETLK)`: owned by a process (its fd table), released by any close.
    Posix,
    /// `flock()`: owned by the open file description.
    Flock,
    /// `fcntl(F_OFD_SETLK)`: a byte range owned by the open file description.
    Ofd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileLock {
    pub kind: LockKind,
    pub write: bool,
    /// Byte range `start..=end`; `end` is `u64::MAX` for "to EOF" (and for flock).
    pub start: u64,
    pub end: u64,
    /// For [`LockKind::Posix`], the owning process (namespace pid); 0 otherwise.
    pub pid: i32,
}

impl FileLock {
    /// `(l_start, l_len)` of a `struct flock` for the range (`l_len` 0 = to EOF).
    pub fn range(&self) -> (i64, i64) {
        let start = i64::try_from(self.start).unwrap_or(i64::MAX);
        if self.end == u64::MAX || self.end == i64::MAX as u64 {
            return (start, 0);
        }
        let len = self.end.saturating_sub(self.start).saturating_add(1);
        (start, i64::try_from(len).unwrap_or(0))
    }
}

/// An AF_UNIX socket without a name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnixSocket {
    /// The socket's inode number on the source, which pairs it with its peer in the image.
    pub ino: u64,
    /// The peer's inode: both ends of a socketpair are in the vkernel. 0 when there is none.
    pub peer: u64,
    /// Connected once, but the peer has been closed since (`peer` is 0): recreated as a
    /// socketpair whose other end is closed after its data is queued.
    pub peer_closed: bool,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub sock_type: i32,
    /// Unread data queued for this end, oldest first: one entry per message for datagrams
    /// and seqpackets, the whole byte stream in one entry for a stream.
    pub queue: Vec<Vec<u8>>,
    /// `SO_SNDBUF`/`SO_RCVBUF` as getsockopt reports them (twice what setsockopt takes).
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// `SO_PEEK_OFF` (-1: off).
    pub peek_off: i32,
    /// `sk_shutdown`: 1 = no more receiving, 2 = no more sending.
    pub shutdown: u8,
    /// The filesystem path an unconnected datagram socket is bound to (UML's mconsole),
    /// which restore binds again.
    #[serde(default)]
    pub bound: Option<String>,
}

/// One registration of an epoll instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollItem {
    /// The fd number the item was added with: the kernel keys items by (file, fd number), so
    /// later `EPOLL_CTL_MOD`/`DEL` calls find them only under the same number.
    pub tfd: i32,
    /// Index into [`Vkernel::files`] of the target.
    pub file: u32,
    /// `EPOLL*` mask including `EPOLLET`, `EPOLLONESHOT`, `EPOLLEXCLUSIVE`, `EPOLLWAKEUP`.
    pub events: u32,
    /// `epoll_data`, bit-exact.
    pub data: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimerFd {
    pub clockid: i32,
    /// `TFD_TIMER_ABSTIME` (1), `TFD_TIMER_CANCEL_ON_SET` (2) as last set.
    pub settime_flags: u32,
    /// Time left to the next expiry (0 = disarmed) and the interval, in nanoseconds.
    pub value_ns: u64,
    pub interval_ns: u64,
    /// The next expiry on the timer's clock as the vkernel reads it (inside its time
    /// namespace); 0 = disarmed. Restore re-arms at this deadline, so that the time a restore
    /// takes (which the vkernel's clocks see pass) counts as it does for every other timer.
    pub deadline_ns: i128,
    /// Expirations not yet read.
    pub ticks: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum FileKind {
    Regular {
        path: String,
    },
    Directory {
        path: String,
    },
    /// A character device opened by path (/dev/null, /dev/zero, /dev/urandom...).
    CharDevice {
        path: String,
        rdev: u64,
    },
    /// One end of a pipe; the contents live in [`Vkernel::pipes`].
    Pipe {
        pipe: u32,
        write_end: bool,
    },
    /// A memory object also held as an fd.
    Object {
        id: u32,
    },
    /// The slave side of the console pty held by the shim.
    Console,
    EventFd {
        count: u64,
        semaphore: bool,
    },
    /// A pidfd of a process of the vkernel (namespace pid), or of a process that has exited
    /// and been reaped (`pid` 0).
    PidFd {
        pid: i32,
    },
    UnixSocket(UnixSocket),
    /// An epoll instance and its registrations (in the kernel's order).
    Epoll {
        items: Vec<EpollItem>,
    },
    /// A signalfd: the signals it reads (bit `n-1` = signal `n`).
    SignalFd {
        mask: u64,
    },
    TimerFd(TimerFd),
    /// A `/dev/net/tun` fd attached (`TUNSETIFF`) to the device [`Vkernel::net`] names.
    Tun {
        ifname: String,
        /// `TUNGETIFF` flags (see [`crate::net::tun_flags`]), `IFF_PERSIST` included.
        flags: u16,
        /// `TUNGETVNETHDRSZ` (only meaningful with `IFF_VNET_HDR`).
        vnet_hdr_sz: i32,
        /// `TUNGETSNDBUF`.
        sndbuf: i32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pipe {
    pub id: u32,
    /// Bytes that were buffered, unread, at the freeze.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub capacity: u32,
    /// For a named pipe (FIFO): its path, which restore opens again.
    #[serde(default)]
    pub fifo: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Console {
    /// `struct termios` (the kernel's, 60 bytes on x86_64) as bytes.
    #[serde(with = "serde_bytes")]
    pub termios: Vec<u8>,
    pub rows: u16,
    pub cols: u16,
}

impl Vkernel {
    /// Total bytes of private memory and objects the vkernel maps, for `ps` and `inspect`.
    pub fn mapped_bytes(&self) -> u64 {
        let vmas: u64 = self
            .mms
            .iter()
            .flat_map(|m| m.vmas.iter())
            .filter(|v| matches!(v.backing, Backing::Anon))
            .map(|v| v.end.saturating_sub(v.start))
            .sum();
        vmas + self.objects.iter().map(|o| o.size).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ranges_as_struct_flock() {
        let l = |start, end| FileLock {
            kind: LockKind::Posix,
            write: true,
            start,
            end,
            pid: 1,
        };
        assert_eq!(l(0, u64::MAX).range(), (0, 0));
        assert_eq!(l(1000, i64::MAX as u64).range(), (1000, 0));
        assert_eq!(l(0, 99).range(), (0, 100));
        assert_eq!(l(200, 200).range(), (200, 1));
    }
}
