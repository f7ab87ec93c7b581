//! Reading a frozen vkernel's state into the model ([`vkm_common::model::Vkernel`]).
//!
//! Everything here only reads: /proc, ptrace regsets, and syscalls injected into stopped
//! threads that leave no trace (the scratch page they use is unmapped again and the registers
//! are put back). So a capture that fails, or a `--leave-running` checkpoint, leaves the
//! vkernel exactly as it was.

mod files;
mod memory;
mod process;

use std::collections::BTreeMap;

use vkm_common::model::{self, Clocks, CpuInfo, Vkernel};
use vkm_sys::calls;

use crate::freeze::Frozen;
use crate::SrcError;

pub(crate) use memory::{data_extents, read_maps, same_mappings, state_runs};
pub use memory::{read_smaps, smaps_of, MemoryPlan};

#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    pub name: String,
    pub argv: Vec<String>,
    /// Path of the pty slave the shim gave the vkernel as its console (`/dev/pts/N`).
    pub console_tty: Option<String>,
    /// Leave out which pages carry state (the memory plan's runs): a live migration's final
    /// capture works them out only where it needs them, and reading pagemap costs
    /// milliseconds per GiB while the vkernel is frozen.
    pub skip_page_runs: bool,
    /// The network devices vkmigrate created for this vkernel (see
    /// [`vkm_common::net::NetDev::owned`]).
    pub owned_net: Vec<vkm_common::net::OwnedNet>,
    /// Devices read just before the freeze: used as they are instead of being read again
    /// while the vkernel is frozen (a live migration's final capture).
    pub known_net: Vec<vkm_common::net::NetDev>,
    /// `/proc/PID/smaps` of processes (by host pid), read just before the freeze: reading it
    /// while frozen walks every page table (about 20 ms per GiB here), where maps costs a
    /// fraction of a millisecond. Used for a process whose maps, read while frozen, show the
    /// very same mappings; otherwise smaps is read again.
    pub known_smaps: BTreeMap<i32, Vec<vkm_common::procfs::Vma>>,
}

/// The model plus what the page writer needs to read the memory that goes with it.
pub struct Captured {
    pub vk: Vkernel,
    pub memory: MemoryPlan,
    /// Signals held back during injections: (host tgid, host tid, signal).
    pub held: Vec<(i32, i32, i32)>,
}

/// The host-side configuration of every tun/tap device the vkernel's fds are attached to.
fn capture_net(
    files: &[model::OpenFile],
    opts: &CaptureOptions,
) -> Result<Vec<vkm_common::net::NetDev>, SrcError> {
    let mut names: Vec<&str> = files
        .iter()
        .filter_map(|f| match &f.kind {
            model::FileKind::Tun { ifname, .. } => Some(ifname.as_str()),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let mut dev = match opts.known_net.iter().find(|d| d.name == name) {
                Some(d) => d.clone(),
                None => read_net(name)?,
            };
            dev.set_owned(&opts.owned_net);
            Ok(dev)
        })
        .collect()
}

/// The host-side configuration of tun/tap device `name`, read now.
pub(crate) fn read_net(name: &str) -> Result<vkm_common::net::NetDev, SrcError> {
    vkm_netconf::capture(name).map_err(|source| SrcError::Net {
        ifname: name.to_owned(),
        source,
    })
}

/// Capture a frozen vkernel.
pub fn capture(frozen: &Frozen, opts: &CaptureOptions) -> Result<Captured, SrcError> {
    let (files, procs) = begin(frozen, opts)?;
    // The fd tables are read from /proc and through pidfds, which any thread may do, so on the
    // other CPU while this one (the tracer, which alone may inject) captures the processes:
    // the two take about as long.
    let (tables, processes) = std::thread::scope(|scope| {
        let tables = scope.spawn(|| {
            frozen.move_elsewhere();
            files.capture()
        });
        let processes = procs.capture(frozen);
        // A panic there is a bug of ours: it goes on here as one.
        let tables = tables
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (tables, processes)
    });
    finish(frozen, opts, tables?, processes?)
}

/// The first part of a capture: how processes share address spaces and fd tables, and the
/// address spaces' layouts, which must be read before any injection maps its scratch page.
/// The rest is in two halves: [`FilesToCapture::capture`], on any thread, and
/// [`ProcessesToCapture::capture`], on the thread that froze the vkernel (the tracer); then
/// [`finish`].
pub fn begin(
    frozen: &Frozen,
    opts: &CaptureOptions,
) -> Result<(FilesToCapture, ProcessesToCapture), SrcError> {
    if frozen.processes.is_empty() {
        return Err(SrcError::Empty);
    }
    let host_to_ns: BTreeMap<i32, i32> = frozen
        .processes
        .iter()
        .map(|p| (p.host_pid, p.ns_pid))
        .chain(std::iter::once((frozen.init, 1)))
        .collect();

    // Sharing between processes is found with kcmp: the first process of each group owns the
    // object, the others point at it.
    let mut mm_owner: Vec<i32> = Vec::new(); // host pid per mm id
    let mut table_owner: Vec<i32> = Vec::new();
    let mut proc_mm = Vec::new();
    let mut proc_table = Vec::new();
    for p in &frozen.processes {
        if p.zombie.is_some() {
            proc_mm.push(model::NONE);
            proc_table.push(model::NONE);
            continue;
        }
        proc_mm.push(group(&mut mm_owner, p.host_pid, calls::KCMP_VM)?);
        proc_table.push(group(&mut table_owner, p.host_pid, calls::KCMP_FILES)?);
    }

    let t0 = std::time::Instant::now();
    let mut mem = memory::MemoryCapture::default();
    for (id, &pid) in mm_owner.iter().enumerate() {
        mem.capture_mm(
            u32::try_from(id).unwrap_or(u32::MAX),
            pid,
            !opts.skip_page_runs,
            opts.known_smaps.get(&pid).map(Vec::as_slice),
        )?;
    }
    tracing::debug!(
        layout_ms = t0.elapsed().as_secs_f64() * 1e3,
        "address spaces captured"
    );
    let vdsos = proc_mm.iter().map(|&mm| mem.vdso_of(mm)).collect();
    Ok((
        FilesToCapture {
            host_to_ns: host_to_ns.clone(),
            console_tty: opts.console_tty.clone(),
            table_owner,
            mem,
        },
        ProcessesToCapture {
            host_to_ns,
            proc_mm,
            proc_table,
            vdsos,
        },
    ))
}

/// The fd tables, still to be read (see [`begin`]).
pub struct FilesToCapture {
    host_to_ns: BTreeMap<i32, i32>,
    console_tty: Option<String>,
    /// Host pid of a process that has each table, by table id.
    table_owner: Vec<i32>,
    /// The layouts: an fd of a memory object that is also mapped refers to it.
    mem: memory::MemoryCapture,
}

/// The fd tables, and the memory capture that goes with them.
pub struct CapturedFiles {
    tables: Vec<model::FdTable>,
    files: Vec<model::OpenFile>,
    pipes: Vec<model::Pipe>,
    console: Option<model::Console>,
    mem: memory::MemoryCapture,
}

impl FilesToCapture {
    pub fn capture(mut self) -> Result<CapturedFiles, SrcError> {
        let t = std::time::Instant::now();
        let mut fcap = files::FileCapture::new(&self.host_to_ns, self.console_tty.as_deref());
        let tables = self
            .table_owner
            .iter()
            .enumerate()
            .map(|(id, &pid)| {
                fcap.capture_table(u32::try_from(id).unwrap_or(u32::MAX), pid, &mut self.mem)
            })
            .collect::<Result<Vec<_>, SrcError>>()?;
        tracing::debug!(
            files_ms = t.elapsed().as_secs_f64() * 1e3,
            "fd tables captured"
        );
        let console = fcap.console()?;
        let (files, pipes) = fcap.finish();
        Ok(CapturedFiles {
            tables,
            files,
            pipes,
            console,
            mem: self.mem,
        })
    }
}

/// The processes, still to be read (see [`begin`]).
pub struct ProcessesToCapture {
    host_to_ns: BTreeMap<i32, i32>,
    /// Each process's address space and fd table ids ([`model::NONE`] for a zombie).
    proc_mm: Vec<u32>,
    proc_table: Vec<u32>,
    /// Each process's [vdso] (base, contents), whose syscall instruction injections borrow.
    vdsos: Vec<Option<(u64, Vec<u8>)>>,
}

impl ProcessesToCapture {
    /// Every process of the frozen tree, in order. Only on the thread that froze the vkernel:
    /// it injects.
    pub fn capture(&self, frozen: &Frozen) -> Result<CapturedProcesses, SrcError> {
        let t = std::time::Instant::now();
        // Threads record their capabilities only where they differ from ours, which restore
        // gives every thread to begin with.
        let own_caps = process::caps_of(&vkm_sys::proc::read("/proc/thread-self/status")?);
        let mut processes = Vec::new();
        let mut brks = Vec::new();
        let mut held = Vec::new();
        for (i, p) in frozen.processes.iter().enumerate() {
            if let Some(status) = p.zombie {
                processes.push(process::capture_zombie(p, &self.host_to_ns, status)?);
                continue;
            }
            let (proc, brk, h) = process::capture_process(
                p,
                &self.host_to_ns,
                &own_caps,
                self.proc_mm[i],
                self.proc_table[i],
                self.vdsos.get(i).cloned().flatten(),
            )?;
            brks.push((self.proc_mm[i], brk));
            held.extend(h.into_iter().map(|(tid, sig)| (p.host_pid, tid, sig)));
            processes.push(proc);
        }
        tracing::debug!(
            processes_ms = t.elapsed().as_secs_f64() * 1e3,
            "processes captured"
        );
        Ok((processes, brks, held))
    }
}

/// The last part of a capture: the model, from the two halves.
pub fn finish(
    frozen: &Frozen,
    opts: &CaptureOptions,
    files: CapturedFiles,
    processes: CapturedProcesses,
) -> Result<Captured, SrcError> {
    let CapturedFiles {
        tables,
        files,
        pipes,
        console,
        mem,
    } = files;
    let (processes, brks, held) = processes;
    let first = frozen
        .processes
        .iter()
        .find(|p| p.zombie.is_none())
        .ok_or(SrcError::Empty)?;
    let clocks = read_clocks(first.host_pid)?;
    let cpu = processes
        .first()
        .and_then(|p: &model::Process| p.threads.first())
        .map(|t| CpuInfo {
            xstate_size: t.xstate.len() as u32,
            xcr0: xcr0_of(&t.xstate),
        })
        .unwrap_or_default();

    let (mut mms, objects, plan) = mem.finish();
    for (mm, brk) in brks {
        if let Some(m) = mms.get_mut(mm as usize) {
            m.fields.brk = brk;
        }
    }
    let t_net = std::time::Instant::now();
    let net = capture_net(&files, opts)?;
    tracing::debug!(
        net_ms = t_net.elapsed().as_secs_f64() * 1e3,
        devices = net.len(),
        "network captured"
    );
    let vk = Vkernel {
        name: opts.name.clone(),
        argv: opts.argv.clone(),
        source_host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        clocks,
        cpu,
        processes,
        mms,
        objects,
        fd_tables: tables,
        files,
        pipes,
        console,
        net,
        mconsole: frozen.mconsole().map(|p| p.to_string_lossy().into_owned()),
    };
    Ok(Captured {
        vk,
        memory: plan,
        held,
    })
}

/// The processes' model, each address space's brk, and the signals held back during
/// injections (see [`ProcessesToCapture::capture`]).
pub type CapturedProcesses = (Vec<model::Process>, Vec<(u32, u64)>, Vec<(i32, i32, i32)>);

/// Index of the group `pid` belongs to (by kcmp `kind`), adding a new group when none matches.
fn group(owners: &mut Vec<i32>, pid: i32, kind: i32) -> Result<u32, SrcError> {
    for (i, &o) in owners.iter().enumerate() {
        if calls::kcmp_same(o, pid, kind, 0, 0)? {
            return Ok(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    owners.push(pid);
    Ok(u32::try_from(owners.len() - 1).unwrap_or(u32::MAX))
}

/// The vkernel's own view of its clocks now (it is frozen, so "now" is the freeze).
fn read_clocks(pid: i32) -> Result<Clocks, SrcError> {
    let path = vkm_sys::proc::pid_path(pid, "timens_offsets");
    let text = vkm_sys::proc::read(&path)?;
    let off =
        vkm_common::procfs::parse_timens_offsets(&text).map_err(|source| SrcError::Parse {
            what: "timens_offsets",
            pid,
            source,
        })?;
    let ns = |o: vkm_common::procfs::TimeOffset| {
        i128::from(o.secs) * 1_000_000_000 + i128::from(o.nsecs)
    };
    Ok(Clocks {
        monotonic_ns: calls::clock_ns(libc::CLOCK_MONOTONIC) + ns(off.monotonic),
        boottime_ns: calls::clock_ns(libc::CLOCK_BOOTTIME) + ns(off.boottime),
        realtime_ns: calls::clock_ns(libc::CLOCK_REALTIME),
    })
}

/// XCR0 as the kernel saved it in the xsave header's software-reserved area.
fn xcr0_of(xstate: &[u8]) -> u64 {
    xstate
        .get(464..472)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

/// `/proc/PID/stat`, parsed.
pub(super) fn read_stat(pid: i32) -> Result<vkm_common::procfs::Stat, SrcError> {
    let text = vkm_sys::proc::read(vkm_sys::proc::pid_path(pid, "stat"))?;
    vkm_common::procfs::parse_stat(&text).map_err(|source| SrcError::Parse {
        what: "stat",
        pid,
        source,
    })
}

/// `/proc/PID/status`, parsed.
pub(super) fn read_status(pid: i32) -> Result<vkm_common::procfs::Status, SrcError> {
    let text = vkm_sys::proc::read(vkm_sys::proc::pid_path(pid, "status"))?;
    vkm_common::procfs::parse_status(&text).map_err(|source| SrcError::Parse {
        what: "status",
        pid,
        source,
    })
}
