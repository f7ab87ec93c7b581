//! Open files: the agent (shim) recreates every open file description itself, in the state
//! the vkernel had (position, status flags, owner, buffered pipe data); the restored processes
//! then pull them with `pidfd_getfd`, so every kind of fd takes the same path into the target.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use vkm_common::model::{EpollItem, FileKind, LockKind, OpenFile, TimerFd, UnixSocket, Vkernel};
use vkm_sys::calls;

use crate::DstError;

/// One agent-side fd per open file description, in the state the vkernel had (position,
/// status flags, owner); pipes are created and refilled here.
pub(crate) fn prepare(
    vk: &Vkernel,
    objects: &BTreeMap<u32, OwnedFd>,
    hosts: &BTreeMap<i32, i32>,
    console: Option<&OwnedFd>,
    net: &crate::Network,
) -> Result<Prepared, DstError> {
    // The first description on each device is the agent's own (which created it); later ones
    // are further queues of a multi-queue device.
    let mut attached_once = std::collections::BTreeSet::new();
    let mut pipes: BTreeMap<u32, (Option<OwnedFd>, Option<OwnedFd>)> = BTreeMap::new();
    // Named pipes: one read-write open that neither blocks nor needs a peer holds the buffer
    // while each description is opened from it; it lives until the vkernel holds its own.
    let mut fifo_keepers: BTreeMap<u32, OwnedFd> = BTreeMap::new();
    for p in &vk.pipes {
        if let Some(path) = &p.fifo {
            let keeper: OwnedFd = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| {
                    DstError::Sys(vkm_sys::SysError::Path {
                        path: path.into(),
                        source: e,
                    })
                })?
                .into();
            fill_pipe(&keeper, p)?;
            fifo_keepers.insert(p.id, keeper);
            continue;
        }
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| DstError::Sys(calls::errno("pipe2", 0, e as i32)))?;
        fill_pipe(&wr, p)?;
        pipes.insert(p.id, (Some(rd), Some(wr)));
    }
    let host_of = hosts;
    let mut socks = unix_sockets(vk)?;
    let mut epolls: Vec<(u32, &[EpollItem])> = Vec::new();
    let mut out = BTreeMap::new();
    for f in &vk.files {
        let fd: OwnedFd = match &f.kind {
            FileKind::Regular { path }
            | FileKind::Directory { path }
            | FileKind::CharDevice { path, .. } => {
                let acc = f.flags & libc::O_ACCMODE as u32;
                let mut oo = OpenOptions::new();
                oo.read(acc != libc::O_WRONLY as u32)
                    .write(acc != libc::O_RDONLY as u32);
                use std::os::unix::fs::OpenOptionsExt;
                let extra = f.flags as i32
                    & (libc::O_APPEND | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_PATH);
                oo.custom_flags(extra | libc::O_CLOEXEC | libc::O_NOCTTY);
                let file = oo.open(path).map_err(|e| {
                    DstError::Sys(vkm_sys::SysError::Path {
                        path: path.into(),
                        source: e,
                    })
                })?;
                if f.pos != 0 {
                    nix::unistd::lseek(
                        file.as_raw_fd(),
                        i64::try_from(f.pos).unwrap_or(0),
                        nix::unistd::Whence::SeekSet,
                    )
                    .map_err(|e| DstError::Sys(calls::errno("lseek", 0, e as i32)))?;
                }
                let fd: OwnedFd = file.into();
                take_locks(&fd, f, path)?;
                fd
            }
            FileKind::Pipe { pipe, .. } if fifo_keepers.contains_key(pipe) => {
                let keeper = fifo_keepers
                    .get(pipe)
                    .ok_or_else(|| DstError::Inconsistent(format!("fifo {pipe} missing")))?;
                open_fifo_end(keeper, f.flags)?
            }
            FileKind::Pipe { pipe, write_end } => {
                let ends = pipes
                    .get_mut(pipe)
                    .ok_or_else(|| DstError::Inconsistent(format!("pipe {pipe} missing")))?;
                let slot = if *write_end { &mut ends.1 } else { &mut ends.0 };
                match slot.take() {
                    Some(fd) => fd,
                    // A second description of the same end: a new open of the pipe.
                    None => reopen_pipe_end(&ends.0, &ends.1, *write_end)?,
                }
            }
            FileKind::Object { id } => {
                let m = objects
                    .get(id)
                    .ok_or_else(|| DstError::Inconsistent(format!("object {id} missing")))?;
                reopen(m, libc::O_RDWR as u32, 0)?
            }
            FileKind::Console => {
                let c = console.ok_or_else(|| {
                    DstError::Inconsistent("the vkernel had a console but none was given".into())
                })?;
                c.try_clone().map_err(|e| {
                    DstError::Sys(vkm_sys::SysError::Syscall {
                        op: "dup(console)",
                        pid: 0,
                        source: e,
                    })
                })?
            }
            FileKind::PidFd { pid: 0 } => dead_pidfd()?,
            FileKind::PidFd { pid } => {
                let host = host_of.get(pid).ok_or_else(|| {
                    DstError::Inconsistent(format!("pidfd of unknown process {pid}"))
                })?;
                calls::pidfd_open(*host)?
            }
            FileKind::EventFd { count, semaphore } => {
                let mut flags = nix::sys::eventfd::EfdFlags::EFD_CLOEXEC;
                if *semaphore {
                    flags |= nix::sys::eventfd::EfdFlags::EFD_SEMAPHORE;
                }
                let init = u32::try_from(*count)
                    .map_err(|_| DstError::Inconsistent("eventfd count too large".into()))?;
                nix::sys::eventfd::EventFd::from_value_and_flags(init, flags)
                    .map_err(|e| DstError::Sys(calls::errno("eventfd", 0, e as i32)))?
                    .into()
            }
            FileKind::UnixSocket(u) => socks.remove(&u.ino).ok_or_else(|| {
                DstError::Inconsistent(format!("unix socket {} appears twice", u.ino))
            })?,
            FileKind::Epoll { items } => {
                epolls.push((f.id, items));
                nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)
                    .map_err(|e| DstError::Sys(calls::errno("epoll_create1", 0, e as i32)))?
                    .0
            }
            FileKind::SignalFd { mask } => calls::signalfd(*mask, libc::SFD_CLOEXEC)?,
            FileKind::TimerFd(t) => timerfd(t, hosts)?,
            FileKind::Tun {
                ifname,
                flags,
                vnet_hdr_sz,
                sndbuf,
            } => {
                let fd = match net.attached(ifname) {
                    Some(fd) if attached_once.insert(ifname.as_str()) => {
                        fd.try_clone_to_owned().map_err(|e| {
                            DstError::Sys(vkm_sys::SysError::Syscall {
                                op: "dup(tun)",
                                pid: 0,
                                source: e,
                            })
                        })?
                    }
                    Some(_) => vkm_sys::tun::open_tun(
                        ifname,
                        *flags & !vkm_common::net::tun_flags::IFF_PERSIST,
                    )?,
                    None => {
                        return Err(DstError::Inconsistent(format!(
                            "a tun fd on {ifname}, a device the image does not describe"
                        )))
                    }
                };
                crate::net::configure_fd(&fd, *flags, *vnet_hdr_sz, *sndbuf)?;
                fd
            }
        };
        let fl = f.flags as i32
            & (libc::O_APPEND
                | libc::O_NONBLOCK
                | libc::O_ASYNC
                | libc::O_DIRECT
                | libc::O_NOATIME);
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::from_bits_truncate(fl)),
        )
        .map_err(|e| DstError::Sys(calls::errno("fcntl(F_SETFL)", 0, e as i32)))?;
        if f.owner != 0 || f.sig != 0 {
            let owner = host_of.get(&f.owner.abs()).copied().unwrap_or(0) * f.owner.signum();
            calls::set_owner_sig(&fd, owner, f.sig)?;
        }
        out.insert(f.id, fd);
    }
    register_epolls(&epolls, &out)?;
    Ok(Prepared {
        files: out,
        _keepers: fifo_keepers.into_values().collect(),
    })
}

/// The agent's side of every open file of the image, ready to be pulled by the targets.
pub(crate) struct Prepared {
    /// By open file id.
    pub files: BTreeMap<u32, OwnedFd>,
    /// Opens that keep named pipes' buffers alive until the vkernel holds its own.
    _keepers: Vec<OwnedFd>,
}

/// Every unix socket of the image, by source inode: socketpairs with the data that was queued
/// on each end, sent from the other end so that it queues on the right side; buffer sizes,
/// peek offsets and shutdown state as they were.
fn unix_sockets(vk: &Vkernel) -> Result<BTreeMap<u64, OwnedFd>, DstError> {
    let all: BTreeMap<u64, &UnixSocket> = vk
        .files
        .iter()
        .filter_map(|f| match &f.kind {
            FileKind::UnixSocket(u) => Some((u.ino, u)),
            _ => None,
        })
        .collect();
    let mut out = BTreeMap::new();
    for u in all.values() {
        if out.contains_key(&u.ino) {
            continue;
        }
        let ty = nix::sys::socket::SockType::try_from(u.sock_type).map_err(|_| {
            DstError::Inconsistent(format!("unix socket of unknown type {}", u.sock_type))
        })?;
        let sys = |op: &'static str| {
            move |e: nix::errno::Errno| DstError::Sys(calls::errno(op, 0, e as i32))
        };
        if let Some(path) = &u.bound {
            out.insert(u.ino, bind_dgram(path, u)?);
            continue;
        }
        if u.peer == 0 && !u.peer_closed {
            if !u.queue.is_empty() {
                return Err(DstError::Inconsistent(format!(
                    "unconnected unix socket {} has queued data",
                    u.ino
                )));
            }
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                ty,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(sys("socket(AF_UNIX)"))?;
            socket_options(&s, u)?;
            out.insert(u.ino, s);
            continue;
        }
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            ty,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("socketpair"))?;
        let peer = if u.peer_closed {
            None
        } else {
            Some(*all.get(&u.peer).ok_or_else(|| {
                DstError::Inconsistent(format!(
                    "unix socket {} has no peer {} in the image",
                    u.ino, u.peer
                ))
            })?)
        };
        if let Some(p) = peer {
            if p.peer != u.ino {
                return Err(DstError::Inconsistent(format!(
                    "unix sockets {} and {} disagree about being peers",
                    u.ino, p.ino
                )));
            }
        }
        fill_queue(&b, u)?;
        if let Some(p) = peer {
            fill_queue(&a, p)?;
            socket_options(&b, p)?;
            socket_options(&a, u)?;
            out.insert(p.ino, b);
        } else {
            // The peer was closed: its end goes, the data it sent stays queued on ours.
            drop(b);
            socket_options(&a, u)?;
        }
        out.insert(u.ino, a);
    }
    Ok(out)
}

/// A datagram socket bound to `path` again, with the datagrams that were queued on it (their
/// senders' addresses are not kept). A socket file left at `path` by a vkernel that is gone
/// (nothing receives on it) is replaced; a live one is not, since another process uses it.
fn bind_dgram(path: &str, u: &UnixSocket) -> Result<OwnedFd, DstError> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixDatagram;
    let p = std::path::Path::new(path);
    let path_err = |source: std::io::Error| {
        DstError::Sys(vkm_sys::SysError::Path {
            path: p.to_path_buf(),
            source,
        })
    };
    if let Ok(meta) = std::fs::symlink_metadata(p) {
        if !meta.file_type().is_socket() {
            return Err(DstError::Incompatible(format!(
                "{path}, where the vkernel's socket is bound, exists and is not a socket"
            )));
        }
        let probe = UnixDatagram::unbound().map_err(path_err)?;
        match probe.connect(p) {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(p).map_err(path_err)?
            }
            _ => {
                return Err(DstError::Incompatible(format!(
                    "the socket {path} is in use by another process (the vkernel's own socket \
                     there, e.g. UML's mconsole, must be free: stop what uses it)"
                )))
            }
        }
    }
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).map_err(path_err)?;
    }
    let sock = UnixDatagram::bind(p).map_err(path_err)?;
    let sender = UnixDatagram::unbound().map_err(path_err)?;
    for msg in &u.queue {
        sender.send_to(msg, p).map_err(path_err)?;
    }
    // std creates its sockets close-on-exec, as the agent's fds must be.
    let fd: OwnedFd = sock.into();
    socket_options(&fd, u)?;
    Ok(fd)
}

/// Queue `dest`'s saved data on it by sending it from its peer `from`, whose send buffer is
/// made large enough for the whole queue meanwhile (the data is charged to the sender).
fn fill_queue(from: &OwnedFd, dest: &UnixSocket) -> Result<(), DstError> {
    use nix::sys::socket::{send, MsgFlags};
    if dest.queue.is_empty() {
        return Ok(());
    }
    let total: usize = dest.queue.iter().map(|m| m.len() + 1024).sum();
    set_buf(from, true, total.saturating_mul(2).saturating_add(1 << 18))?;
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    for msg in &dest.queue {
        if dest.sock_type == libc::SOCK_STREAM {
            let mut off = 0;
            while off < msg.len() {
                off += send(from.as_raw_fd(), &msg[off..], flags)
                    .map_err(|e| DstError::Sys(calls::errno("send(unix queue)", 0, e as i32)))?;
            }
        } else {
            let n = send(from.as_raw_fd(), msg, flags)
                .map_err(|e| DstError::Sys(calls::errno("send(unix queue)", 0, e as i32)))?;
            if n != msg.len() {
                return Err(DstError::Inconsistent(format!(
                    "a {}-byte message was queued as {n} bytes",
                    msg.len()
                )));
            }
        }
    }
    Ok(())
}

/// `SO_SNDBUF`/`SO_RCVBUF` to `reported` (the value getsockopt gives, twice the one set),
/// beyond the sysctl limits where we may (`*BUFFORCE` needs CAP_NET_ADMIN).
fn set_buf(s: &OwnedFd, send: bool, reported: usize) -> Result<(), DstError> {
    let v = i32::try_from(reported / 2).unwrap_or(i32::MAX / 2);
    let (force, plain) = if send {
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)
    } else {
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)
    };
    if calls::setsockopt_int(s, libc::SOL_SOCKET, force, v, "setsockopt(SO_*BUFFORCE)").is_ok() {
        return Ok(());
    }
    calls::setsockopt_int(
        s,
        libc::SOL_SOCKET,
        plain,
        v,
        "setsockopt(SO_SNDBUF/SO_RCVBUF)",
    )?;
    Ok(())
}

fn socket_options(s: &OwnedFd, u: &UnixSocket) -> Result<(), DstError> {
    set_buf(s, true, u.sndbuf as usize)?;
    set_buf(s, false, u.rcvbuf as usize)?;
    if u.peek_off >= 0 {
        calls::setsockopt_int(
            s,
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            u.peek_off,
            "setsockopt(SO_PEEK_OFF)",
        )?;
    }
    let how = match u.shutdown & 3 {
        1 => Some(nix::sys::socket::Shutdown::Read),
        2 => Some(nix::sys::socket::Shutdown::Write),
        3 => Some(nix::sys::socket::Shutdown::Both),
        _ => None,
    };
    if let Some(how) = how {
        match nix::sys::socket::shutdown(s.as_raw_fd(), how) {
            // A socket whose peer is gone may already be shut down, or no longer connected.
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => {}
            Err(e) => return Err(DstError::Sys(calls::errno("shutdown", 0, e as i32))),
        }
    }
    Ok(())
}

/// Add every epoll registration under the fd number it had, which the kernel keys items by
/// (later `EPOLL_CTL_MOD`/`DEL` calls of the vkernel look items up by it): in a thread with a
/// private copy of our fd table, each target is dup'ed to its old number and added there.
/// The private table goes with the thread; the items stay, because the files stay open.
fn register_epolls(
    epolls: &[(u32, &[EpollItem])],
    files: &BTreeMap<u32, OwnedFd>,
) -> Result<(), DstError> {
    if epolls.iter().all(|(_, items)| items.is_empty()) {
        return Ok(());
    }
    let raw = |id: u32| {
        files
            .get(&id)
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| DstError::Inconsistent(format!("epoll file {id} missing")))
    };
    let mut high = files.values().map(|f| f.as_raw_fd()).max().unwrap_or(0);
    for (_, items) in epolls {
        for it in items.iter() {
            high = high.max(it.tfd);
        }
    }
    let base = high + 1;
    let sys =
        |op: &'static str| move |e: nix::errno::Errno| DstError::Sys(calls::errno(op, 0, e as i32));
    std::thread::scope(|s| {
        s.spawn(|| -> Result<(), DstError> {
            calls::unshare(libc::CLONE_FILES)?;
            // Copies above every number we dup onto, so that no dup3 below replaces a file
            // that is still needed (all of these are numbers of the private table).
            let mut up: BTreeMap<u32, i32> = BTreeMap::new();
            for (ep, items) in epolls {
                for id in std::iter::once(*ep).chain(items.iter().map(|i| i.file)) {
                    if let std::collections::btree_map::Entry::Vacant(v) = up.entry(id) {
                        let n = nix::fcntl::fcntl(
                            raw(id)?,
                            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(base),
                        )
                        .map_err(sys("fcntl(F_DUPFD_CLOEXEC)"))?;
                        v.insert(n);
                    }
                }
            }
            for (ep, items) in epolls {
                let epfd = up[ep];
                for it in items.iter() {
                    nix::unistd::dup3(up[&it.file], it.tfd, nix::fcntl::OFlag::O_CLOEXEC)
                        .map_err(sys("dup3(epoll target)"))?;
                    calls::epoll_add_raw(&epfd, it.tfd, it.events, it.data)?;
                    let _ = nix::unistd::close(it.tfd);
                }
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(DstError::Inconsistent(
                "epoll helper thread panicked".into(),
            ))
        })
    })
}

/// A timerfd armed as it was: at the same deadline on its clock as the vkernel sees it (the
/// restored processes' time namespace tells how that clock relates to ours), so that the time
/// a restore takes counts as it does for every other timer of the vkernel; periods missed
/// meanwhile and expirations not yet read are put back as unread expirations. The timer is
/// armed absolute, whatever its flags were (`TFD_TIMER_CANCEL_ON_SET` is kept).
fn timerfd(t: &TimerFd, hosts: &BTreeMap<i32, i32>) -> Result<OwnedFd, DstError> {
    let fd = calls::timerfd_create(t.clockid, libc::TFD_CLOEXEC)?;
    let mut ticks = t.ticks;
    if t.deadline_ns != 0 {
        let (base, offset) = clock_offset(t.clockid, hosts)?;
        let now = calls::clock_ns(base);
        let interval = i128::from(t.interval_ns);
        let mut deadline = t.deadline_ns - offset;
        if deadline <= now {
            if interval > 0 {
                let missed = (now - deadline) / interval + 1;
                deadline += missed * interval;
                ticks = ticks.saturating_add(u64::try_from(missed).unwrap_or(u64::MAX));
            } else {
                ticks = ticks.saturating_add(1);
                deadline = 0;
            }
        }
        if deadline != 0 {
            let flags =
                libc::TFD_TIMER_ABSTIME | (t.settime_flags as i32 & libc::TFD_TIMER_CANCEL_ON_SET);
            calls::timerfd_settime(&fd, flags, deadline, interval)?;
        }
    }
    if ticks != 0 {
        calls::timerfd_set_ticks(&fd, ticks)?;
    }
    Ok(fd)
}

/// The host clock behind `clockid` and how far the restored vkernel's view of it is ahead.
fn clock_offset(clockid: i32, hosts: &BTreeMap<i32, i32>) -> Result<(i32, i128), DstError> {
    let base = match clockid {
        libc::CLOCK_MONOTONIC => libc::CLOCK_MONOTONIC,
        libc::CLOCK_BOOTTIME | libc::CLOCK_BOOTTIME_ALARM => libc::CLOCK_BOOTTIME,
        _ => return Ok((libc::CLOCK_REALTIME, 0)),
    };
    let host = hosts
        .values()
        .next()
        .copied()
        .ok_or_else(|| DstError::Inconsistent("no restored process".into()))?;
    let path = format!("/proc/{host}/timens_offsets");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        DstError::Sys(vkm_sys::SysError::Path {
            path: path.clone().into(),
            source: e,
        })
    })?;
    let off = vkm_common::procfs::parse_timens_offsets(&text).map_err(|source| {
        DstError::Sys(vkm_sys::SysError::Parse {
            path: path.into(),
            source,
        })
    })?;
    let o = if base == libc::CLOCK_MONOTONIC {
        off.monotonic
    } else {
        off.boottime
    };
    Ok((
        base,
        i128::from(o.secs) * 1_000_000_000 + i128::from(o.nsecs),
    ))
}

/// flock and OFD locks belong to the open file description: take them again on ours.
/// (POSIX locks belong to processes; restore sets them from inside each owner.)
fn take_locks(fd: &OwnedFd, f: &OpenFile, path: &str) -> Result<(), DstError> {
    for l in &f.locks {
        let r = match l.kind {
            LockKind::Posix => continue,
            LockKind::Flock => calls::flock(
                fd,
                if l.write {
                    libc::LOCK_EX
                } else {
                    libc::LOCK_SH
                } | libc::LOCK_NB,
            ),
            LockKind::Ofd => {
                let (start, len) = l.range();
                calls::ofd_setlk(fd, l.write, start, len)
            }
        };
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => DstError::Incompatible(format!(
                "another process holds a lock on {path} that the vkernel held"
            )),
            _ => DstError::Sys(e),
        })?;
    }
    Ok(())
}

/// Put a pipe's saved bytes back into it, at its saved capacity.
fn fill_pipe(wr: &OwnedFd, p: &vkm_common::model::Pipe) -> Result<(), DstError> {
    if p.capacity > 0 {
        let cap = i32::try_from(p.capacity).unwrap_or(65536);
        nix::fcntl::fcntl(wr.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(cap))
            .map_err(|e| DstError::Sys(calls::errno("fcntl(F_SETPIPE_SZ)", 0, e as i32)))?;
    }
    let mut off = 0;
    while off < p.data.len() {
        let n = nix::unistd::write(wr, &p.data[off..])
            .map_err(|e| DstError::Sys(calls::errno("write(pipe)", 0, e as i32)))?;
        off += n;
    }
    Ok(())
}

/// A new description of a named pipe with the access mode in `flags`, opened through the
/// keeper so that it neither blocks nor fails for want of a peer.
fn open_fifo_end(keeper: &OwnedFd, flags: u32) -> Result<OwnedFd, DstError> {
    reopen(keeper, flags, libc::O_NONBLOCK)
}

fn reopen_pipe_end(
    rd: &Option<OwnedFd>,
    wr: &Option<OwnedFd>,
    write_end: bool,
) -> Result<OwnedFd, DstError> {
    let any = rd
        .as_ref()
        .or(wr.as_ref())
        .ok_or_else(|| DstError::Inconsistent("pipe has no end left".into()))?;
    let acc = if write_end {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    reopen(any, acc as u32, libc::O_NONBLOCK)
}

/// A new open file description of the file behind `fd` (through `/proc/self/fd`), with the
/// access mode of `flags` and the extra open flags `extra`; close-on-exec in the agent.
fn reopen(fd: &OwnedFd, flags: u32, extra: i32) -> Result<OwnedFd, DstError> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let acc = flags & libc::O_ACCMODE as u32;
    let f: File = OpenOptions::new()
        .read(acc != libc::O_WRONLY as u32)
        .write(acc != libc::O_RDONLY as u32)
        .custom_flags(extra | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| {
            DstError::Sys(vkm_sys::SysError::Path {
                path: path.into(),
                source: e,
            })
        })?;
    Ok(f.into())
}

/// A pidfd that refers to a process that has exited and been reaped, like the vkernel's pidfd
/// of a child it already waited for: readable, and signals to it fail with ESRCH.
fn dead_pidfd() -> Result<OwnedFd, DstError> {
    let io = |e: std::io::Error| {
        DstError::Sys(vkm_sys::SysError::Syscall {
            op: "spawn(true)",
            pid: 0,
            source: e,
        })
    };
    let mut child = std::process::Command::new("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(io)?;
    let pid = i32::try_from(child.id()).unwrap_or(-1);
    let fd = calls::pidfd_open(pid);
    child.wait().map_err(io)?;
    Ok(fd?)
}
