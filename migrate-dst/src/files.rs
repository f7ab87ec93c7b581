//! Open files: the agent (shim) recreates every open file description itself, in the state
//! the vkernel had (position, status flags, owner, buffered pipe data); the restored processes
//! then pull them with `pidfd_getfd`, so every kind of fd takes the same path into the target.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};

use vkm_common::model::{FileKind, Vkernel};
use vkm_sys::calls;

use crate::DstError;

/// One agent-side fd per open file description, in the state the vkernel had (position,
/// status flags, owner); pipes are created and refilled here.
pub(crate) fn prepare(
    vk: &Vkernel,
    objects: &BTreeMap<u32, OwnedFd>,
    hosts: &BTreeMap<i32, i32>,
    console: Option<&OwnedFd>,
) -> Result<BTreeMap<u32, OwnedFd>, DstError> {
    let mut pipes: BTreeMap<u32, (Option<OwnedFd>, Option<OwnedFd>)> = BTreeMap::new();
    for p in &vk.pipes {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| DstError::Sys(calls::errno("pipe2", 0, e as i32)))?;
        if p.capacity > 0 {
            let cap = i32::try_from(p.capacity).unwrap_or(65536);
            nix::fcntl::fcntl(wr.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(cap))
                .map_err(|e| DstError::Sys(calls::errno("fcntl(F_SETPIPE_SZ)", 0, e as i32)))?;
        }
        let mut off = 0;
        while off < p.data.len() {
            let n = nix::unistd::write(&wr, &p.data[off..])
                .map_err(|e| DstError::Sys(calls::errno("write(pipe)", 0, e as i32)))?;
            off += n;
        }
        pipes.insert(p.id, (Some(rd), Some(wr)));
    }
    let host_of = hosts;
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
                file.into()
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
                let path = format!("/proc/self/fd/{}", m.as_raw_fd());
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        DstError::Sys(vkm_sys::SysError::Path {
                            path: path.into(),
                            source: e,
                        })
                    })?;
                file.into()
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
    Ok(out)
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
    let path = format!("/proc/self/fd/{}", any.as_raw_fd());
    let mut oo = OpenOptions::new();
    if write_end {
        oo.write(true);
    } else {
        oo.read(true);
    }
    use std::os::unix::fs::OpenOptionsExt;
    oo.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
    let f: File = oo.open(&path).map_err(|e| {
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
