//! File descriptors: the fd tables, the open file descriptions behind them (found shared with
//! kcmp), pipe contents (read without consuming them), the console.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use vkm_common::model::{Console, Fd, FdTable, FileKind, OpenFile, Pipe};
use vkm_common::procfs;
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
        }
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
                    let (owner, sig) = owner_and_sig(pid, fd, self.host_to_ns)?;
                    let fid = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
                    self.files.push(OpenFile {
                        id: fid,
                        flags: info.flags & !(libc::O_CLOEXEC as u32),
                        pos: u64::try_from(info.pos).unwrap_or(0),
                        owner,
                        sig,
                        kind,
                    });
                    self.holders.push((pid, fd, link));
                    fid
                }
            };
            fds.push(Fd { fd, file, cloexec });
        }
        Ok(FdTable { id, fds })
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
            let pipe = match self.pipe_ids.get(&ino) {
                Some(&p) => p,
                None => {
                    let (data, capacity) = pipe_contents(&fd_path)?;
                    let id = u32::try_from(self.pipes.len()).unwrap_or(u32::MAX);
                    self.pipes.push(Pipe { id, data, capacity });
                    self.pipe_ids.insert(ino, id);
                    id
                }
            };
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
        if link.starts_with("/memfd:") {
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
        if link.ends_with(" (deleted)") {
            return Err(unsupported(&format!("a deleted file {link}")));
        }
        let meta = std::fs::metadata(&fd_path).map_err(|e| vkm_sys::SysError::Path {
            path: fd_path.clone(),
            source: e,
        })?;
        let ft = meta.file_type();
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
fn owner_and_sig(
    pid: i32,
    fd: i32,
    host_to_ns: &BTreeMap<i32, i32>,
) -> Result<(i32, i32), SrcError> {
    let pidfd = calls::pidfd_open(pid)?;
    let dup = calls::pidfd_getfd(&pidfd, fd, pid)?;
    // F_GETOWN gives a pid of our namespace, negative for a process group.
    let own = calls::get_owner(&dup);
    let sig = calls::get_sig(&dup);
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
    Ok((ns_owner, sig))
}
