//! Readers of /proc files; the parsing itself is pure and lives in `vkm_common::procfs`.

use std::path::{Path, PathBuf};

use crate::{Result, SysError};

pub fn read(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_to_string(path).map_err(|e| SysError::path(path, e))
}

pub fn read_bytes(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).map_err(|e| SysError::path(path, e))
}

pub fn readlink(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| SysError::path(path, e))
}

/// Numeric entries of a /proc directory (`task`, `fd`), sorted.
pub fn list_numeric(dir: impl AsRef<Path>) -> Result<Vec<i32>> {
    let dir = dir.as_ref();
    let mut out: Vec<i32> = std::fs::read_dir(dir)
        .map_err(|e| SysError::path(dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

pub fn pid_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// `/proc/PID/mem` of `pid`, for reading and writing (a write there also reaches read-only
/// private pages).
pub fn open_mem(pid: i32) -> Result<std::fs::File> {
    let path = pid_path(pid, "mem");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|source| SysError::Path { path, source })
}

/// Host pids of every process below `pid`, parents before their children.
pub fn descendants(pid: i32) -> Result<Vec<i32>> {
    let mut queue = vec![pid];
    let mut out = Vec::new();
    while let Some(p) = queue.pop() {
        for c in children(p)? {
            out.push(c);
            queue.push(c);
        }
    }
    Ok(out)
}

/// Host pids of every child of every thread of `pid`.
pub fn children(pid: i32) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    let tids = match list_numeric(pid_path(pid, "task")) {
        Ok(t) => t,
        // Reaped meanwhile: it has no children any more.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
        Err(e) => return Err(e),
    };
    for tid in tids {
        let text = match read(format!("/proc/{pid}/task/{tid}/children")) {
            Ok(t) => t,
            // The thread exited between listing and reading.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse::<i32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The pid of a task in the innermost PID namespace it belongs to (last NSpid entry).
pub fn ns_pid(pid: i32) -> Result<i32> {
    ns_pid_in(pid, &read(pid_path(pid, "status"))?)
}

/// [`ns_pid`] from the status text of `pid` read already.
pub fn ns_pid_in(pid: i32, status: &str) -> Result<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .ok_or_else(|| SysError::Unexpected {
            pid,
            what: "has no NSpid line in its status".into(),
        })
}

pub fn parse_error(path: impl Into<PathBuf>, source: vkm_common::error::CommonError) -> SysError {
    SysError::Parse {
        path: path.into(),
        source,
    }
}

/// Copy `buf.len()` bytes out of `pid` at `addr` with `process_vm_readv`: one copy straight
/// from the target's pages (a read of /proc/PID/mem goes through a bounce page). Fails on an
/// address that is not mapped.
pub fn read_vm(pid: i32, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let remote = [nix::sys::uio::RemoteIoVec {
            base: remote_base(addr, done),
            len: buf.len() - done,
        }];
        let mut local = [std::io::IoSliceMut::new(&mut buf[done..])];
        let n =
            nix::sys::uio::process_vm_readv(nix::unistd::Pid::from_raw(pid), &mut local, &remote)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "pages no longer mapped",
            ));
        }
        done += n;
    }
    Ok(())
}

/// The most ranges one `process_vm_readv` takes (the kernel's `UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;

/// Copy the ranges `(addr, len)` of `pid`, one after the other, into the start of `buf` with
/// one `process_vm_readv` (at most [`MAX_IOV`] ranges): a later round's dirty pages are mostly
/// single pages, and one call per page costs more than the copy. Returns the bytes copied,
/// which stop short at the first range that is no longer mapped.
pub fn read_vm_many(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> std::io::Result<usize> {
    let remote: Vec<nix::sys::uio::RemoteIoVec> = ranges
        .iter()
        .map(|&(addr, len)| nix::sys::uio::RemoteIoVec {
            base: remote_base(addr, 0),
            len,
        })
        .collect();
    let total: usize = ranges.iter().map(|r| r.1).sum();
    let Some(dst) = buf.get_mut(..total) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let mut local = [std::io::IoSliceMut::new(dst)];
    Ok(nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut local,
        &remote,
    )?)
}

/// Copy `data` into `pid` at `addr` with `process_vm_writev`. Unlike a write to
/// /proc/PID/mem it honours the target's protections: read-only pages fail.
pub fn write_vm(pid: i32, addr: u64, data: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let at = addr.saturating_add(done as u64);
        let n = write_vm_some(pid, at, &data[done..])?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// One `process_vm_writev` of `data` into `pid` at `addr`: the bytes written, which stop
/// short where a page cannot be written (the error only when not even the first could).
pub fn write_vm_some(pid: i32, addr: u64, data: &[u8]) -> std::io::Result<usize> {
    let remote = [nix::sys::uio::RemoteIoVec {
        base: remote_base(addr, 0),
        len: data.len(),
    }];
    let local = [std::io::IoSlice::new(data)];
    Ok(nix::sys::uio::process_vm_writev(
        nix::unistd::Pid::from_raw(pid),
        &local,
        &remote,
    )?)
}

fn remote_base(addr: u64, done: usize) -> usize {
    usize::try_from(addr)
        .unwrap_or(usize::MAX)
        .saturating_add(done)
}
