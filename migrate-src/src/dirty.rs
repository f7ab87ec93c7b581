//! Dirty-page tracking of a running process, for pre-copy: userfaultfd write-protection in
//! async mode plus `PAGEMAP_SCAN`, set up from outside (DESIGN §4, research/dirty-tracking.md).
//!
//! The userfaultfd is created inside the target by one injected syscall (the target stops for
//! well under a millisecond) and taken out with `pidfd_getfd`; everything else — registering,
//! protecting, scanning — the tracker does from outside while the target runs. Only writes
//! through this process's own mappings are seen: a shared object that other processes write
//! needs another mechanism (content hashing), and the final round of a migration must stop
//! the target before its last [`DirtyTracker::collect`].

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use vkm_common::procfs;
use vkm_sys::inject::Remote;
use vkm_sys::ptrace;
use vkm_sys::{proc, uffd};

use crate::SrcError;

/// Tracks which pages of one process's address space are written.
pub struct DirtyTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    /// Registered and protected ranges, sorted.
    tracked: Vec<(u64, u64)>,
    /// The mappings (as maps shows them) when we last looked for new ones.
    maps_seen: Vec<procfs::Vma>,
}

impl DirtyTracker {
    /// Start tracking every writable private mapping of the running process `pid`.
    pub fn attach(pid: i32) -> Result<DirtyTracker, SrcError> {
        let uffd = create_uffd_in(pid)?;
        let features = uffd::api(
            uffd.as_fd(),
            uffd::UFFD_FEATURE_WP_ASYNC | uffd::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        )?;
        if features & uffd::UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(SrcError::Unsupported {
                pid,
                what: "this kernel has no asynchronous userfaultfd write-protection".into(),
            });
        }
        let path = proc::pid_path(pid, "pagemap");
        let pagemap = File::open(&path).map_err(|e| vkm_sys::SysError::Path { path, source: e })?;
        let mut t = DirtyTracker {
            pid,
            uffd,
            pagemap,
            tracked: Vec::new(),
            maps_seen: Vec::new(),
        };
        t.track_new_mappings(crate::capture::read_maps(pid)?)?;
        Ok(t)
    }

    /// Page-aligned ranges written since the previous call (or since `attach`), merged. New
    /// or grown mappings are reported whole, once, and tracked from then on.
    ///
    /// New mappings are looked for (through smaps, which walks every page table: 10 ms for
    /// 256 MiB) only when maps shows a change, or when a tracked range stopped being one
    /// registered mapping: a mapping unmapped and mapped again alike looks the same in maps,
    /// but its scan then fails, so it is found all the same.
    pub fn collect(&mut self) -> Result<Vec<(u64, u64)>, SrcError> {
        let before = self.tracked.len();
        let mut dirty = self.collect_tracked()?;
        let lost = self.tracked.len() != before;
        let maps = crate::capture::read_maps(self.pid)?;
        if lost || !crate::capture::same_mappings(&maps, &self.maps_seen) {
            dirty.extend(self.track_new_mappings(maps)?);
        }
        Ok(crate::merge_ranges(dirty))
    }

    /// Pages written in the tracked ranges since the last call, without looking for new
    /// mappings (which takes a walk of every page table through smaps): for the final round,
    /// where the caller compares layouts itself and sends untracked mappings whole.
    pub fn collect_tracked(&mut self) -> Result<Vec<(u64, u64)>, SrcError> {
        let mut dirty = Vec::new();
        let mut keep = Vec::new();
        for &(s, e) in &self.tracked {
            match uffd::scan_written(self.pagemap.as_fd(), s, e) {
                Ok(regions) => {
                    dirty.extend(regions.iter().map(|r| (r.start, r.end)));
                    keep.push((s, e));
                }
                // No longer one registered VMA: what the scan saw counts, and the range is
                // not tracked any more (the caller sends what is mapped there now whole).
                Err((regions, err)) if err.raw_os_error() == Some(libc::EPERM) => {
                    dirty.extend(regions.iter().map(|r| (r.start, r.end)));
                }
                Err((_, err)) => return Err(err.into()),
            }
        }
        self.tracked = keep;
        Ok(crate::merge_ranges(dirty))
    }

    /// Register and protect every eligible mapping not tracked yet; returns them (they count
    /// as written: nothing is known about their contents). A mapping that already carries our
    /// registration (`uw` in smaps: a tracked VMA that was split by mprotect, or grown in
    /// place) is tracked on without being reported: its writes show in the scans.
    /// `maps`: the mappings as maps showed them just before (a change between that reading
    /// and smaps shows as a difference next time).
    fn track_new_mappings(&mut self, maps: Vec<procfs::Vma>) -> Result<Vec<(u64, u64)>, SrcError> {
        self.maps_seen = maps;
        let vmas = crate::capture::read_smaps(self.pid)?;
        let mut tracked = Vec::new();
        let mut new = Vec::new();
        for v in &vmas {
            let special = matches!(
                v.path.as_deref(),
                Some("[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]")
            );
            // Without VM_MAYWRITE the mapping can never be written (and cannot be registered).
            // A shared mapping's pages belong to its object (or file), whose contents are
            // compared as a whole: sent through this address space as well, they would reach
            // the destination by two ways in no fixed order, and through whatever the
            // destination's skeleton maps at that address, which need not be the same part of
            // the object (User-Mode Linux maps and unmaps parts of its RAM file all the time).
            if special || !v.has_flag("mw") || v.shared {
                continue;
            }
            if v.has_flag("uw") {
                tracked.push((v.start, v.end));
                continue;
            }
            let len = v.end - v.start;
            match uffd::register_wp(self.uffd.as_fd(), v.start, len) {
                Ok(()) => {}
                // Raced with an munmap, or a kind of mapping uffd does not take: not trackable.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOMEM | libc::EPERM)
                    ) =>
                {
                    tracing::debug!(pid = self.pid, start = v.start, error = %e, "mapping not tracked");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            uffd::protect(self.uffd.as_fd(), v.start, len)?;
            tracked.push((v.start, v.end));
            new.push((v.start, v.end));
        }
        self.tracked = tracked;
        Ok(new)
    }

    /// The ranges being tracked.
    pub fn tracked(&self) -> &[(u64, u64)] {
        &self.tracked
    }
}

/// Create a userfaultfd inside `pid` (its mm is what a userfaultfd tracks) and take it out.
fn create_uffd_in(pid: i32) -> Result<OwnedFd, SrcError> {
    ptrace::seize(pid, ptrace::PTRACE_O_TRACESYSGOOD)?;
    let result = (|| {
        ptrace::interrupt(pid)?;
        let mut taken = Vec::new();
        match ptrace::wait_interrupted(pid, Duration::from_secs(2), &mut taken)? {
            ptrace::Interrupted::Stopped => {}
            ptrace::Interrupted::Exited => return Err(SrcError::Vanished { pid }),
            ptrace::Interrupted::Timeout => return Err(SrcError::NotStopping { pid }),
        }
        let r = inject_uffd(pid);
        let detached = ptrace::release(pid, pid, &taken);
        let fd = r?;
        detached?;
        Ok(fd)
    })();
    if result.is_err() {
        // Best effort: a task that never stopped cannot be detached and is released when we exit.
        let _ = ptrace::detach(pid, 0);
    }
    result
}

fn inject_uffd(pid: i32) -> Result<OwnedFd, SrcError> {
    let mut r = Remote::through_vdso(pid)?;
    let mask = ptrace::get_sigmask(pid)?;
    ptrace::set_sigmask(pid, u64::MAX)?;
    let made = uffd::create_in(&mut r);
    let restored = r
        .restore_regs()
        .and_then(|()| ptrace::set_sigmask(pid, mask));
    let fd = made?;
    restored?;
    Ok(fd)
}
