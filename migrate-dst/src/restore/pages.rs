//! Stage 3: where pages go, from any thread.
//!
//! An address space's private anonymous memory is filled with `UFFDIO_COPY` through a
//! userfaultfd of that address space: the kernel allocates each missing page and copies into
//! it in one step. A write with `process_vm_writev` would fault the page in first, and a
//! faulted-in anonymous page is zeroed before it is overwritten; on this machine that zeroing
//! was a quarter of all the CPU time a migration took (measured: 5.3 GB/s into fresh memory
//! against 3.1 GB/s). Pages that are present already (a later round) and all other mappings
//! are written with `process_vm_writev`, or through `/proc/PID/mem` where the target may not
//! write (read-only mappings).
//!
//! The userfaultfd is created with `UFFD_USER_MODE_ONLY`, so that a kernel access to a missing
//! page of a registered mapping fails (`EFAULT`) instead of waiting for us; and it must be
//! gone before anything runs, or the first user-mode touch of a page that was never sent (it
//! was zero) would wait for us for ever: [`Fills::release`] closes them all, and
//! [`super::Skeleton::finish`] calls it first.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use vkm_common::image::{Space, PAGE_SIZE};
use vkm_common::model::{Backing, Mm};
use vkm_sys::inject::Remote;
use vkm_sys::{proc, uffd};

use crate::DstError;

/// How often a copy is retried while the kernel says the address space is changing (EAGAIN).
const MAX_RETRIES: u32 = 100;

/// A userfaultfd of one address space, and the mappings registered with it (sorted).
pub(super) struct Fill {
    uffd: OwnedFd,
    ranges: Vec<(u64, u64)>,
}

pub(super) type SharedFill = Arc<RwLock<Option<Fill>>>;

/// The userfaultfds of a skeleton's address spaces, shared with its [`PageTargets`].
#[derive(Default)]
pub(super) struct Fills(Vec<SharedFill>);

impl Fills {
    /// Close every userfaultfd (waiting for writes in progress): from now on every page is
    /// written the ordinary way, and a missing page faults in as zero.
    pub(super) fn release(&mut self) {
        for f in self.0.drain(..) {
            // A writer that panicked while holding the lock left nothing half-done here.
            match f.write() {
                Ok(mut g) => *g = None,
                Err(poisoned) => *poisoned.into_inner() = None,
            }
        }
    }

    /// A userfaultfd for `mm`, created inside its process `leader` (stopped, ours), with `mm`'s
    /// private anonymous mappings registered. None where the kernel refuses: those pages are
    /// then written the ordinary way.
    pub(super) fn create(&mut self, leader: &mut Remote, mm: &Mm) -> Option<SharedFill> {
        let ranges: Vec<(u64, u64)> = mm
            .vmas
            .iter()
            .filter(|v| !v.shared && matches!(v.backing, Backing::Anon))
            .map(|v| (v.start, v.end))
            .collect();
        if ranges.is_empty() {
            return None;
        }
        let fd = match uffd_in(leader) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(pid = leader.tid, error = %e, "no userfaultfd: pages are written with process_vm_writev");
                return None;
            }
        };
        let mut registered = Vec::new();
        for (s, e) in ranges {
            match uffd::register_missing(fd.as_fd(), s, e - s) {
                Ok(()) => registered.push((s, e)),
                Err(err) => tracing::debug!(start = s, error = %err, "mapping not registered"),
            }
        }
        let fill = Arc::new(RwLock::new(Some(Fill {
            uffd: fd,
            ranges: registered,
        })));
        self.0.push(Arc::clone(&fill));
        Some(fill)
    }
}

/// A userfaultfd of the stopped process behind `r`, ready for use.
fn uffd_in(r: &mut Remote) -> Result<OwnedFd, DstError> {
    let fd = uffd::create_in(r)?;
    uffd::api(fd.as_fd(), 0)?;
    Ok(fd)
}

/// Per address space: a process using it, its /proc/PID/mem, and its userfaultfd if any.
pub(super) struct MmTarget {
    pub(super) pid: i32,
    pub(super) mem: File,
    pub(super) fill: Option<SharedFill>,
}

/// Where pages are written; see [`super::Skeleton::page_targets`].
pub struct PageTargets {
    pub(super) mms: std::collections::BTreeMap<u32, MmTarget>,
    pub(super) objects: std::collections::BTreeMap<u32, (File, u64)>,
}

impl PageTargets {
    /// Write one run of pages.
    pub fn apply(&self, space: Space, addr: u64, data: &[u8]) -> Result<(), DstError> {
        match space {
            Space::Mm(id) => {
                let t = self.mms.get(&id).ok_or_else(|| {
                    DstError::Inconsistent(format!("pages for unknown address space {id}"))
                })?;
                let guard = t.fill.as_ref().map(|f| f.read());
                match guard {
                    Some(Ok(g)) => match g.as_ref() {
                        Some(fill) => fill_write(fill, t, addr, data),
                        None => plain_write(t, addr, data),
                    },
                    Some(Err(_)) => Err(DstError::Inconsistent("a page writer panicked".into())),
                    None => plain_write(t, addr, data),
                }
            }
            Space::Object(id) => {
                let (file, size) = self.objects.get(&id).ok_or_else(|| {
                    DstError::Inconsistent(format!("pages for unknown object {id}"))
                })?;
                // The last page of an object may be partial.
                let end = (addr + data.len() as u64).min(*size);
                let n = usize::try_from(end.saturating_sub(addr)).unwrap_or(0);
                file.write_all_at(&data[..n], addr).map_err(|e| {
                    DstError::Sys(vkm_sys::SysError::Syscall {
                        op: "pwrite(memory object)",
                        pid: 0,
                        source: e,
                    })
                })
            }
        }
    }
}

/// `data` at `addr`: registered parts with [`fill_registered`], the rest [`plain_write`].
fn fill_write(fill: &Fill, t: &MmTarget, addr: u64, data: &[u8]) -> Result<(), DstError> {
    let end = addr + data.len() as u64;
    let mut a = addr;
    while a < end {
        let at = |x: u64| usize::try_from(x - addr).unwrap_or(0);
        match fill.ranges.iter().find(|&&(_, e)| e > a) {
            Some(&(s, e)) if s <= a => {
                let stop = e.min(end);
                fill_registered(fill, t, a, &data[at(a)..at(stop)])?;
                a = stop;
            }
            Some(&(s, _)) => {
                let stop = s.min(end);
                plain_write(t, a, &data[at(a)..at(stop)])?;
                a = stop;
            }
            None => {
                plain_write(t, a, &data[at(a)..])?;
                a = end;
            }
        }
    }
    Ok(())
}

/// Pages of a registered mapping: present ones by `process_vm_writev`, which stops at the
/// next missing one (it cannot fault it in: `EFAULT`), missing ones by `UFFDIO_COPY`, which
/// stops at the next present one (`EEXIST`). The plain copy goes first: a later round's pages
/// are present, and `UFFDIO_COPY` copies a page into a new one before it finds out; round 0's
/// runs are long, so its failed first try costs little.
fn fill_registered(fill: &Fill, t: &MmTarget, addr: u64, data: &[u8]) -> Result<(), DstError> {
    let mut done = 0;
    let mut retries = 0;
    while done < data.len() {
        let at = addr + done as u64;
        if let Ok(n @ 1..) = proc::write_vm_some(t.pid, at, &data[done..]) {
            done += n;
            continue;
        }
        let (n, err) = uffd::copy(fill.uffd.as_fd(), at, &data[done..]);
        done += n;
        match err {
            None => {}
            Some(libc::EEXIST) if n == 0 => {
                // Present, yet the plain copy failed: not writable by the target (read-only).
                // One page by force.
                let end = (done + PAGE_SIZE).min(data.len());
                mem_write(t, at, &data[done..end])?;
                done = end;
            }
            Some(libc::EEXIST) => {}
            Some(libc::EAGAIN) if retries < MAX_RETRIES => retries += 1,
            // No longer registered (the final layout replaced the mapping): the ordinary way.
            Some(libc::ENOENT) => return plain_write(t, addr + done as u64, &data[done..]),
            Some(errno) => {
                return Err(DstError::Sys(vkm_sys::SysError::Syscall {
                    op: "ioctl(UFFDIO_COPY)",
                    pid: t.pid,
                    source: std::io::Error::from_raw_os_error(errno),
                }))
            }
        }
    }
    Ok(())
}

/// process_vm_writev copies once; it refuses pages the target may not write (read-only
/// mappings), which /proc/PID/mem writes with FOLL_FORCE.
fn plain_write(t: &MmTarget, addr: u64, data: &[u8]) -> Result<(), DstError> {
    if proc::write_vm(t.pid, addr, data).is_ok() {
        return Ok(());
    }
    mem_write(t, addr, data)
}

fn mem_write(t: &MmTarget, addr: u64, data: &[u8]) -> Result<(), DstError> {
    t.mem.write_all_at(data, addr).map_err(|e| {
        DstError::Sys(vkm_sys::SysError::Syscall {
            op: "pwrite(/proc/PID/mem)",
            pid: t.pid,
            source: e,
        })
    })
}
