//! `vkmigrate inspect`: verify an image and show what it holds (text or JSON).

use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use vkm_common::image::{verify, ImageReader, Space, Summary, PAGE_SIZE};
use vkm_common::model::{features, prot, Backing, FileKind, Vkernel, Vma};

use crate::cli::InspectArgs;
use crate::human;
use crate::shim::read_meta;

pub fn inspect(args: InspectArgs) -> Result<()> {
    let path = &args.image;
    let open =
        || File::open(path).with_context(|| format!("Cannot open the image {}", path.display()));
    let summary = verify(BufReader::with_capacity(1 << 20, open()?))
        .with_context(|| format!("The image {} failed verification", path.display()))?;
    let vk = ImageReader::new(BufReader::new(open()?))
        .map_err(anyhow::Error::from)
        .and_then(|mut r| read_meta(&mut r))
        .with_context(|| format!("Cannot read the image {}", path.display()))?;
    if args.json {
        let report = JsonReport::new(path, &summary, &vk);
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text_report(path, &summary, &vk));
    }
    Ok(())
}

fn feature_names(bits: u64) -> Vec<String> {
    let mut names = Vec::new();
    let known = [(features::XSTATE, "xstate"), (features::TIME_NS, "time_ns")];
    let mut rest = bits;
    for (bit, name) in known {
        if bits & bit != 0 {
            names.push(name.to_owned());
            rest &= !bit;
        }
    }
    if rest != 0 {
        names.push(format!("unknown {rest:#x}"));
    }
    names
}

fn threads(vk: &Vkernel) -> usize {
    vk.processes.iter().map(|p| p.threads.len()).sum()
}

#[derive(Serialize)]
struct JsonReport<'a> {
    image: String,
    format: JsonFormat,
    summary: JsonSummary,
    vkernel: &'a Vkernel,
}

#[derive(Serialize)]
struct JsonFormat {
    major: u16,
    minor: u16,
    features: u64,
    feature_names: Vec<String>,
}

#[derive(Serialize)]
struct JsonSummary {
    image_bytes: u64,
    meta_bytes: u64,
    processes: usize,
    threads: usize,
    /// Anonymous memory and memory objects the vkernel maps.
    mapped_bytes: u64,
    page_frames: u64,
    compressed_page_frames: u64,
    /// Non-zero pages stored, and their size before and after compression.
    pages: u64,
    page_bytes: u64,
    page_bytes_encoded: u64,
    spaces: Vec<JsonSpace>,
    blobs: Vec<JsonBlob>,
    /// Decoded from the register blobs, for quick checks.
    thread_regs: Vec<JsonThread>,
}

#[derive(Serialize)]
struct JsonSpace {
    kind: &'static str,
    id: u32,
    pages: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonBlob {
    name: String,
    bytes: u64,
}

#[derive(Serialize)]
struct JsonThread {
    pid: i32,
    tid: i32,
    rip: Option<u64>,
    fs_base: Option<u64>,
}

impl<'a> JsonReport<'a> {
    fn new(path: &Path, s: &Summary, vk: &'a Vkernel) -> Self {
        JsonReport {
            image: path.display().to_string(),
            format: JsonFormat {
                major: s.header.major,
                minor: s.header.minor,
                features: s.header.features,
                feature_names: feature_names(s.header.features),
            },
            summary: JsonSummary {
                image_bytes: s.total_bytes,
                meta_bytes: s.meta_bytes,
                processes: vk.processes.len(),
                threads: threads(vk),
                mapped_bytes: vk.mapped_bytes(),
                page_frames: s.page_frames,
                compressed_page_frames: s.compressed_page_frames,
                pages: s.pages,
                page_bytes: s.pages.saturating_mul(PAGE_SIZE as u64),
                page_bytes_encoded: s.page_bytes_encoded,
                spaces: s
                    .pages_per_space
                    .iter()
                    .map(|(space, &pages)| {
                        let (kind, id) = match *space {
                            Space::Mm(id) => ("mm", id),
                            Space::Object(id) => ("object", id),
                        };
                        JsonSpace {
                            kind,
                            id,
                            pages,
                            bytes: pages.saturating_mul(PAGE_SIZE as u64),
                        }
                    })
                    .collect(),
                blobs: s
                    .blobs
                    .iter()
                    .map(|(name, bytes)| JsonBlob {
                        name: name.clone(),
                        bytes: *bytes,
                    })
                    .collect(),
                thread_regs: vk
                    .processes
                    .iter()
                    .flat_map(|p| {
                        p.threads.iter().map(move |t| {
                            let regs = vkm_sys::ptrace::regs_from_bytes(&t.regs);
                            JsonThread {
                                pid: p.pid,
                                tid: t.tid,
                                rip: regs.map(|r| r.rip),
                                fs_base: regs.map(|r| r.fs_base),
                            }
                        })
                    })
                    .collect(),
            },
            vkernel: vk,
        }
    }
}

fn perms(v: &Vma) -> String {
    let bit = |b: u32, c: char| if v.prot & b != 0 { c } else { '-' };
    format!(
        "{}{}{}{}",
        bit(prot::READ, 'r'),
        bit(prot::WRITE, 'w'),
        bit(prot::EXEC, 'x'),
        if v.shared { 's' } else { 'p' }
    )
}

fn backing(b: &Backing) -> String {
    match b {
        Backing::Anon => "anon".into(),
        Backing::File {
            path, offset, size, ..
        } => format!("file {path} @{offset:#x} (file size {size})"),
        Backing::Object { id, offset } => format!("object {id} @{offset:#x}"),
        Backing::Vdso => "[vdso]".into(),
        Backing::Vvar => "[vvar]".into(),
        Backing::VvarVclock => "[vvar_vclock]".into(),
        Backing::Vsyscall => "[vsyscall]".into(),
    }
}

fn file_kind(k: &FileKind) -> String {
    match k {
        FileKind::Regular { path } => format!("regular {path}"),
        FileKind::Directory { path } => format!("directory {path}"),
        FileKind::CharDevice { path, rdev } => format!("char device {path} (rdev {rdev:#x})"),
        FileKind::Pipe { pipe, write_end } => {
            format!(
                "pipe {pipe} ({} end)",
                if *write_end { "write" } else { "read" }
            )
        }
        FileKind::Object { id } => format!("object {id}"),
        FileKind::Console => "console".into(),
        FileKind::EventFd { count, semaphore } => {
            format!(
                "eventfd count {count}{}",
                if *semaphore { " (semaphore)" } else { "" }
            )
        }
        FileKind::PidFd { pid: 0 } => "pidfd of a reaped process".into(),
        FileKind::PidFd { pid } => format!("pidfd of process {pid}"),
        FileKind::UnixSocket(u) => format!(
            "unix socket type {} (peer {}, {} bytes queued in {} messages)",
            u.sock_type,
            u.peer,
            u.queue.iter().map(Vec::len).sum::<usize>(),
            u.queue.len()
        ),
        FileKind::Epoll { items } => format!("epoll ({} registrations)", items.len()),
        FileKind::SignalFd { mask } => format!("signalfd mask {mask:#x}"),
        FileKind::TimerFd(t) => format!(
            "timerfd clock {} (next in {} ns, interval {} ns, {} unread)",
            t.clockid, t.value_ns, t.interval_ns, t.ticks
        ),
        FileKind::Tun { ifname, flags, .. } => format!("tun/tap {ifname} (flags {flags:#x})"),
    }
}

/// The text report; `writeln!` into a String cannot fail.
fn text_report(path: &Path, s: &Summary, vk: &Vkernel) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "image {} ({}, verified)",
        path.display(),
        human::size(s.total_bytes)
    );
    let _ = writeln!(
        o,
        "  format {}.{}, features {:#x} [{}]",
        s.header.major,
        s.header.minor,
        s.header.features,
        feature_names(s.header.features).join(", ")
    );
    let _ = writeln!(o, "vkernel {}", vk.name);
    let _ = writeln!(o, "  command      {}", human::shell_words(&vk.argv));
    let _ = writeln!(o, "  source host  {}", vk.source_host);
    let _ = writeln!(
        o,
        "  clocks       monotonic {}, boottime {}, realtime {}",
        human::secs_ns(vk.clocks.monotonic_ns),
        human::secs_ns(vk.clocks.boottime_ns),
        human::rfc3339_ns(vk.clocks.realtime_ns)
    );
    let _ = writeln!(
        o,
        "  cpu          xstate {} bytes, xcr0 {:#x}",
        vk.cpu.xstate_size, vk.cpu.xcr0
    );
    match &vk.console {
        Some(c) => {
            let _ = writeln!(
                o,
                "  console      {}x{}, termios {} bytes",
                c.cols,
                c.rows,
                c.termios.len()
            );
        }
        None => {
            let _ = writeln!(o, "  console      none");
        }
    }
    let _ = writeln!(
        o,
        "  memory       {} mapped (anonymous and objects)",
        human::size(vk.mapped_bytes())
    );

    let _ = writeln!(
        o,
        "processes ({}, {} threads)",
        vk.processes.len(),
        threads(vk)
    );
    for p in &vk.processes {
        let fds = vk
            .fd_tables
            .get(p.fd_table as usize)
            .map_or(0, |t| t.fds.len());
        let _ = writeln!(
            o,
            "  pid {} ppid {} pgid {} sid {} {:?}: mm {}, fd table {} ({} fds), {} signal handlers, {} timers",
            p.pid,
            p.ppid,
            p.pgid,
            p.sid,
            p.comm,
            p.mm,
            p.fd_table,
            fds,
            p.sigactions.len(),
            p.itimers.len() + p.posix_timers.len()
        );
        for t in &p.threads {
            match vkm_sys::ptrace::regs_from_bytes(&t.regs) {
                Some(r) => {
                    let _ = writeln!(
                        o,
                        "    thread {} {:?}: rip {:#x} fs_base {:#x}",
                        t.tid, t.comm, r.rip, r.fs_base
                    );
                }
                None => {
                    let _ = writeln!(
                        o,
                        "    thread {} {:?}: registers blob of {} bytes (unreadable)",
                        t.tid,
                        t.comm,
                        t.regs.len()
                    );
                }
            }
        }
    }

    let _ = writeln!(o, "address spaces ({})", vk.mms.len());
    for mm in &vk.mms {
        let _ = writeln!(o, "  mm {}: {} vmas, exe {}", mm.id, mm.vmas.len(), mm.exe);
        for v in &mm.vmas {
            let mut extra = String::new();
            if v.growsdown {
                extra.push_str(" growsdown");
            }
            if !v.advise.is_empty() {
                let _ = write!(extra, " advise {}", v.advise.join(","));
            }
            let _ = writeln!(
                o,
                "    {:016x}-{:016x} {} {:>10} {}{}",
                v.start,
                v.end,
                perms(v),
                human::size(v.end.saturating_sub(v.start)),
                backing(&v.backing),
                extra
            );
        }
    }

    let _ = writeln!(o, "memory objects ({})", vk.objects.len());
    for ob in &vk.objects {
        let _ = writeln!(
            o,
            "  object {}: {:?} {:?}, {}, seals {:#x}",
            ob.id,
            ob.kind,
            ob.name,
            human::size(ob.size),
            ob.seals
        );
    }

    let _ = writeln!(o, "open files ({})", vk.files.len());
    for f in &vk.files {
        let _ = writeln!(
            o,
            "  file {}: {}, flags {:#o}, pos {}",
            f.id,
            file_kind(&f.kind),
            f.flags,
            f.pos
        );
    }

    let _ = writeln!(o, "pipes ({})", vk.pipes.len());
    for p in &vk.pipes {
        let _ = writeln!(
            o,
            "  pipe {}: {} bytes buffered, capacity {}",
            p.id,
            p.data.len(),
            p.capacity
        );
    }

    let _ = writeln!(o, "network devices ({})", vk.net.len());
    for d in &vk.net {
        let list = |v: &[vkm_common::net::IfAddr]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            o,
            "  {} ({}{}{}): mac {}, mtu {}, {}, addresses [{}], {} routes",
            d.name,
            if d.is_tap() { "tap" } else { "tun" },
            if d.persist { ", persistent" } else { "" },
            if d.owned { ", owned" } else { "" },
            d.mac.as_ref().map_or("-".into(), vkm_common::net::fmt_mac),
            d.mtu,
            if d.up { "up" } else { "down" },
            list(&d.addrs),
            d.routes.len()
        );
        if let Some(b) = &d.bridge {
            let _ = writeln!(
                o,
                "    bridge {}{}: mtu {}, addresses [{}]",
                b.name,
                if b.owned { " (owned)" } else { "" },
                b.mtu,
                list(&b.addrs)
            );
        }
        let macs: Vec<String> = d.guest_macs.iter().map(vkm_common::net::fmt_mac).collect();
        let _ = writeln!(o, "    guest MACs [{}]", macs.join(" "));
    }

    let _ = writeln!(
        o,
        "pages: {} stored ({}), {} encoded in {} frames ({} compressed)",
        s.pages,
        human::size(s.pages.saturating_mul(PAGE_SIZE as u64)),
        human::size(s.page_bytes_encoded),
        s.page_frames,
        s.compressed_page_frames
    );
    for (space, pages) in &s.pages_per_space {
        let _ = writeln!(
            o,
            "  {space}: {pages} pages ({})",
            human::size(pages.saturating_mul(PAGE_SIZE as u64))
        );
    }
    if !s.blobs.is_empty() {
        let _ = writeln!(o, "blobs ({})", s.blobs.len());
        for (name, len) in &s.blobs {
            let _ = writeln!(o, "  {name}: {}", human::size(*len));
        }
    }
    o
}
