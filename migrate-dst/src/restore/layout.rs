//! Stage 2 of a restore: address spaces, memory objects and SysV segments.

use super::*;

impl Restorer {
    pub(super) fn create_objects(&mut self) -> Result<(), DstError> {
        let mut sysv = Vec::new();
        for o in &self.vk.objects {
            if self.objects.contains_key(&o.id) {
                // Kept from the skeleton this one replaces, contents and all.
                continue;
            }
            if let ObjectKind::SysV(seg) = &o.kind {
                sysv.push((o, seg));
                continue;
            }
            let name = o
                .name
                .trim_start_matches("/memfd:")
                .trim_end_matches(" (deleted)");
            let cname = std::ffi::CString::new(name).unwrap_or_default();
            let fd = nix::sys::memfd::memfd_create(
                &cname,
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC
                    | nix::sys::memfd::MemFdCreateFlag::MFD_ALLOW_SEALING,
            )
            .map_err(|e| DstError::Sys(calls::errno("memfd_create", 0, e as i32)))?;
            let size = i64::try_from(o.size)
                .map_err(|_| DstError::Inconsistent("object too large".into()))?;
            nix::unistd::ftruncate(&fd, size)
                .map_err(|e| DstError::Sys(calls::errno("ftruncate(memfd)", 0, e as i32)))?;
            self.objects.insert(o.id, fd);
        }
        if !sysv.is_empty() {
            // Segments are created by a thread of ours that joins the sandbox's IPC namespace
            // (that of any skeleton): shm_next_id and shmget act in the caller's namespace, and
            // the segment's file comes back as an fd that pages are written to like a memfd's.
            let pid = self.ipc_ns_pid()?;
            let files = calls::in_ipc_namespace(pid, || {
                sysv.iter()
                    .map(|(o, seg)| Ok((o.id, create_segment(o, seg)?)))
                    .collect::<Result<Vec<_>, DstError>>()
            })?;
            self.objects.extend(files);
        }
        Ok(())
    }

    /// Host pid of a live skeleton, whose IPC namespace is the sandbox's.
    pub(super) fn ipc_ns_pid(&self) -> Result<i32, DstError> {
        self.procs
            .values()
            .find_map(|p| p.threads.first())
            .map(|r| r.tid)
            .ok_or_else(|| DstError::Inconsistent("no process to restore SysV segments in".into()))
    }

    /// Segments that were marked removed while attached: removed again, now that every
    /// process has attached them (the kernel destroys them when the last one detaches).
    pub(super) fn remove_sysv(&mut self) -> Result<(), DstError> {
        let removed: Vec<i32> = self
            .vk
            .objects
            .iter()
            .filter_map(|o| match &o.kind {
                ObjectKind::SysV(seg) if seg.removed => Some(seg.shmid),
                _ => None,
            })
            .collect();
        if removed.is_empty() {
            return Ok(());
        }
        let pid = self.ipc_ns_pid()?;
        calls::in_ipc_namespace(pid, || {
            removed
                .iter()
                .try_for_each(|&id| calls::shm_rmid(id).map_err(DstError::from))
        })
    }

    pub(super) fn layout(&mut self, mm: &model::Mm, rep: usize) -> Result<(), DstError> {
        let scratch = self.scratch;
        let args = self.args();
        let maps = self.object_maps();
        let r = self.leader(rep)?;
        r.call("munmap(low)", libc::SYS_munmap, &[0, scratch])?;
        let top = scratch + SCRATCH_LEN;
        r.call("munmap(high)", libc::SYS_munmap, &[top, TASK_SIZE - top])?;
        if let Some(vvar) = mm.vmas.iter().find(|v| matches!(v.backing, Backing::Vvar)) {
            r.call(
                "arch_prctl(ARCH_MAP_VDSO_64)",
                libc::SYS_arch_prctl,
                &[ARCH_MAP_VDSO_64, vvar.start],
            )?;
        }
        for v in &mm.vmas {
            map_vma(r, mm, v, &maps, args, scratch)?;
        }
        set_mm_fields(r, mm, args, true)
    }

    /// Turn an address space laid out from the skeleton into `mm` (see
    /// [`Skeleton::apply_final`]). Its fields (brk, auxv, ...) are set again only when
    /// `fields_changed`: that is an injected call, some 0.1 ms of the pause.
    pub(super) fn apply_delta(
        &mut self,
        mm: &model::Mm,
        rep: usize,
        delta: &vkm_common::live::VmaDelta,
        fields_changed: bool,
    ) -> Result<(), DstError> {
        if delta.is_empty() && !fields_changed {
            return Ok(());
        }
        let scratch = self.scratch;
        let args = self.args();
        let maps = self.object_maps();
        let r = self.leader(rep)?;
        for &(start, end) in &delta.unmap {
            r.call("munmap(changed)", libc::SYS_munmap, &[start, end - start])?;
        }
        for &i in &delta.map {
            let v = mm
                .vmas
                .get(i)
                .ok_or_else(|| DstError::Inconsistent("bad VMA index".into()))?;
            if v.backing.is_special() {
                return Err(DstError::Inconsistent(format!(
                    "the special mapping at {:#x} moved during pre-copy",
                    v.start
                )));
            }
            map_vma(r, mm, v, &maps, args, scratch)?;
        }
        if fields_changed {
            set_mm_fields(r, mm, args, false)?;
        }
        Ok(())
    }

    /// The agent's fds of memory objects and the SysV segments, as `map_vma` needs them.
    fn object_maps(&self) -> ObjectMaps {
        ObjectMaps {
            fds: self
                .objects
                .iter()
                .map(|(k, v)| (*k, v.as_raw_fd()))
                .collect(),
            sysv: self
                .vk
                .objects
                .iter()
                .filter_map(|o| match &o.kind {
                    ObjectKind::SysV(seg) => Some((o.id, (o.size, seg.clone()))),
                    _ => None,
                })
                .collect(),
        }
    }
}

struct ObjectMaps {
    fds: BTreeMap<u32, i32>,
    /// Object id → (size, segment).
    sysv: BTreeMap<u32, (u64, SysvShm)>,
}

/// Map one saved VMA into the target at its address (MAP_FIXED: it replaces what is there).
fn map_vma(
    r: &mut Remote,
    mm: &model::Mm,
    v: &model::Vma,
    maps: &ObjectMaps,
    args: u64,
    scratch: u64,
) -> Result<(), DstError> {
    let objects = &maps.fds;
    let len = v.end - v.start;
    let p = u64::from(v.prot & (prot::READ | prot::WRITE | prot::EXEC));
    let share = if v.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u64;
    let fixed = libc::MAP_FIXED as u64;
    match &v.backing {
        Backing::Vdso | Backing::Vvar | Backing::VvarVclock | Backing::Vsyscall => return Ok(()),
        Backing::Anon => {
            let mut flags = share | fixed | libc::MAP_ANONYMOUS as u64;
            if v.growsdown {
                flags |= libc::MAP_GROWSDOWN as u64;
            }
            r.call(
                "mmap(anon)",
                libc::SYS_mmap,
                &[v.start, len, p, flags, u64::MAX, 0],
            )?;
        }
        Backing::File { path, offset, .. } => {
            let mode = if v.shared && v.prot & prot::WRITE != 0 {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            r.write(args, &cstr(path))?;
            let fd = r.call(
                "openat(mapped file)",
                libc::SYS_openat,
                &[
                    libc::AT_FDCWD as u64,
                    args,
                    (mode | libc::O_CLOEXEC) as u64,
                    0,
                ],
            )?;
            let res = r.call(
                "mmap(file)",
                libc::SYS_mmap,
                &[v.start, len, p, share | fixed, fd, *offset],
            );
            r.call("close", libc::SYS_close, &[fd])?;
            res?;
        }
        Backing::Object { id, offset } if maps.sysv.contains_key(id) => {
            let (size, seg) = &maps.sysv[id];
            attach_sysv(r, mm, v, *size, seg, *offset, scratch)?;
        }
        Backing::Object { id, offset } => {
            let afd = objects
                .get(id)
                .ok_or_else(|| DstError::Inconsistent(format!("object {id} is missing")))?;
            let fd = r.call(
                "pidfd_getfd(object)",
                libc::SYS_pidfd_getfd,
                &[AGENT_PIDFD as u64, *afd as u64, 0],
            )?;
            let res = r.call(
                "mmap(object)",
                libc::SYS_mmap,
                &[v.start, len, p, share | fixed, fd, *offset],
            );
            r.call("close", libc::SYS_close, &[fd])?;
            res?;
        }
    }
    for a in &v.advise {
        let advice = match a.as_str() {
            "dc" => libc::MADV_DONTFORK,
            "dd" => libc::MADV_DONTDUMP,
            "wf" => libc::MADV_WIPEONFORK,
            "hg" => libc::MADV_HUGEPAGE,
            "nh" => libc::MADV_NOHUGEPAGE,
            _ => continue,
        };
        r.call("madvise", libc::SYS_madvise, &[v.start, len, advice as u64])?;
    }

    Ok(())
}

/// Code, data, brk, stack, arguments, environment, auxv and exe link of an address space.
/// `set_exe`: also point the exe link at `mm.exe` (the kernel refuses to change it while the
/// old executable is still mapped, so only a freshly emptied address space can).
fn set_mm_fields(r: &mut Remote, mm: &model::Mm, args: u64, set_exe: bool) -> Result<(), DstError> {
    let f = &mm.fields;
    let auxv_addr = args + 1024;
    let auxv: Vec<u8> = f.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    if auxv.len() > 2048 {
        return Err(DstError::Inconsistent("auxv too large".into()));
    }
    r.write(auxv_addr, &auxv)?;
    let exe_fd = if set_exe {
        r.write(args + 3072, &cstr(&mm.exe))?;
        r.call(
            "openat(exe)",
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as u64,
                args + 3072,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
            ],
        )?
    } else {
        u64::from(u32::MAX)
    };
    let mut map = Vec::with_capacity(104);
    for w in [
        f.start_code,
        f.end_code,
        f.start_data,
        f.end_data,
        f.start_brk,
        f.brk,
        f.start_stack,
        f.arg_start,
        f.arg_end,
        f.env_start,
        f.env_end,
        auxv_addr,
    ] {
        map.extend_from_slice(&w.to_le_bytes());
    }
    map.extend_from_slice(&u32::try_from(auxv.len()).unwrap_or(0).to_le_bytes());
    map.extend_from_slice(&u32::try_from(exe_fd).unwrap_or(0).to_le_bytes());
    r.write(args, &map)?;
    let res = r.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[
            libc::PR_SET_MM as u64,
            libc::PR_SET_MM_MAP as u64,
            args,
            104,
            0,
        ],
    );
    if set_exe {
        r.call("close", libc::SYS_close, &[exe_fd])?;
    }
    res?;

    Ok(())
}

/// Create SysV segment `o` with its saved key and id. Runs on a thread that has joined the
/// sandbox's IPC namespace. Returns the segment's shmem file, opened for writing its pages.
pub(super) fn create_segment(o: &MemObject, seg: &SysvShm) -> Result<OwnedFd, DstError> {
    let what = || {
        format!(
            "SysV segment {} (key {:#010x}, {} bytes)",
            seg.shmid, seg.key as u32, o.size
        )
    };
    calls::set_shm_next_id(seg.shmid)?;
    // A removed segment's key is private already (the kernel made it so); recreating it under
    // its old key could clash with a segment created with that key since.
    let key = if seg.removed {
        libc::IPC_PRIVATE
    } else {
        seg.key
    };
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | i32::try_from(seg.mode & 0o777).unwrap_or(0);
    // The creator's ids (shm_perm.cuid/cgid) are those of the calling thread: become them for
    // the shmget only (this thread only), then root again for what follows.
    let as_creator = seg.cuid != 0 || seg.cgid != 0;
    if as_creator {
        calls::set_thread_effective_ids(seg.cuid, seg.cgid)?;
    }
    let got = calls::shmget(key, o.size, flags);
    if as_creator {
        calls::set_thread_effective_ids(0, 0)?;
    }
    let id = got.map_err(|e| {
        DstError::Incompatible(format!(
            "{}: shmget failed: {}",
            what(),
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)
        ))
    })?;
    if id != seg.shmid {
        let _ = calls::shm_rmid(id);
        return Err(DstError::Incompatible(format!(
            "{}: shmget gave id {id}, the vkernel knows it as {}",
            what(),
            seg.shmid
        )));
    }
    calls::shm_set(id, seg.uid, seg.gid, seg.mode)?;
    if seg.locked {
        if let Err(e) = calls::shm_lock(id) {
            tracing::warn!(shmid = id, error = %e, "SysV segment not locked in memory again");
        }
    }
    let at = calls::ShmAttachment::new(id, o.size, false)?;
    let path = at.map_files_path();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| DstError::Sys(vkm_sys::SysError::Path { path, source: e }))?;
    Ok(OwnedFd::from(file))
}

/// Attach SysV segment `seg` (of `size` bytes) for VMA `v` of `mm`, which starts `offset` bytes
/// into the segment: injected `shmat` at the VMA's address, read-only if it was attached so.
/// A VMA that is only a piece of an attachment (the rest was mprotected differently, which
/// splits it, or unmapped) is cut out of a whole attachment made at a free address.
pub(super) fn attach_sysv(
    r: &mut Remote,
    mm: &model::Mm,
    v: &model::Vma,
    size: u64,
    seg: &SysvShm,
    offset: u64,
    scratch: u64,
) -> Result<(), DstError> {
    let page = 4096;
    let len = v.end - v.start;
    let full = size.div_ceil(page) * page;
    let base = v.start.wrapping_sub(offset);
    let rdonly = seg
        .attaches
        .iter()
        .find(|a| a.mm == mm.id && a.addr == base)
        .map_or(v.prot & prot::WRITE == 0, |a| a.rdonly);
    let exec = v.prot & prot::EXEC != 0;
    let mut flags = 0;
    if rdonly {
        flags |= libc::SHM_RDONLY;
    }
    if exec {
        flags |= calls::SHM_EXEC;
    }
    let flags = u64::try_from(flags).unwrap_or(0);
    let shmid = u64::try_from(seg.shmid).unwrap_or(0);
    if offset == 0 && len == full {
        let got = r.call("shmat", libc::SYS_shmat, &[shmid, v.start, flags])?;
        if got != v.start {
            return Err(DstError::Inconsistent(format!(
                "SysV segment {} attached at {got:#x}, not {:#x}",
                seg.shmid, v.start
            )));
        }
    } else {
        if offset.checked_add(len).is_none_or(|e| e > full) {
            return Err(DstError::Inconsistent(format!(
                "a mapping of SysV segment {} reaches beyond its {size} bytes",
                seg.shmid
            )));
        }
        let tmp = free_range(mm, scratch, full).ok_or_else(|| {
            DstError::Inconsistent(format!(
                "no free address to attach SysV segment {}",
                seg.shmid
            ))
        })?;
        r.call("shmat(whole)", libc::SYS_shmat, &[shmid, tmp, flags])?;
        let moved = r.call(
            "mremap(SysV piece)",
            libc::SYS_mremap,
            &[
                tmp + offset,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                v.start,
            ],
        );
        r.call("munmap(rest of attachment)", libc::SYS_munmap, &[tmp, full])?;
        moved?;
    }
    let mut given = prot::READ;
    if !rdonly {
        given |= prot::WRITE;
    }
    if exec {
        given |= prot::EXEC;
    }
    let want = v.prot & (prot::READ | prot::WRITE | prot::EXEC);
    if want != given {
        r.call(
            "mprotect(SysV)",
            libc::SYS_mprotect,
            &[v.start, len, u64::from(want)],
        )?;
    }
    Ok(())
}

/// An address range of `len` bytes that no saved VMA of `mm` and not the scratch area uses,
/// hence free while the layout is rebuilt.
pub(super) fn free_range(mm: &model::Mm, scratch: u64, len: u64) -> Option<u64> {
    let mut cand: u64 = 0x2_0000_0000;
    while cand + len < TASK_SIZE {
        let end = cand + len;
        let clash = mm.vmas.iter().any(|v| v.start < end && cand < v.end)
            || (scratch < end && cand < scratch + SCRATCH_LEN);
        if !clash {
            return Some(cand);
        }
        cand += 0x1000_0000;
    }
    None
}
