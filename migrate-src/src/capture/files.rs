//! File descriptors: the fd tables, the open file descriptions behind them (found shared with
//! kcmp), pipe contents (read without consuming them), the console.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use vkm_common::model::{
    Console, EpollItem, Fd, FdTable, FileKind, FileLock, LockKind, OpenFile, Pipe, TimerFd,
    UnixSocket,
};
use vkm_common::procfs;
use vkm_sys::sockdiag::{self, SockDiag};
use vkm_sys::{calls, proc};

use super::memory::MemoryCapture;
use crate::SrcError;

/// Character devices that mean the same thing on every host and carry no state.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

pub struct FileCapture<'a> {
    host_to_ns: &'a BTreeMap<i32, i32>,
    console_tty: Option<&'a str>,
    files: Vec<OpenFile>,
    /// For each open file: one (host pid, fd) that holds it, to compare new fds against.
    holders: Vec<(i32, i32, String)>,
    /// Pipe inode → pipe id.
    pipe_ids: BTreeMap<u64, u32>,
    pipes: Vec<Pipe>,
    /// Where the console can be opened to read its settings.
    console_path: Option<std::path::PathBuf>,
    /// sock_diag socket in the vkernel's network namespace, made for the first socket.
    diag: Option<SockDiag>,
    /// Inodes of every socket some task of the vkernel holds, gathered for the first socket.
    vk_sockets: Option<BTreeSet<u64>>,
    /// Epoll instances of the table being captured whose targets are resolved once all of
    /// the table's fds are known: (file id, epoll fd, the fdinfo's `tfd` lines).
    epolls: Vec<(u32, i32, Vec<procfs::EpollTarget>)>,
    /// A pidfd of the process whose fd table is being read, for duplicating its fds.
    pidfd: Option<(i32, OwnedFd)>,
}

impl<'a> FileCapture<'a> {
    pub fn new(host_to_ns: &'a BTreeMap<i32, i32>, console_tty: Option<&'a str>) -> Self {
        FileCapture {
            host_to_ns,
            console_tty,
            files: Vec::new(),
            holders: Vec::new(),
            pipe_ids: BTreeMap::new(),
            pipes: Vec::new(),
            console_path: None,
            diag: None,
            vk_sockets: None,
            epolls: Vec::new(),
            pidfd: None,
        }
    }

    /// A duplicate of fd `fd` of process `pid` (the same open file description), through one
    /// pidfd per process rather than one per fd.
    fn dup_fd(&mut self, pid: i32, fd: i32) -> Result<OwnedFd, SrcError> {
        if self.pidfd.as_ref().is_none_or(|(p, _)| *p != pid) {
            self.pidfd = Some((pid, calls::pidfd_open(pid)?));
        }
        let (_, pidfd) = self.pidfd.as_ref().ok_or(SrcError::Vanished { pid })?;
        Ok(calls::pidfd_getfd(pidfd, fd, pid)?)
    }

    pub fn capture_table(
        &mut self,
        id: u32,
        pid: i32,
        mem: &mut MemoryCapture,
    ) -> Result<FdTable, SrcError> {
        let ns_pid = self.host_to_ns.get(&pid).copied().unwrap_or(0);
        let mut fds = Vec::new();
        for fd in proc::list_numeric(proc::pid_path(pid, "fd"))? {
            let link = proc::readlink(proc::pid_path(pid, &format!("fd/{fd}")))?;
            let info_text = proc::read(proc::pid_path(pid, &format!("fdinfo/{fd}")))?;
            let info = procfs::parse_fdinfo(&info_text).map_err(|source| SrcError::Parse {
                what: "fdinfo",
                pid,
                source,
            })?;
            let cloexec = info.flags & (libc::O_CLOEXEC as u32) != 0;
            // The same description as one we already have? (dup, fork, CLONE_FILES siblings)
            let mut file = None;
            for (i, (hp, hfd, hlink)) in self.holders.iter().enumerate() {
                if *hlink == link
                    && calls::kcmp_same(*hp, pid, calls::KCMP_FILE, *hfd as u64, fd as u64)?
                {
                    file = Some(u32::try_from(i).unwrap_or(u32::MAX));
                    break;
                }
            }
            let file = match file {
                Some(f) => f,
                None => {
                    let kind = self.classify(pid, ns_pid, fd, &link, &info, mem)?;
                    let dup = self.dup_fd(pid, fd)?;
                    let (owner, sig) = owner_and_sig(&dup, self.host_to_ns);
                    let fid = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
                    if matches!(kind, FileKind::Epoll { .. }) {
                        self.epolls.push((fid, fd, info.epoll.clone()));
                    }
                    self.files.push(OpenFile {
                        id: fid,
                        flags: info.flags & !(libc::O_CLOEXEC as u32),
                        pos: u64::try_from(info.pos).unwrap_or(0),
                        owner,
                        sig,
                        kind,
                        locks: Vec::new(),
                    });
                    self.holders.push((pid, fd, link));
                    fid
                }
            };
            self.add_locks(ns_pid, fd, file, &info)?;
            fds.push(Fd { fd, file, cloexec });
        }
        self.resolve_epolls(pid, ns_pid, &fds)?;
        Ok(FdTable { id, fds })
    }

    /// The `lock:` lines of an fd's fdinfo, onto its open file description (each lock once,
    /// however many fds show it).
    fn add_locks(
        &mut self,
        ns_pid: i32,
        fd: i32,
        file: u32,
        info: &procfs::FdInfo,
    ) -> Result<(), SrcError> {
        for (_, v) in info.other.iter().filter(|(k, _)| k == "lock") {
            let Some(l) = parse_lock(v) else {
                return Err(SrcError::UnsupportedFd {
                    pid: ns_pid,
                    fd,
                    kind: format!("a file with a lock of an unsupported kind ({v})"),
                });
            };
            let lock = FileLock {
                pid: if l.kind == LockKind::Posix {
                    self.host_to_ns.get(&l.pid).copied().unwrap_or(ns_pid)
                } else {
                    0
                },
                ..l
            };
            if let Some(f) = self.files.get_mut(file as usize) {
                if !f.locks.contains(&lock) {
                    f.locks.push(lock);
                }
            }
        }
        Ok(())
    }

    /// Map every registration of the table's new epoll instances to the open file it
    /// watches: normally the file at fd `tfd` of the same process; kcmp says for sure.
    fn resolve_epolls(&mut self, pid: i32, ns_pid: i32, fds: &[Fd]) -> Result<(), SrcError> {
        for (fid, epfd, targets) in std::mem::take(&mut self.epolls) {
            let mut items = Vec::with_capacity(targets.len());
            for (i, t) in targets.iter().enumerate() {
                // Items with the same fd number are told apart by their rank (`toff`).
                let toff = targets[..i].iter().filter(|o| o.tfd == t.tfd).count();
                let toff = u32::try_from(toff).unwrap_or(u32::MAX);
                let same = |e: &&Fd| {
                    calls::kcmp_epoll_tfd(pid, e.fd, pid, epfd, t.tfd, toff).unwrap_or(false)
                };
                let found = fds
                    .iter()
                    .filter(|e| e.fd == t.tfd)
                    .find(same)
                    .or_else(|| fds.iter().find(same));
                let Some(e) = found else {
                    return Err(SrcError::UnsupportedFd {
                        pid: ns_pid,
                        fd: epfd,
                        kind: format!(
                            "an epoll watching fd {}, whose file this process no longer holds",
                            t.tfd
                        ),
                    });
                };
                items.push(EpollItem {
                    tfd: t.tfd,
                    file: e.file,
                    events: t.events,
                    data: t.data,
                });
            }
            if let Some(f) = self.files.get_mut(fid as usize) {
                f.kind = FileKind::Epoll { items };
            }
        }
        Ok(())
    }

    fn classify(
        &mut self,
        pid: i32,
        ns_pid: i32,
        fd: i32,
        link: &str,
        info: &procfs::FdInfo,
        mem: &mut MemoryCapture,
    ) -> Result<FileKind, SrcError> {
        let fd_path = proc::pid_path(pid, &format!("fd/{fd}"));
        let unsupported = |kind: &str| SrcError::UnsupportedFd {
            pid: ns_pid,
            fd,
            kind: kind.to_string(),
        };
        if let Some(ino) = link
            .strip_prefix("pipe:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            let ino: u64 = ino.parse().map_err(|_| unsupported(link))?;
            let write_end = info.flags & (libc::O_ACCMODE as u32) == libc::O_WRONLY as u32;
            let pipe = self.pipe_id(ino, &fd_path, None)?;
            return Ok(FileKind::Pipe { pipe, write_end });
        }
        if link == "anon_inode:[eventfd]" {
            let ev = info
                .eventfd
                .as_ref()
                .ok_or_else(|| unsupported("eventfd without a readable count"))?;
            return Ok(FileKind::EventFd {
                count: ev.count,
                semaphore: ev.semaphore,
            });
        }
        if link == "anon_inode:[eventpoll]" {
            // Registrations are filled in by `resolve_epolls` once the table is complete.
            return Ok(FileKind::Epoll { items: Vec::new() });
        }
        if link == "anon_inode:[signalfd]" {
            let mask = info
                .signalfd_sigmask
                .ok_or_else(|| unsupported("signalfd without a sigmask"))?;
            return Ok(FileKind::SignalFd { mask });
        }
        if link == "anon_inode:[timerfd]" {
            // fdinfo shows an expired periodic timer as 0 ns left with one tick: the missed
            // periods are counted only when it is read or asked for its time. Ask (on a
            // duplicate), then read fdinfo again for the updated count.
            let dup = self.dup_fd(pid, fd)?;
            let (value_ns, interval_ns) = calls::timerfd_gettime(&dup)?;
            let text = proc::read(proc::pid_path(pid, &format!("fdinfo/{fd}")))?;
            let again = procfs::parse_fdinfo(&text).map_err(|source| SrcError::Parse {
                what: "fdinfo",
                pid,
                source,
            })?;
            let t = again
                .timerfd
                .as_ref()
                .ok_or_else(|| unsupported("timerfd without its settings"))?;
            let mut state = timerfd_state(t);
            state.value_ns = value_ns;
            state.interval_ns = interval_ns;
            state.deadline_ns = if value_ns == 0 {
                0
            } else {
                vk_clock_now(pid, t.clockid)? + i128::from(value_ns)
            };
            return Ok(FileKind::TimerFd(state));
        }
        if let Some(ino) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            let ino: u64 = ino.parse().map_err(|_| unsupported(link))?;
            return self.unix_socket(pid, fd, ino, link, &unsupported);
        }
        if link == "anon_inode:[pidfd]" {
            let host: i32 = info
                .other
                .iter()
                .find(|(k, _)| k == "Pid")
                .and_then(|(_, v)| v.trim().parse().ok())
                .ok_or_else(|| unsupported("pidfd without a pid"))?;
            // -1: the process is gone (exited and reaped); such a pidfd is still meaningful.
            let pid = if host == -1 {
                0
            } else {
                self.host_to_ns.get(&host).copied().ok_or_else(|| {
                    unsupported(&format!(
                        "pidfd of process {host}, which is not part of the vkernel"
                    ))
                })?
            };
            return Ok(FileKind::PidFd { pid });
        }
        if Some(link) == self.console_tty {
            self.console_path = Some(fd_path);
            return Ok(FileKind::Console);
        }
        // A memfd, or an unlinked file on tmpfs (UML's RAM file, O_TMPFILE), is memory only:
        // carried as a memory object. An unlinked file on a disk would need its contents,
        // which an image does not carry.
        let deleted = link.ends_with(" (deleted)");
        let memory_only = link.starts_with("/memfd:")
            || (deleted
                && nix::sys::statfs::statfs(&fd_path)
                    .is_ok_and(|f| f.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC));
        if memory_only {
            let meta = std::fs::metadata(&fd_path).map_err(|e| vkm_sys::SysError::Path {
                path: fd_path.clone(),
                source: e,
            })?;
            let id = mem.object_by_inode(meta.dev(), meta.ino(), link, &fd_path)?;
            return Ok(FileKind::Object { id });
        }
        if !link.starts_with('/') {
            return Err(unsupported(link));
        }
        if deleted {
            return Err(unsupported(&format!("a deleted file {link}")));
        }
        let meta = std::fs::metadata(&fd_path).map_err(|e| vkm_sys::SysError::Path {
            path: fd_path.clone(),
            source: e,
        })?;
        let ft = meta.file_type();
        if ft.is_fifo() {
            // A named pipe: its buffer is a pipe like any other, reached again by its path.
            let write_end = info.flags & (libc::O_ACCMODE as u32) == libc::O_WRONLY as u32;
            let pipe = self.pipe_id(meta.ino(), &fd_path, Some(link))?;
            return Ok(FileKind::Pipe { pipe, write_end });
        }
        if ft.is_char_device() && link == "/dev/net/tun" {
            return self.tun(pid, fd, &unsupported);
        }
        if ft.is_file() {
            Ok(FileKind::Regular {
                path: link.to_string(),
            })
        } else if ft.is_dir() {
            Ok(FileKind::Directory {
                path: link.to_string(),
            })
        } else if ft.is_char_device() && STATELESS_DEVICES.contains(&link) {
            Ok(FileKind::CharDevice {
                path: link.to_string(),
                rdev: meta.rdev(),
            })
        } else {
            Err(unsupported(&format!("{link} (a {})", describe(&ft))))
        }
    }

    /// A `/dev/net/tun` fd: which device it is attached to, and how. One that was never
    /// attached (`TUNSETIFF` not called yet) has nothing to restore but cannot be told apart
    /// from a detached queue, so it is refused.
    fn tun(
        &mut self,
        pid: i32,
        fd: i32,
        unsupported: &dyn Fn(&str) -> SrcError,
    ) -> Result<FileKind, SrcError> {
        let dup = self.dup_fd(pid, fd)?;
        let (ifname, flags) = vkm_sys::tun::get_iff(dup.as_fd())
            .map_err(|_| unsupported("/dev/net/tun not attached to a device"))?;
        Ok(FileKind::Tun {
            ifname,
            flags,
            vnet_hdr_sz: vkm_sys::tun::get_vnet_hdr_sz(dup.as_fd())?,
            sndbuf: vkm_sys::tun::get_sndbuf(dup.as_fd())?,
        })
    }

    /// An AF_UNIX socket without a name, whose peer (if any) the vkernel holds, with the data
    /// queued for it read without consuming it.
    fn unix_socket(
        &mut self,
        pid: i32,
        fd: i32,
        ino: u64,
        link: &str,
        unsupported: &dyn Fn(&str) -> SrcError,
    ) -> Result<FileKind, SrcError> {
        let sock = self.dup_fd(pid, fd)?;
        let family =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(sock.as_raw_fd())
                .ok()
                .and_then(|a| nix::sys::socket::SockaddrLike::family(&a));
        if family != Some(nix::sys::socket::AddressFamily::Unix) {
            return Err(unsupported(&format!(
                "{link}, {} socket",
                family_name(family)
            )));
        }
        if self.diag.is_none() {
            self.diag = Some(SockDiag::for_pid(pid)?);
        }
        let d = match self.diag.as_mut() {
            Some(diag) => diag.unix(u32::try_from(ino).unwrap_or(0))?,
            None => return Err(unsupported(link)),
        };
        // A datagram socket bound to a path and connected to nothing is reached again by
        // binding the path (UML's mconsole); other named sockets have peers outside.
        let bound = match &d.name {
            None => None,
            Some(name)
                if name.first() == Some(&b'/')
                    && i32::from(d.sock_type) == libc::SOCK_DGRAM
                    && d.peer == 0 =>
            {
                // The kernel may count the terminating NUL of a path in the address length.
                let path = name.split(|&b| b == 0).next().unwrap_or(name);
                Some(String::from_utf8_lossy(path).into_owned())
            }
            Some(name) => {
                return Err(unsupported(&format!(
                    "{link}, a unix socket bound to {}",
                    unix_name(name)
                )))
            }
        };
        if d.state == sockdiag::STATE_LISTEN {
            return Err(unsupported(&format!("{link}, a listening unix socket")));
        }
        let sock_type = i32::from(d.sock_type);
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&sock_type) {
            return Err(unsupported(&format!(
                "{link}, a unix socket of type {sock_type}"
            )));
        }
        let peer = u64::from(d.peer);
        if peer != 0 && !self.vkernel_sockets()?.contains(&peer) {
            return Err(unsupported(&format!(
                "{link}, a unix socket connected to socket:[{peer}] outside the vkernel"
            )));
        }
        let sndbuf = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::SndBuf)
            .map_err(|e| calls::errno("getsockopt(SO_SNDBUF)", pid, e as i32))?;
        let rcvbuf = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::RcvBuf)
            .map_err(|e| calls::errno("getsockopt(SO_RCVBUF)", pid, e as i32))?;
        let peek_off = calls::getsockopt_int(
            &sock,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            "getsockopt(SO_PEEK_OFF)",
        )?;
        let queue = peek_queue(&sock, sock_type, d.shutdown, peek_off)?
            .map_err(|why| unsupported(&format!("{link}, a unix socket with {why}")))?;
        Ok(FileKind::UnixSocket(UnixSocket {
            ino,
            peer,
            peer_closed: peer == 0 && d.state == sockdiag::STATE_ESTABLISHED,
            sock_type,
            queue,
            sndbuf: u32::try_from(sndbuf).unwrap_or(u32::MAX),
            rcvbuf: u32::try_from(rcvbuf).unwrap_or(u32::MAX),
            peek_off,
            shutdown: d.shutdown,
            bound,
        }))
    }

    /// Inodes of the sockets that any task of the vkernel holds.
    fn vkernel_sockets(&mut self) -> Result<&BTreeSet<u64>, SrcError> {
        if self.vk_sockets.is_none() {
            let mut set = BTreeSet::new();
            // By process: the image holds one fd table per process, which its threads share.
            for &host in self.host_to_ns.keys() {
                let dir = proc::pid_path(host, "fd");
                let Ok(fds) = proc::list_numeric(&dir) else {
                    continue;
                };
                for fd in fds {
                    if let Ok(l) = proc::readlink(dir.join(fd.to_string())) {
                        if let Some(i) = l
                            .strip_prefix("socket:[")
                            .and_then(|s| s.strip_suffix(']'))
                            .and_then(|s| s.parse().ok())
                        {
                            set.insert(i);
                        }
                    }
                }
            }
            self.vk_sockets = Some(set);
        }
        Ok(self.vk_sockets.get_or_insert_with(BTreeSet::new))
    }

    /// The id of the pipe with inode `ino`, reading its buffered bytes on first sight.
    fn pipe_id(
        &mut self,
        ino: u64,
        fd_path: &std::path::Path,
        fifo: Option<&str>,
    ) -> Result<u32, SrcError> {
        if let Some(&p) = self.pipe_ids.get(&ino) {
            return Ok(p);
        }
        let (data, capacity) = pipe_contents(fd_path)?;
        let id = u32::try_from(self.pipes.len()).unwrap_or(u32::MAX);
        self.pipes.push(Pipe {
            id,
            data,
            capacity,
            fifo: fifo.map(str::to_string),
        });
        self.pipe_ids.insert(ino, id);
        Ok(id)
    }

    /// Settings of the console pty, when some process holds it.
    pub fn console(&self) -> Result<Option<Console>, SrcError> {
        let Some(path) = &self.console_path else {
            return Ok(None);
        };
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| vkm_sys::SysError::Path {
                path: path.clone(),
                source: e,
            })?;
        let termios = calls::tcgets(&f)?;
        let (rows, cols) = calls::get_winsize(&f)?;
        Ok(Some(Console {
            termios,
            rows,
            cols,
        }))
    }

    pub fn finish(self) -> (Vec<OpenFile>, Vec<Pipe>) {
        (self.files, self.pipes)
    }
}

fn describe(ft: &std::fs::FileType) -> &'static str {
    if ft.is_socket() {
        "socket"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// The bytes buffered in a pipe, without consuming them: open the pipe anew for reading and
/// `tee` its contents into a private pipe.
fn pipe_contents(fd_path: &std::path::Path) -> Result<(Vec<u8>, u32), SrcError> {
    let src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fd_path)
        .map_err(|e| vkm_sys::SysError::Path {
            path: fd_path.to_path_buf(),
            source: e,
        })?;
    let capacity =
        nix::fcntl::fcntl(src.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ).map_err(|e| {
            vkm_sys::SysError::Syscall {
                op: "fcntl(F_GETPIPE_SZ)",
                pid: 0,
                source: e.into(),
            }
        })?;
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(
        nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC,
    )
    .map_err(|e| vkm_sys::SysError::Syscall {
        op: "pipe2",
        pid: 0,
        source: e.into(),
    })?;
    nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(capacity)).map_err(
        |e| vkm_sys::SysError::Syscall {
            op: "fcntl(F_SETPIPE_SZ)",
            pid: 0,
            source: e.into(),
        },
    )?;
    let n = match calls::tee(&src, &w, usize::try_from(capacity).unwrap_or(65536)) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
        Err(e) => return Err(e.into()),
    };
    drop(w);
    let mut data = Vec::with_capacity(n);
    File::from(r)
        .read_to_end(&mut data)
        .map_err(|e| vkm_sys::SysError::Syscall {
            op: "read(pipe copy)",
            pid: 0,
            source: e,
        })?;
    Ok((data, u32::try_from(capacity).unwrap_or(65536)))
}

/// `F_GETOWN_EX`/`F_GETSIG` of a description, read through a duplicate of it.
fn owner_and_sig(dup: &OwnedFd, host_to_ns: &BTreeMap<i32, i32>) -> (i32, i32) {
    // F_GETOWN gives a pid of our namespace, negative for a process group.
    let own = calls::get_owner(dup);
    let sig = calls::get_sig(dup);
    let ns_owner = if own == 0 {
        0
    } else {
        let ns = host_to_ns.get(&own.abs()).copied().unwrap_or(0);
        if own < 0 {
            -ns
        } else {
            ns
        }
    };
    (ns_owner, sig)
}

fn family_name(f: Option<nix::sys::socket::AddressFamily>) -> String {
    use nix::sys::socket::AddressFamily as F;
    match f {
        Some(F::Inet) => "an AF_INET".into(),
        Some(F::Inet6) => "an AF_INET6".into(),
        Some(F::Netlink) => "an AF_NETLINK".into(),
        Some(F::Packet) => "an AF_PACKET".into(),
        Some(F::Vsock) => "an AF_VSOCK".into(),
        Some(other) => format!("an {other:?}"),
        None => "an unnamed-family".into(),
    }
}

/// A unix socket address for messages: abstract names get the usual leading `@`.
fn unix_name(name: &[u8]) -> String {
    match name.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(name).into_owned(),
    }
}

/// Upper bound on what one socket's queue may hold (the kernel's limits are far lower).
const MAX_QUEUED: usize = 64 << 20;

/// The data queued for reading on a unix socket, without consuming it: `MSG_PEEK` with
/// `SO_PEEK_OFF` walking the queue (one message per call for datagrams and seqpackets, so
/// boundaries are kept). `Ok(Err(why))` when the queue holds what cannot be recreated
/// (passed fds or credentials). The socket's own peek offset is put back afterwards.
fn peek_queue(
    sock: &OwnedFd,
    sock_type: i32,
    shutdown: u8,
    peek_off: i32,
) -> Result<Result<Vec<Vec<u8>>, String>, SrcError> {
    let set = |v: i32| {
        calls::setsockopt_int(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            v,
            "setsockopt(SO_PEEK_OFF)",
        )
    };
    set(0)?;
    let r = peek_walk(sock, sock_type, shutdown);
    set(peek_off)?;
    r
}

fn peek_walk(
    sock: &OwnedFd,
    sock_type: i32,
    shutdown: u8,
) -> Result<Result<Vec<Vec<u8>>, String>, SrcError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let stream = sock_type == libc::SOCK_STREAM;
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    let mut flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    if !stream {
        // Datagrams: recvmsg returns the message's real length, so a short buffer shows.
        flags |= MsgFlags::MSG_TRUNC;
    }
    loop {
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 253], libc::ucred);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, truncated, cmsgs) =
            match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
                Ok(m) => {
                    let mut kinds = Vec::new();
                    let ctrunc = m.flags.contains(MsgFlags::MSG_CTRUNC);
                    if let Ok(it) = m.cmsgs() {
                        for c in it {
                            match c {
                                ControlMessageOwned::ScmRights(fds) => {
                                    for f in fds {
                                        let _ = nix::unistd::close(f);
                                    }
                                    kinds.push("file descriptors in flight");
                                }
                                ControlMessageOwned::ScmCredentials(_) => {
                                    kinds.push("credentials in flight")
                                }
                                _ => kinds.push("ancillary data in flight"),
                            }
                        }
                    }
                    if ctrunc {
                        kinds.push("ancillary data in flight");
                    }
                    (m.bytes, m.flags.contains(MsgFlags::MSG_TRUNC), kinds)
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => return Err(calls::errno("recvmsg(MSG_PEEK)", 0, e as i32).into()),
            };
        if let Some(k) = cmsgs.first() {
            return Ok(Err((*k).to_string()));
        }
        if stream {
            // A stream's recv returns 0 only at EOF with nothing left.
            if n == 0 {
                break;
            }
            let n = n.min(buf.len());
            match out.first_mut() {
                Some(v) => v.extend_from_slice(&buf[..n]),
                None => out.push(buf[..n].to_vec()),
            }
            total += n;
        } else {
            if truncated || n > buf.len() {
                if n > MAX_QUEUED {
                    return Ok(Err(format!("a {n}-byte message queued")));
                }
                // MSG_TRUNC gave the message's real length: peek it again, whole, from its
                // start (the partial peek moved the peek offset into it).
                buf.resize(n, 0);
                calls::setsockopt_int(
                    sock,
                    libc::SOL_SOCKET,
                    libc::SO_PEEK_OFF,
                    i32::try_from(total).unwrap_or(i32::MAX),
                    "setsockopt(SO_PEEK_OFF)",
                )?;
                continue;
            }
            if n == 0 && sock_type == libc::SOCK_SEQPACKET && shutdown & 1 != 0 {
                // End of file, not an empty message.
                break;
            }
            out.push(buf[..n].to_vec());
            total += n;
        }
        if total > MAX_QUEUED || out.len() > 1 << 20 {
            return Ok(Err("more than 64 MiB queued".into()));
        }
    }
    Ok(Ok(out))
}

/// A timerfd's state from its fdinfo (the deadline is filled in by the caller).
fn timerfd_state(t: &procfs::TimerFdInfo) -> TimerFd {
    let ns = |(s, n): (u64, u64)| s.saturating_mul(1_000_000_000).saturating_add(n);
    TimerFd {
        clockid: t.clockid,
        settime_flags: t.settime_flags,
        value_ns: ns(t.it_value),
        interval_ns: ns(t.it_interval),
        deadline_ns: 0,
        ticks: t.ticks,
    }
}

/// Now on `clockid` as process `pid` reads it (CLOCK_MONOTONIC and CLOCK_BOOTTIME are offset
/// by its time namespace; CLOCK_REALTIME is not namespaced).
fn vk_clock_now(pid: i32, clockid: i32) -> Result<i128, SrcError> {
    let path = proc::pid_path(pid, "timens_offsets");
    let off =
        procfs::parse_timens_offsets(&proc::read(&path)?).map_err(|source| SrcError::Parse {
            what: "timens_offsets",
            pid,
            source,
        })?;
    let ns = |o: procfs::TimeOffset| i128::from(o.secs) * 1_000_000_000 + i128::from(o.nsecs);
    Ok(match clockid {
        libc::CLOCK_MONOTONIC => calls::clock_ns(libc::CLOCK_MONOTONIC) + ns(off.monotonic),
        libc::CLOCK_BOOTTIME | libc::CLOCK_BOOTTIME_ALARM => {
            calls::clock_ns(libc::CLOCK_BOOTTIME) + ns(off.boottime)
        }
        _ => calls::clock_ns(libc::CLOCK_REALTIME),
    })
}

/// One `lock:` line of an fdinfo (`1: POSIX  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`), with
/// the pid as printed (the host's). None for leases, delegations and blocked waiters.
pub(crate) fn parse_lock(v: &str) -> Option<FileLock> {
    let mut t = v.split_whitespace();
    t.next()?.strip_suffix(':')?;
    let kind = match t.next()? {
        "POSIX" => LockKind::Posix,
        "FLOCK" => LockKind::Flock,
        "OFDLCK" => LockKind::Ofd,
        _ => return None,
    };
    if t.next()? != "ADVISORY" {
        return None;
    }
    let write = match t.next()? {
        "WRITE" => true,
        "READ" => false,
        _ => return None,
    };
    let pid: i32 = t.next()?.parse().ok()?;
    let _dev_ino = t.next()?;
    let start: u64 = t.next()?.parse().ok()?;
    let end: u64 = match t.next()? {
        "EOF" => u64::MAX,
        e => e.parse().ok()?,
    };
    if t.next().is_some() {
        return None;
    }
    Some(FileLock {
        kind,
        write,
        start,
        end,
        pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines() {
        assert_eq!(
            parse_lock("1: POSIX  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"),
            Some(FileLock {
                kind: LockKind::Posix,
                write: true,
                start: 0,
                end: u64::MAX,
                pid: 1234
            })
        );
        assert_eq!(
            parse_lock("2: POSIX  ADVISORY  READ 77 08:01:12 100 199"),
            Some(FileLock {
                kind: LockKind::Posix,
                write: false,
                start: 100,
                end: 199,
                pid: 77
            })
        );
        assert_eq!(
            parse_lock("1: FLOCK  ADVISORY  WRITE 9 00:2a:5678 0 EOF").map(|l| l.kind),
            Some(LockKind::Flock)
        );
        assert_eq!(
            parse_lock("3: OFDLCK ADVISORY  READ -1 00:2a:5678 5 9").map(|l| (l.kind, l.pid)),
            Some((LockKind::Ofd, -1))
        );
        assert_eq!(
            parse_lock("1: LEASE  ACTIVE    READ 9 00:2a:5678 0 EOF"),
            None
        );
        assert_eq!(
            parse_lock("1: -> POSIX  ADVISORY  WRITE 9 00:2a:1 0 EOF"),
            None
        );
        assert_eq!(parse_lock("garbage"), None);
    }

    #[test]
    fn timerfd_from_fdinfo() {
        let t = timerfd_state(&procfs::TimerFdInfo {
            clockid: libc::CLOCK_MONOTONIC,
            ticks: 3,
            settime_flags: 1,
            it_value: (1, 500),
            it_interval: (0, 250_000_000),
        });
        assert_eq!(t.value_ns, 1_000_000_500);
        assert_eq!(t.interval_ns, 250_000_000);
        assert_eq!(t.ticks, 3);
        assert_eq!(t.settime_flags, 1);
    }

    #[test]
    fn names_and_families() {
        assert_eq!(unix_name(b"\0abc"), "@abc");
        assert_eq!(unix_name(b"/run/x.sock"), "/run/x.sock");
        assert_eq!(
            family_name(Some(nix::sys::socket::AddressFamily::Inet)),
            "an AF_INET"
        );
    }
}
