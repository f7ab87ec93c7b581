//! Dirty-page tracking primitives: userfaultfd write-protection in async mode and the
//! `PAGEMAP_SCAN` ioctl, driven from outside the tracked process. The uAPI is newer than
//! Debian 12's headers and the libc crate, so the constants and structs are defined here
//! (values checked against Linux 6.18; see `research/dirty-tracking.md` §5).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use crate::inject::Remote;
use crate::{Result, SysError};

pub const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_API: u64 = 0xAA;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const PAGEMAP_SCAN: u64 = 0xc060_6610;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// One `struct page_region` of a `PAGEMAP_SCAN` result: [start, end) with its categories.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

fn ioctl(fd: BorrowedFd<'_>, req: u64, arg: *mut libc::c_void, op: &'static str) -> Result<i64> {
    // SAFETY: every caller passes a pointer to a live, correctly sized struct for `req` (the
    // sizes are encoded in the request numbers above); the kernel does not keep it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(i64::from(r))
}

/// A userfaultfd of the address space of `r`'s stopped thread (a userfaultfd tracks the mm of
/// the process that made it), created there by injection with `UFFD_USER_MODE_ONLY` and
/// taken out with `pidfd_getfd`. The thread keeps no copy: closing ours unregisters everything.
/// `UFFDIO_API` is still to be done.
pub fn create_in(r: &mut Remote) -> Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
    let fd = r.call("userfaultfd", libc::SYS_userfaultfd, &[flags])?;
    let taken = crate::calls::pidfd_open(r.tid).and_then(|pidfd| {
        crate::calls::pidfd_getfd(&pidfd, i32::try_from(fd).unwrap_or(-1), r.tid)
    });
    let closed = r.call("close", libc::SYS_close, &[fd]);
    let taken = taken?;
    closed?;
    Ok(taken)
}

/// `UFFDIO_API`: enable `features` on a fresh userfaultfd; returns the features it has.
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> Result<u64> {
    let mut a = [UFFD_API, features, 0u64];
    ioctl(uffd, UFFDIO_API, a.as_mut_ptr().cast(), "ioctl(UFFDIO_API)")?;
    Ok(a[1])
}

/// `UFFDIO_REGISTER` of [start, start+len) in `mode`.
fn register(uffd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> Result<()> {
    let mut r = [start, len, mode, 0u64];
    ioctl(
        uffd,
        UFFDIO_REGISTER,
        r.as_mut_ptr().cast(),
        "ioctl(UFFDIO_REGISTER)",
    )
    .map(drop)
}

/// `UFFDIO_REGISTER` of [start, start+len) for write-protection.
pub fn register_wp(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
    register(uffd, start, len, UFFDIO_REGISTER_MODE_WP)
}

/// `UFFDIO_REGISTER` of [start, start+len) for missing pages, to fill them with [`copy`].
pub fn register_missing(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
    register(uffd, start, len, UFFDIO_REGISTER_MODE_MISSING)
}

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `UFFDIO_COPY` of `src` to `dst` (page-aligned, whole pages) in the userfaultfd's address
/// space: each missing page is allocated and filled in one step, without being zeroed first.
/// Returns the bytes copied and, if it stopped early, the errno that stopped it (`EEXIST`: the
/// next page is present already; `ENOENT`: `dst` is not in a registered mapping).
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> (usize, Option<i32>) {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    match ioctl(
        uffd,
        UFFDIO_COPY,
        std::ptr::addr_of_mut!(c).cast(),
        "ioctl(UFFDIO_COPY)",
    ) {
        Ok(_) => (src.len(), None),
        Err(e) => {
            let done = usize::try_from(c.copy).unwrap_or(0).min(src.len());
            (done, Some(e.raw_os_error().unwrap_or(libc::EIO)))
        }
    }
}

/// `UFFDIO_WRITEPROTECT` [start, start+len) on.
pub fn protect(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<()> {
    let mut w = [start, len, UFFDIO_WRITEPROTECT_MODE_WP];
    ioctl(
        uffd,
        UFFDIO_WRITEPROTECT,
        w.as_mut_ptr().cast(),
        "ioctl(UFFDIO_WRITEPROTECT)",
    )
    .map(drop)
}

/// The pages of [start, end) written since the last scan, re-protecting them atomically.
///
/// Two traps of the ioctl are handled here: `walk_end` is stale once a call returns more than
/// 512 regions internally, so a follow-up call is made only when the vector came back full,
/// and appends; and a call that fails (`EPERM`: an unregistered VMA in the range) has already
/// re-protected the pages it walked, so the regions in the pre-zeroed vector are kept and
/// returned with the error (`Err((regions, error))`).
pub fn scan_written(
    pagemap: BorrowedFd<'_>,
    start: u64,
    end: u64,
) -> std::result::Result<Vec<PageRegion>, (Vec<PageRegion>, SysError)> {
    const VEC_LEN: usize = 4096;
    let mut out = Vec::new();
    let mut from = start;
    loop {
        let mut vec = vec![PageRegion::default(); VEC_LEN];
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start: from,
            end,
            vec: vec.as_mut_ptr() as u64,
            vec_len: VEC_LEN as u64,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        match ioctl(
            pagemap,
            PAGEMAP_SCAN,
            std::ptr::addr_of_mut!(arg).cast(),
            "ioctl(PAGEMAP_SCAN)",
        ) {
            Ok(n) => {
                let n = usize::try_from(n).unwrap_or(0).min(VEC_LEN);
                out.extend_from_slice(&vec[..n]);
                if n < VEC_LEN || arg.walk_end >= end {
                    return Ok(out);
                }
                from = arg.walk_end;
            }
            Err(e) => {
                out.extend(vec.into_iter().take_while(|r| r.end != 0));
                return Err((out, e));
            }
        }
    }
}
