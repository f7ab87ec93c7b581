//! Address spaces: VMAs from smaps, which pages carry state (pagemap), shared memory objects.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};

use vkm_common::image::{encode_pages, EncodedPages, ImageWriter, Space, PAGE_SIZE};
use vkm_common::model::{
    prot, Backing, MemObject, Mm, MmFields, ObjectKind, SysvAttach, SysvShm, Vma,
};
use vkm_common::procfs;
use vkm_sys::calls::{self, ShmStat};
use vkm_sys::proc;

use crate::SrcError;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PM_UFFD_WP: u64 = 1 << 57;

/// A pagemap entry that is only a userfaultfd write-protect marker on an empty page (what a
/// pre-copy's tracker leaves in every page it protects): the kernel shows it as a swap entry
/// of the special marker type with offset 1 (`PTE_MARKER_UFFD_WP`), but there is no page.
/// Real swap types are below 24 (`MAX_SWAPFILES` of at most 32 minus the special types).
fn is_uffd_wp_marker(v: u64) -> bool {
    let frame = v & ((1 << 55) - 1);
    v & PM_SWAPPED != 0 && v & PM_UFFD_WP != 0 && frame >> 5 == 1 && frame & 0x1f >= 24
}

/// Pages read from the target per pread (and per image frame group).
const CHUNK: usize = 1 << 20;

/// How to read the memory that goes with a captured model.
#[derive(Default)]
pub struct MemoryPlan {
    pub mms: Vec<MmPlan>,
    pub objects: Vec<ObjectPlan>,
}

pub struct MmPlan {
    pub id: u32,
    pub pid: i32,
    /// Page-aligned [start, end) runs whose pages carry state.
    pub runs: Vec<(u64, u64)>,
}

pub struct ObjectPlan {
    pub id: u32,
    pub file: File,
    pub size: u64,
}

impl MemoryPlan {
    /// Bytes the plan will read (before zero-page elision), for progress display.
    pub fn total_bytes(&self) -> u64 {
        let mm: u64 = self
            .mms
            .iter()
            .flat_map(|m| m.runs.iter())
            .map(|(s, e)| e - s)
            .sum();
        mm + self.objects.iter().map(|o| o.size).sum::<u64>()
    }

    /// Copy every page of the plan into the image. A reader thread copies chunks out of the
    /// target, drops zero pages, hashes and compresses, while this thread writes the previous
    /// chunks, so that both cores work: one thread doing everything tops out under 1 GB/s.
    pub fn write_pages<W: Write>(
        &self,
        w: &mut ImageWriter<W>,
        compression: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), SrcError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(EncodedPages, u64)>(PIPELINE_DEPTH);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || self.read_chunks(compression, &tx));
            let mut result = Ok(());
            while let Ok((enc, len)) = rx.recv() {
                if let Err(e) = w.write_encoded(&enc) {
                    result = Err(SrcError::from(e));
                    break;
                }
                progress(len);
            }
            // The reader stops at its next send once the receiver is gone.
            drop(rx);
            let read = reader.join().unwrap_or_else(|_| {
                Err(SrcError::Unsupported {
                    pid: 0,
                    what: "the page reader thread panicked".into(),
                })
            });
            result.and(read)
        })
    }

    /// The reader side of [`Self::write_pages`]. Returns early (Ok) when the writer is gone: the
    /// writer's error is the one to report.
    fn read_chunks(
        &self,
        compression: bool,
        tx: &std::sync::mpsc::SyncSender<(EncodedPages, u64)>,
    ) -> Result<(), SrcError> {
        let mut buf = vec![0u8; CHUNK];
        for m in &self.mms {
            let path = proc::pid_path(m.pid, "mem");
            let mem = File::open(&path).map_err(|e| vkm_sys::SysError::Path { path, source: e })?;
            for &(start, end) in &m.runs {
                let mut a = start;
                while a < end {
                    let n = usize::try_from((end - a).min(CHUNK as u64)).unwrap_or(CHUNK);
                    mem.read_exact_at(&mut buf[..n], a).map_err(|e| {
                        vkm_sys::SysError::Syscall {
                            op: "pread(/proc/PID/mem)",
                            pid: m.pid,
                            source: e,
                        }
                    })?;
                    let enc = encode_pages(Space::Mm(m.id), a, &buf[..n], compression)?;
                    if tx.send((enc, n as u64)).is_err() {
                        return Ok(());
                    }
                    a += n as u64;
                }
            }
        }
        for o in &self.objects {
            for (start, end) in data_extents(&o.file, o.size)? {
                let mut a = start;
                while a < end {
                    let n = usize::try_from((end - a).min(CHUNK as u64)).unwrap_or(CHUNK);
                    // The object's tail page may be partial; pad it with zeros.
                    let want = n.min(usize::try_from(o.size - a).unwrap_or(n));
                    buf[..n].fill(0);
                    o.file.read_exact_at(&mut buf[..want], a).map_err(|e| {
                        vkm_sys::SysError::Syscall {
                            op: "pread(memory object)",
                            pid: 0,
                            source: e,
                        }
                    })?;
                    let enc = encode_pages(Space::Object(o.id), a, &buf[..n], compression)?;
                    if tx.send((enc, n as u64)).is_err() {
                        return Ok(());
                    }
                    a += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Encoded chunks in flight between the reader and the writer.
const PIPELINE_DEPTH: usize = 4;

/// Allocated extents of a file (SEEK_DATA/SEEK_HOLE), page aligned: a 256 MiB UML RAM file uses
/// a tenth of that when idle, and holes read as zeros anyway.
pub(crate) fn data_extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>, SrcError> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let page = PAGE_SIZE as u64;
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size_i = i64::try_from(size).unwrap_or(i64::MAX);
    while pos < size_i {
        let data = match lseek(file.as_raw_fd(), pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => {
                return Err(vkm_sys::SysError::Syscall {
                    op: "lseek(SEEK_DATA)",
                    pid: 0,
                    source: e.into(),
                }
                .into())
            }
        };
        let hole = lseek(file.as_raw_fd(), data, Whence::SeekHole).unwrap_or(size_i);
        let s = (data as u64) / page * page;
        let e = ((hole as u64).min(size)).div_ceil(page) * page;
        if e > s {
            out.push((s, e));
        }
        pos = hole;
    }
    Ok(out)
}

#[derive(Default)]
pub struct MemoryCapture {
    mms: Vec<Mm>,
    plans: Vec<MmPlan>,
    /// (dev, inode) → object id.
    object_ids: BTreeMap<(u64, u64), u32>,
    objects: Vec<MemObject>,
    object_plans: Vec<ObjectPlan>,
    /// Per mm: base address of [vdso].
    vdso_base: Vec<Option<u64>>,
    /// The vkernel's SysV IPC namespace, looked at with the first address space.
    sysv: Option<SysvNs>,
    /// Mapped files (by the device and inode maps shows) and their size and mtime: a library
    /// is mapped several times by every process, and a stat through `map_files` costs while
    /// the vkernel is frozen.
    files: BTreeMap<(u32, u32, u64), (u64, i128)>,
}

/// The SysV IPC namespace of the vkernel and the shared memory segments in it.
///
/// Segment attributes are read with `shmctl` on a short-lived thread of ours that joins the
/// namespace (`setns`), not by injecting `shmctl` into a vkernel process: that reads the
/// namespace without touching any process (no scratch page, no registers to put back), works
/// whichever process maps a segment (also one we cannot inject into, such as a UML guest
/// process ptraced by its kernel), and lets us list the segments that no process maps.
struct SysvNs {
    /// A host pid in the namespace, for `setns`.
    pid: i32,
    /// Inode of the namespace (`/proc/PID/ns/ipc`).
    ino: u64,
    /// The vkernel has a namespace of its own (as `vkmigrate run` makes): every segment in it
    /// belongs to the vkernel and is listed in `segments` up front. Otherwise (a vkernel in our
    /// own namespace) only the segments it maps are looked up, one by one.
    own: bool,
    /// Segments by shmid.
    segments: BTreeMap<i32, ShmStat>,
    /// shmid → object id of the segments registered so far.
    objects: BTreeMap<i32, u32>,
}

impl MemoryCapture {
    pub fn capture_mm(
        &mut self,
        id: u32,
        pid: i32,
        page_runs: bool,
        known_smaps: Option<&[procfs::Vma]>,
    ) -> Result<(), SrcError> {
        if self.sysv.is_none() {
            self.sysv = Some(self.open_sysv(pid)?);
        }
        let entries = match known_smaps {
            Some(known) if same_mappings(&read_maps(pid)?, known) => Cow::Borrowed(known),
            _ => Cow::Owned(read_smaps(pid)?),
        };
        let pagemap =
            File::open(proc::pid_path(pid, "pagemap")).map_err(|e| vkm_sys::SysError::Path {
                path: proc::pid_path(pid, "pagemap"),
                source: e,
            })?;
        let mut vmas = Vec::new();
        let mut runs = Vec::new();
        let mut vdso = Vec::new();
        let mut vdso_base = None;
        for e in entries.iter() {
            let mut p = 0;
            if e.read {
                p |= prot::READ;
            }
            if e.write {
                p |= prot::WRITE;
            }
            if e.exec {
                p |= prot::EXEC;
            }
            let path = e.path.clone().unwrap_or_default();
            let unsupported = |what: &str| SrcError::UnsupportedVma {
                pid,
                start: e.start,
                end: e.end,
                what: what.to_string(),
            };
            let backing = match path.as_str() {
                "[vdso]" => {
                    vdso = read_mem(pid, e.start, e.end)?;
                    vdso_base = Some(e.start);
                    Backing::Vdso
                }
                "[vvar]" => Backing::Vvar,
                "[vvar_vclock]" => Backing::VvarVclock,
                "[vsyscall]" => Backing::Vsyscall,
                _ if e.shared && is_sysv_path(&path) => {
                    let oid = self.sysv_object(id, pid, e, &path)?;
                    Backing::Object {
                        id: oid,
                        offset: e.offset,
                    }
                }
                _ if e.shared => {
                    if is_object_path(&path) {
                        let oid = self.object(pid, e, &path)?;
                        Backing::Object {
                            id: oid,
                            offset: e.offset,
                        }
                    } else if path.starts_with('/') {
                        self.file_backing(pid, e, &path)?
                    } else {
                        return Err(unsupported("shared mapping of an unknown kind"));
                    }
                }
                "" | "[heap]" | "[stack]" => Backing::Anon,
                _ if path.starts_with("[anon:") || path.starts_with("[stack:") => Backing::Anon,
                _ if path.starts_with('/') && !path.ends_with(" (deleted)") => {
                    self.file_backing(pid, e, &path)?
                }
                // A private mapping of a memfd or unlinked file: the object's contents travel
                // as an object, the pages this mapping copied on write as its own.
                _ if is_object_path(&path) && !is_sysv_path(&path) => {
                    let oid = self.object(pid, e, &path)?;
                    Backing::Object {
                        id: oid,
                        offset: e.offset,
                    }
                }
                _ => return Err(unsupported(&format!("private mapping of {path}"))),
            };
            let vma = Vma {
                start: e.start,
                end: e.end,
                prot: p,
                shared: e.shared,
                growsdown: e.vm_flags.iter().any(|f| f == "gd"),
                advise: e
                    .vm_flags
                    .iter()
                    .filter(|f| matches!(f.as_str(), "dc" | "dd" | "wf" | "hg" | "nh"))
                    .cloned()
                    .collect(),
                backing,
            };
            if page_runs {
                if let Some(file_backed) = vma.own_pages() {
                    runs.extend(state_runs(&pagemap, e.start, e.end, file_backed)?);
                }
            }
            vmas.push(vma);
        }
        let fields = mm_fields(pid)?;
        let exe = proc::readlink(proc::pid_path(pid, "exe")).unwrap_or_default();
        self.mms.push(Mm {
            id,
            vmas,
            fields,
            exe,
            vdso,
        });
        self.plans.push(MmPlan {
            id,
            pid,
            runs: crate::merge_ranges(runs),
        });
        self.vdso_base.push(vdso_base);
        Ok(())
    }

    pub fn vdso_of(&self, mm: u32) -> Option<(u64, Vec<u8>)> {
        let i = usize::try_from(mm).ok()?;
        Some((
            self.vdso_base.get(i).copied()??,
            self.mms.get(i)?.vdso.clone(),
        ))
    }

    /// The object id of a shared memory object, registering it on first sight. `path` is the
    /// name shown in /proc; `open_path` a /proc path through which its contents can be read.
    pub fn object_by_inode(
        &mut self,
        dev: u64,
        ino: u64,
        name: &str,
        open_path: &std::path::Path,
    ) -> Result<u32, SrcError> {
        if let Some(&id) = self.object_ids.get(&(dev, ino)) {
            return Ok(id);
        }
        let file = File::open(open_path).map_err(|e| vkm_sys::SysError::Path {
            path: open_path.to_path_buf(),
            source: e,
        })?;
        let meta = file.metadata().map_err(|e| vkm_sys::SysError::Path {
            path: open_path.to_path_buf(),
            source: e,
        })?;
        let kind = if name.starts_with("/memfd:") {
            ObjectKind::Memfd
        } else {
            ObjectKind::TmpFile
        };
        // Seals are only visible through fcntl on the object itself.
        let seals = nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            nix::fcntl::FcntlArg::F_GET_SEALS,
        )
        .map_or(0, |s| u32::try_from(s).unwrap_or(0));
        let size = meta.size();
        Ok(self.add_object((dev, ino), name, kind, file, size, seals))
    }

    fn add_object(
        &mut self,
        key: (u64, u64),
        name: &str,
        kind: ObjectKind,
        file: File,
        size: u64,
        seals: u32,
    ) -> u32 {
        let id = u32::try_from(self.objects.len()).unwrap_or(u32::MAX);
        self.objects.push(MemObject {
            id,
            name: name.to_string(),
            kind,
            size,
            seals,
        });
        self.object_plans.push(ObjectPlan { id, file, size });
        self.object_ids.insert(key, id);
        id
    }

    /// Look at the vkernel's IPC namespace (that of `pid`). When it is the vkernel's own, list
    /// its segments and register those that no process has attached, whose contents can only
    /// be reached by attaching them ourselves. Semaphore sets and message queues are refused:
    /// a checkpoint does not carry them, and the restored vkernel would miss them.
    fn open_sysv(&mut self, pid: i32) -> Result<SysvNs, SrcError> {
        let ino_of = |path: std::path::PathBuf| {
            std::fs::metadata(&path)
                .map(|m| m.ino())
                .map_err(|e| vkm_sys::SysError::Path { path, source: e })
        };
        let ino = ino_of(proc::pid_path(pid, "ns/ipc"))?;
        let own = ino != ino_of("/proc/self/ns/ipc".into())?;
        let mut ns = SysvNs {
            pid,
            ino,
            own,
            segments: BTreeMap::new(),
            objects: BTreeMap::new(),
        };
        if !own {
            return Ok(ns);
        }
        type Unattached = Vec<(ShmStat, File, u64, u64)>;
        let (list, sems, msgs, unattached) = calls::in_ipc_namespace(
            pid,
            || -> Result<(Vec<ShmStat>, u32, u32, Unattached), SrcError> {
                let list = calls::shm_list()?;
                let (sems, msgs) = calls::sem_msg_counts()?;
                let mut unattached = Vec::new();
                for s in list.iter().filter(|s| s.nattch == 0) {
                    // Attached read-only for as long as it takes to open its shmem file (the
                    // segment's shm_atime, shm_dtime and shm_lpid show it, nothing else does).
                    let at = calls::ShmAttachment::new(s.shmid, s.size, true)?;
                    let path = at.map_files_path();
                    let file = File::open(&path).map_err(|e| vkm_sys::SysError::Path {
                        path: path.clone(),
                        source: e,
                    })?;
                    let meta = file
                        .metadata()
                        .map_err(|e| vkm_sys::SysError::Path { path, source: e })?;
                    unattached.push((*s, file, meta.dev(), meta.ino()));
                }
                Ok((list, sems, msgs, unattached))
            },
        )?;
        if sems != 0 || msgs != 0 {
            return Err(SrcError::Unsupported {
                pid: proc::ns_pid(pid).unwrap_or(0),
                what: format!(
                    "its vkernel has {sems} SysV semaphore set(s) and {msgs} message queue(s), which a \
                     checkpoint does not carry (only shared memory segments)"
                ),
            });
        }
        ns.segments = list.into_iter().map(|s| (s.shmid, s)).collect();
        for (s, file, dev, ino) in unattached {
            let name = format!("/SYSV{:08x} (deleted)", s.key as u32);
            let oid = self.add_object(
                (dev, ino),
                &name,
                ObjectKind::SysV(sysv_of(&s)),
                file,
                s.size,
                0,
            );
            ns.objects.insert(s.shmid, oid);
        }
        Ok(ns)
    }

    /// The object of the SysV segment mapped at `e` in address space `mm` (of `pid`),
    /// registered on first sight; records the attachment.
    fn sysv_object(
        &mut self,
        mm: u32,
        pid: i32,
        e: &procfs::Vma,
        path: &str,
    ) -> Result<u32, SrcError> {
        let unsupported = |what: String| SrcError::UnsupportedVma {
            pid,
            start: e.start,
            end: e.end,
            what,
        };
        if e.has_flag("ht") {
            return Err(unsupported("a SysV segment on huge pages".into()));
        }
        let Some(ns) = self.sysv.as_mut() else {
            return Err(unsupported(
                "a SysV segment outside any IPC namespace".into(),
            ));
        };
        let ns_path = proc::pid_path(pid, "ns/ipc");
        let ino = std::fs::metadata(&ns_path)
            .map_err(|err| vkm_sys::SysError::Path {
                path: ns_path,
                source: err,
            })?
            .ino();
        if ino != ns.ino {
            return Err(unsupported(
                "a SysV segment of an IPC namespace the process made for itself".into(),
            ));
        }
        // The inode number of a segment's file is its shmid.
        let shmid = i32::try_from(e.inode)
            .map_err(|_| unsupported(format!("{path} with inode {}", e.inode)))?;
        let oid = match ns.objects.get(&shmid) {
            Some(&oid) => oid,
            None => {
                let stat = match ns.segments.get(&shmid) {
                    Some(s) => *s,
                    None if !ns.own => {
                        let s = calls::in_ipc_namespace(ns.pid, || calls::shm_stat(shmid))?;
                        ns.segments.insert(shmid, s);
                        s
                    }
                    None => {
                        return Err(unsupported(format!(
                            "{path}: no segment {shmid} in the vkernel's IPC namespace"
                        )))
                    }
                };
                let open_path =
                    proc::pid_path(pid, &format!("map_files/{:x}-{:x}", e.start, e.end));
                let file = File::open(&open_path).map_err(|err| vkm_sys::SysError::Path {
                    path: open_path.clone(),
                    source: err,
                })?;
                let meta = file.metadata().map_err(|err| vkm_sys::SysError::Path {
                    path: open_path,
                    source: err,
                })?;
                let oid = self.add_object(
                    (meta.dev(), meta.ino()),
                    path,
                    ObjectKind::SysV(sysv_of(&stat)),
                    file,
                    stat.size,
                    0,
                );
                if let Some(ns) = self.sysv.as_mut() {
                    ns.objects.insert(shmid, oid);
                }
                oid
            }
        };
        if let Some(MemObject {
            kind: ObjectKind::SysV(seg),
            ..
        }) = self.objects.get_mut(oid as usize)
        {
            // The VMAs of one attachment (split by mprotect or a partial munmap) share the
            // address it started at; SHM_RDONLY shows as a mapping that may never be writable.
            let addr = e.start - e.offset;
            if !seg.attaches.iter().any(|a| a.mm == mm && a.addr == addr) {
                seg.attaches.push(SysvAttach {
                    mm,
                    addr,
                    rdonly: !e.has_flag("mw"),
                });
            }
        }
        Ok(oid)
    }

    fn object(&mut self, pid: i32, e: &procfs::Vma, path: &str) -> Result<u32, SrcError> {
        let open_path = proc::pid_path(pid, &format!("map_files/{:x}-{:x}", e.start, e.end));
        let meta = std::fs::metadata(&open_path).map_err(|err| vkm_sys::SysError::Path {
            path: open_path.clone(),
            source: err,
        })?;
        self.object_by_inode(meta.dev(), meta.ino(), path, &open_path)
    }

    /// A private or shared mapping of file `path`: where it is, and the size and mtime the
    /// destination checks its copy of the file against.
    fn file_backing(&mut self, pid: i32, e: &procfs::Vma, path: &str) -> Result<Backing, SrcError> {
        let key = (e.dev_major, e.dev_minor, e.inode);
        let (size, mtime_ns) = match self.files.get(&key) {
            Some(&known) => known,
            None => {
                let map_file = proc::pid_path(pid, &format!("map_files/{:x}-{:x}", e.start, e.end));
                let meta = std::fs::metadata(&map_file).map_err(|err| vkm_sys::SysError::Path {
                    path: map_file,
                    source: err,
                })?;
                let known = (
                    meta.size(),
                    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                );
                self.files.insert(key, known);
                known
            }
        };
        Ok(Backing::File {
            path: path.to_string(),
            offset: e.offset,
            size,
            mtime_ns,
        })
    }

    pub fn finish(self) -> (Vec<Mm>, Vec<MemObject>, MemoryPlan) {
        if let Some(ns) = &self.sysv {
            for s in ns.segments.values() {
                if ns.own && !ns.objects.contains_key(&s.shmid) {
                    // Attached, but by no process of the vkernel: one outside that joined its
                    // namespace. Such an attachment cannot be recreated.
                    tracing::warn!(
                        shmid = s.shmid,
                        key = s.key,
                        "a SysV segment attached only outside the vkernel is not captured"
                    );
                }
            }
        }
        (
            self.mms,
            self.objects,
            MemoryPlan {
                mms: self.plans,
                objects: self.object_plans,
            },
        )
    }
}

/// The name of a SysV shared memory segment's mapping: `/SYSV` and the key in 8 hex digits,
/// shown as deleted (the kernel keeps the name when the segment is marked removed).
fn is_sysv_path(path: &str) -> bool {
    path.strip_prefix("/SYSV")
        .and_then(|p| p.strip_suffix(" (deleted)"))
        .is_some_and(|k| k.len() == 8 && k.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn sysv_of(s: &ShmStat) -> SysvShm {
    SysvShm {
        key: s.key,
        shmid: s.shmid,
        mode: s.mode & 0o777,
        uid: s.uid,
        gid: s.gid,
        cuid: s.cuid,
        cgid: s.cgid,
        removed: s.mode & calls::SHM_DEST != 0,
        locked: s.mode & calls::SHM_LOCKED != 0,
        attaches: Vec::new(),
    }
}

/// Shared mappings whose contents exist nowhere else: memfds, unlinked tmpfs files (UML's RAM
/// file), shared anonymous memory (`/dev/zero (deleted)`).
fn is_object_path(path: &str) -> bool {
    path.starts_with("/memfd:") || path.ends_with(" (deleted)") || path == "/dev/zero"
}

fn read_mem(pid: i32, start: u64, end: u64) -> Result<Vec<u8>, SrcError> {
    let path = proc::pid_path(pid, "mem");
    let f = File::open(&path).map_err(|e| vkm_sys::SysError::Path {
        path: path.clone(),
        source: e,
    })?;
    let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
    f.read_exact_at(&mut buf, start)
        .map_err(|e| vkm_sys::SysError::Path { path, source: e })?;
    Ok(buf)
}

/// Runs of pages of [start, end) that carry state: present or swapped anonymous pages; for a
/// private file mapping only its copied-on-write pages (the rest is in the file).
pub(crate) fn state_runs(
    pagemap: &File,
    start: u64,
    end: u64,
    file_backed: bool,
) -> Result<Vec<(u64, u64)>, SrcError> {
    let page = PAGE_SIZE as u64;
    let mut out = Vec::new();
    let mut a = start;
    let mut buf = vec![0u8; 8 * 4096];
    while a < end {
        let n = ((end - a) / page).min(4096);
        let bytes = usize::try_from(n * 8).unwrap_or(0);
        pagemap
            .read_exact_at(&mut buf[..bytes], a / page * 8)
            .map_err(|e| vkm_sys::SysError::Syscall {
                op: "pread(pagemap)",
                pid: 0,
                source: e,
            })?;
        for (i, c) in buf[..bytes].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_le_bytes(b);
            let swapped = v & PM_SWAPPED != 0 && !is_uffd_wp_marker(v);
            let keep = if file_backed {
                (v & PM_PRESENT != 0 && v & PM_FILE == 0) || swapped
            } else {
                v & PM_PRESENT != 0 || swapped
            };
            if keep {
                let pa = a + i as u64 * page;
                match out.last_mut() {
                    Some((_, e)) if *e == pa => *e = pa + page,
                    _ => out.push((pa, pa + page)),
                }
            }
        }
        a += n * page;
    }
    Ok(out)
}

fn mm_fields(pid: i32) -> Result<MmFields, SrcError> {
    let st = super::read_stat(pid)?;
    let auxv_bytes = proc::read_bytes(proc::pid_path(pid, "auxv"))?;
    let auxv = auxv_bytes
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect();
    Ok(MmFields {
        start_code: st.start_code,
        end_code: st.end_code,
        start_data: st.start_data,
        end_data: st.end_data,
        start_brk: st.start_brk,
        // The exact brk is read by injection later (stat does not show it).
        brk: st.start_brk,
        start_stack: st.start_stack,
        arg_start: st.arg_start,
        arg_end: st.arg_end,
        env_start: st.env_start,
        env_end: st.env_end,
        auxv,
    })
}

pub fn read_smaps(pid: i32) -> Result<Vec<procfs::Vma>, SrcError> {
    let text = proc::read(proc::pid_path(pid, "smaps"))?;
    procfs::parse_smaps(&text).map_err(|source| SrcError::Parse {
        what: "smaps",
        pid,
        source,
    })
}

/// smaps of each of `pids`, by pid; a process gone meanwhile is simply not there.
pub fn smaps_of(pids: impl IntoIterator<Item = i32>) -> BTreeMap<i32, Vec<procfs::Vma>> {
    pids.into_iter()
        .filter_map(|pid| Some((pid, read_smaps(pid).ok()?)))
        .collect()
}

pub(crate) fn read_maps(pid: i32) -> Result<Vec<procfs::Vma>, SrcError> {
    let text = proc::read(proc::pid_path(pid, "maps"))?;
    procfs::parse_maps(&text).map_err(|source| SrcError::Parse {
        what: "maps",
        pid,
        source,
    })
}

/// Whether two readings show the same mappings (what maps shows of each: range, protection,
/// sharing, offset, file). A madvise() that changes only the flags of whole mappings shows in
/// smaps' VmFlags but not here; such a change in the milliseconds between the reading before a
/// freeze and the freeze is not seen.
pub(crate) fn same_mappings(maps: &[procfs::Vma], smaps: &[procfs::Vma]) -> bool {
    maps.len() == smaps.len()
        && maps.iter().zip(smaps).all(|(a, b)| {
            (a.start, a.end, a.read, a.write, a.exec, a.shared, a.offset)
                == (b.start, b.end, b.read, b.write, b.exec, b.shared, b.offset)
                && (a.dev_major, a.dev_minor, a.inode) == (b.dev_major, b.dev_minor, b.inode)
                && a.path == b.path
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me ac sd
7ffd1000000-7ffd1021000 rw-p 00000000 00:00 0                            [stack]
Size:                132 kB
Rss:                   8 kB
VmFlags: rd wr mr mw me gd ac dd
";

    /// The maps lines of an smaps text (its field lines start with `Name:`).
    fn maps_of(smaps: &str) -> String {
        smaps
            .lines()
            .filter(|l| l.split(' ').next().is_some_and(|f| !f.ends_with(':')))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn flags_read_before_the_freeze_are_used_only_for_the_same_mappings() {
        let known = procfs::parse_smaps(SMAPS).expect("smaps");
        let same = procfs::parse_maps(&maps_of(SMAPS)).expect("maps");
        assert!(same_mappings(&same, &known));
        // mprotect, a grown heap, a new mapping: smaps is read again.
        for changed in [
            SMAPS.replace(
                "rw-p 00000000 00:00 0                          [heap]",
                "r--p 00000000 00:00 0                          [heap]",
            ),
            SMAPS.replace("55d0c0021000", "55d0c0042000"),
            format!("{SMAPS}7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \nVmFlags: rd wr\n"),
        ] {
            let maps = procfs::parse_maps(&maps_of(&changed)).expect("maps");
            assert!(!same_mappings(&maps, &known), "{changed}");
        }
    }
}
