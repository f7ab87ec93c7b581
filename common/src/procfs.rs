//! Pure parsers of /proc text, for Linux 6.18 x86_64.
//!
//! Each parser takes a file's whole text (the caller reads it) and returns typed data, or
//! [`CommonError::Parse`] naming the file kind and the offending line. No parser panics or
//! allocates in proportion to anything but its input, whatever the input.
//!
//! PIDs in these files are as seen from the PID namespace of the /proc mount they were read from
//! (for `/proc/PID/status`, `NSpid` and friends also list the inner namespaces' values).

use std::fmt::Write as _;

use crate::error::{CommonError, Result};

// ---------------------------------------------------------------------------------------------
// Number helpers: strict (no sign or `+` where the kernel prints none, no empty strings).

fn dec_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn dec_u32(s: &str) -> Option<u32> {
    dec_u64(s).and_then(|v| u32::try_from(v).ok())
}

fn dec_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn dec_i32(s: &str) -> Option<i32> {
    dec_i64(s).and_then(|v| i32::try_from(v).ok())
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn hex_u32(s: &str) -> Option<u32> {
    hex_u64(s).and_then(|v| u32::try_from(v).ok())
}

fn oct_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(s, 8).ok()
}

/// The lines of a file, without their `\n` (a final empty piece after the last `\n` is dropped).
fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_terminator('\n')
}

/// Splits off the next space-separated token (leading spaces skipped).
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    match s.find(' ') {
        Some(i) => Some((&s[..i], &s[i..])),
        None => Some((s, "")),
    }
}

// ---------------------------------------------------------------------------------------------
// maps / smaps

/// One mapping of `/proc/PID/maps` or `/proc/PID/smaps`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Vma {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (MAP_SHARED) rather than `p`.
    pub shared: bool,
    /// File offset (bytes).
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The name as the kernel shows it: a path (which may contain spaces, end in `" (deleted)"`
    /// and have a newline escaped as `\012`), `[heap]`, `[stack]`, `[vdso]`, `[anon:NAME]`, ...
    /// `None` for an anonymous mapping without a name.
    pub path: Option<String>,
    /// Two-letter codes of the `VmFlags:` line (smaps only; empty for maps).
    pub vm_flags: Vec<String>,
    /// `Size:` (smaps only; 0 for maps).
    pub size_kb: u64,
    /// `Rss:` (smaps only).
    pub rss_kb: u64,
    /// `Anonymous:` (smaps only).
    pub anonymous_kb: u64,
    /// `Swap:` (smaps only).
    pub swap_kb: u64,
}

impl Vma {
    /// Whether `VmFlags:` lists `code` (e.g. `"gd"` for a grows-down stack, `"dc"` DONTCOPY).
    pub fn has_flag(&self, code: &str) -> bool {
        self.vm_flags.iter().any(|f| f == code)
    }

    /// `PROT_READ | PROT_WRITE | PROT_EXEC` bits of the permissions.
    pub fn prot(&self) -> u32 {
        u32::from(self.read) | u32::from(self.write) << 1 | u32::from(self.exec) << 2
    }

    /// Whether the name ends in `" (deleted)"`: the file was unlinked (or it is a memfd or an
    /// O_TMPFILE). A file whose real name ends so is indistinguishable here; check the inode.
    pub fn is_deleted(&self) -> bool {
        self.path
            .as_deref()
            .is_some_and(|p| p.ends_with(" (deleted)"))
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Never true: the parsers reject empty ranges.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Parses `/proc/PID/maps`.
pub fn parse_maps(text: &str) -> Result<Vec<Vma>> {
    lines(text).map(|l| parse_vma_header("maps", l)).collect()
}

/// Parses `/proc/PID/smaps`. Fields other than `Size`, `Rss`, `Anonymous`, `Swap` and `VmFlags`
/// are ignored (their syntax is not checked either, so new kernel fields do no harm).
pub fn parse_smaps(text: &str) -> Result<Vec<Vma>> {
    const FILE: &str = "smaps";
    let mut vmas: Vec<Vma> = Vec::new();
    for line in lines(text) {
        let first = line.split(' ').next().unwrap_or("");
        let Some(key) = first.strip_suffix(':') else {
            vmas.push(parse_vma_header(FILE, line)?);
            continue;
        };
        let value = &line[first.len()..];
        let Some(vma) = vmas.last_mut() else {
            return Err(CommonError::parse(FILE, line, "field before any mapping"));
        };
        let slot = match key {
            "VmFlags" => {
                vma.vm_flags = value.split_ascii_whitespace().map(str::to_owned).collect();
                continue;
            }
            "Size" => &mut vma.size_kb,
            "Rss" => &mut vma.rss_kb,
            "Anonymous" => &mut vma.anonymous_kb,
            "Swap" => &mut vma.swap_kb,
            _ => continue,
        };
        let mut it = value.split_ascii_whitespace();
        match (it.next().and_then(dec_u64), it.next(), it.next()) {
            (Some(kb), Some("kB"), None) => *slot = kb,
            _ => return Err(CommonError::parse(FILE, line, "expected a size in kB")),
        }
    }
    Ok(vmas)
}

/// Parses `start-end perms offset major:minor inode [name]`.
fn parse_vma_header(file: &'static str, line: &str) -> Result<Vma> {
    let err = |reason: &str| CommonError::parse(file, line, reason);
    let (range, rest) = next_token(line).ok_or_else(|| err("empty line"))?;
    let (start, end) = range
        .split_once('-')
        .and_then(|(s, e)| Some((hex_u64(s)?, hex_u64(e)?)))
        .ok_or_else(|| err("bad address range"))?;
    if start >= end {
        return Err(err("empty or inverted address range"));
    }
    let (perms, rest) = next_token(rest).ok_or_else(|| err("missing permissions"))?;
    let p = perms.as_bytes();
    if p.len() != 4
        || !matches!(p[0], b'r' | b'-')
        || !matches!(p[1], b'w' | b'-')
        || !matches!(p[2], b'x' | b'-')
        || !matches!(p[3], b's' | b'p')
    {
        return Err(err("bad permissions"));
    }
    let (offset, rest) = next_token(rest).ok_or_else(|| err("missing offset"))?;
    let offset = hex_u64(offset).ok_or_else(|| err("bad offset"))?;
    let (dev, rest) = next_token(rest).ok_or_else(|| err("missing device"))?;
    let (dev_major, dev_minor) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((hex_u32(a)?, hex_u32(b)?)))
        .ok_or_else(|| err("bad device"))?;
    let (inode, rest) = next_token(rest).ok_or_else(|| err("missing inode"))?;
    let inode = dec_u64(inode).ok_or_else(|| err("bad inode"))?;
    // The kernel pads with spaces up to the name's column; the name runs to the end of the line.
    let name = rest.trim_start_matches(' ');
    Ok(Vma {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset,
        dev_major,
        dev_minor,
        inode,
        path: (!name.is_empty()).then(|| name.to_owned()),
        ..Vma::default()
    })
}

// ---------------------------------------------------------------------------------------------
// status

/// The fields of `/proc/PID/status` that vkmigrate uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// As the kernel escapes it in this file (`\n` → `\\n`, `\\` → `\\\\`); `stat`'s comm is raw.
    pub name: String,
    /// `None` for a zombie (the kernel omits the line when the task has no fs_struct).
    pub umask: Option<u32>,
    /// The state letter (`R`, `S`, `D`, `T`, `t`, `Z`, `X`, `I`, ...).
    pub state: char,
    pub tgid: i32,
    pub pid: i32,
    pub ppid: i32,
    pub tracer_pid: i32,
    /// Real, effective, saved and filesystem UID.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem GID.
    pub gid: [u32; 4],
    /// The PID in each PID namespace from the reader's down to the task's own (last).
    pub nspid: Vec<i32>,
    pub nstgid: Vec<i32>,
    pub nspgid: Vec<i32>,
    pub nssid: Vec<i32>,
    pub threads: u32,
    pub sig_pnd: u64,
    pub shd_pnd: u64,
    pub sig_blk: u64,
    pub sig_ign: u64,
    pub sig_cgt: u64,
    pub cap_eff: u64,
    pub no_new_privs: bool,
    /// 0 disabled, 1 strict, 2 filter.
    pub seccomp: u32,
}

/// Parses `/proc/PID/status`. Unknown lines are ignored; every field of [`Status`] except
/// `umask` must be present.
pub fn parse_status(text: &str) -> Result<Status> {
    const FILE: &str = "status";
    const REQUIRED: [&str; 21] = [
        "Name",
        "State",
        "Tgid",
        "Pid",
        "PPid",
        "TracerPid",
        "Uid",
        "Gid",
        "NStgid",
        "NSpid",
        "NSpgid",
        "NSsid",
        "Threads",
        "SigPnd",
        "ShdPnd",
        "SigBlk",
        "SigIgn",
        "SigCgt",
        "CapEff",
        "NoNewPrivs",
        "Seccomp",
    ];
    let mut seen = [false; REQUIRED.len()];
    let mut st = Status::default();
    for line in lines(text) {
        let err = |reason: &str| CommonError::parse(FILE, line, reason);
        let (key, raw) = line.split_once(':').ok_or_else(|| err("no ':'"))?;
        if let Some(i) = REQUIRED.iter().position(|k| *k == key) {
            seen[i] = true;
        }
        let v = raw.trim_matches(|c| c == '\t' || c == ' ');
        let bad = || err("bad value");
        match key {
            "Name" => st.name = raw.strip_prefix('\t').unwrap_or(raw).to_owned(),
            "Umask" => st.umask = Some(oct_u32(v).ok_or_else(bad)?),
            "State" => st.state = v.chars().next().ok_or_else(bad)?,
            "Tgid" => st.tgid = dec_i32(v).ok_or_else(bad)?,
            "Pid" => st.pid = dec_i32(v).ok_or_else(bad)?,
            "PPid" => st.ppid = dec_i32(v).ok_or_else(bad)?,
            "TracerPid" => st.tracer_pid = dec_i32(v).ok_or_else(bad)?,
            "Uid" => st.uid = id_quad(v).ok_or_else(bad)?,
            "Gid" => st.gid = id_quad(v).ok_or_else(bad)?,
            "NStgid" => st.nstgid = pid_list(v).ok_or_else(bad)?,
            "NSpid" => st.nspid = pid_list(v).ok_or_else(bad)?,
            "NSpgid" => st.nspgid = pid_list(v).ok_or_else(bad)?,
            "NSsid" => st.nssid = pid_list(v).ok_or_else(bad)?,
            "Threads" => st.threads = dec_u32(v).ok_or_else(bad)?,
            "SigPnd" => st.sig_pnd = hex_u64(v).ok_or_else(bad)?,
            "ShdPnd" => st.shd_pnd = hex_u64(v).ok_or_else(bad)?,
            "SigBlk" => st.sig_blk = hex_u64(v).ok_or_else(bad)?,
            "SigIgn" => st.sig_ign = hex_u64(v).ok_or_else(bad)?,
            "SigCgt" => st.sig_cgt = hex_u64(v).ok_or_else(bad)?,
            "CapEff" => st.cap_eff = hex_u64(v).ok_or_else(bad)?,
            "NoNewPrivs" => st.no_new_privs = bool01(v).ok_or_else(bad)?,
            "Seccomp" => st.seccomp = dec_u32(v).ok_or_else(bad)?,
            _ => {}
        }
    }
    for (key, seen) in REQUIRED.iter().zip(seen) {
        if !seen {
            return Err(CommonError::parse(FILE, "", format!("no {key} line")));
        }
    }
    Ok(st)
}

fn pid_list(v: &str) -> Option<Vec<i32>> {
    let list: Option<Vec<i32>> = v.split_ascii_whitespace().map(dec_i32).collect();
    list.filter(|l| !l.is_empty())
}

fn id_quad(v: &str) -> Option<[u32; 4]> {
    let mut it = v.split_ascii_whitespace();
    let mut q = [0u32; 4];
    for slot in &mut q {
        *slot = dec_u32(it.next()?)?;
    }
    it.next().is_none().then_some(q)
}

// ---------------------------------------------------------------------------------------------
// stat

/// The fields of `/proc/PID/stat` that vkmigrate uses (field numbers as in proc(5)).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stat {
    /// (1)
    pub pid: i32,
    /// (2) Raw: may contain spaces, parentheses and even newlines.
    pub comm: String,
    /// (3)
    pub state: char,
    /// (4)
    pub ppid: i32,
    /// (5)
    pub pgrp: i32,
    /// (6)
    pub session: i32,
    /// (7)
    pub tty_nr: i32,
    /// (8)
    pub tpgid: i32,
    /// (9) `PF_*` flags.
    pub flags: u32,
    /// (20)
    pub num_threads: u32,
    /// (22) Clock ticks after boot.
    pub start_time: u64,
    /// (26) The mm fields (26–28, 45–51) are 0 for zombies and kernel threads, and when the
    /// reader may not ptrace-read the task.
    pub start_code: u64,
    /// (27)
    pub end_code: u64,
    /// (28)
    pub start_stack: u64,
    /// (38)
    pub exit_signal: i32,
    /// (45)
    pub start_data: u64,
    /// (46)
    pub end_data: u64,
    /// (47)
    pub start_brk: u64,
    /// (48)
    pub arg_start: u64,
    /// (49)
    pub arg_end: u64,
    /// (50)
    pub env_start: u64,
    /// (51)
    pub env_end: u64,
}

/// Parses `/proc/PID/stat` (the comm is delimited by the first `(` and the *last* `)`).
pub fn parse_stat(text: &str) -> Result<Stat> {
    const FILE: &str = "stat";
    let line = text.strip_suffix('\n').unwrap_or(text);
    let err = |reason: &str| CommonError::parse(FILE, line, reason);
    let open = line.find('(').ok_or_else(|| err("no '('"))?;
    let close = line.rfind(')').ok_or_else(|| err("no ')'"))?;
    if close < open {
        return Err(err("')' before '('"));
    }
    let pid = dec_i32(line[..open].trim_end_matches(' ')).ok_or_else(|| err("bad pid"))?;
    let comm = line[open + 1..close].to_owned();
    // Fields 3.. ; field n is f[n - 3].
    let f: Vec<&str> = line[close + 1..]
        .split_ascii_whitespace()
        .take(60)
        .collect();
    if f.len() < 51 - 2 {
        return Err(err("fewer than 51 fields"));
    }
    let field = |n: usize| f[n - 3];
    let u64_at = |n: usize| dec_u64(field(n)).ok_or_else(|| err(&format!("bad field {n}")));
    let i32_at = |n: usize| dec_i32(field(n)).ok_or_else(|| err(&format!("bad field {n}")));
    let u32_at = |n: usize| dec_u32(field(n)).ok_or_else(|| err(&format!("bad field {n}")));
    let mut state_chars = field(3).chars();
    let state = match (state_chars.next(), state_chars.next()) {
        (Some(c), None) => c,
        _ => return Err(err("bad state")),
    };
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: i32_at(4)?,
        pgrp: i32_at(5)?,
        session: i32_at(6)?,
        tty_nr: i32_at(7)?,
        tpgid: i32_at(8)?,
        flags: u32_at(9)?,
        num_threads: u32_at(20)?,
        start_time: u64_at(22)?,
        start_code: u64_at(26)?,
        end_code: u64_at(27)?,
        start_stack: u64_at(28)?,
        exit_signal: i32_at(38)?,
        start_data: u64_at(45)?,
        end_data: u64_at(46)?,
        start_brk: u64_at(47)?,
        arg_start: u64_at(48)?,
        arg_end: u64_at(49)?,
        env_start: u64_at(50)?,
        env_end: u64_at(51)?,
    })
}

// ---------------------------------------------------------------------------------------------
// fdinfo

/// `/proc/PID/fdinfo/N`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FdInfo {
    pub pos: i64,
    /// `O_*` flags (the kernel prints them in octal), including `O_CLOEXEC` of the fd.
    pub flags: u32,
    pub mnt_id: i32,
    pub ino: u64,
    /// eventfd: `eventfd-count`, `eventfd-id`, `eventfd-semaphore`.
    pub eventfd: Option<EventFdInfo>,
    /// epoll: one entry per `tfd:` line, in the kernel's order.
    pub epoll: Vec<EpollTarget>,
    /// signalfd: `sigmask`.
    pub signalfd_sigmask: Option<u64>,
    /// timerfd: `clockid`, `ticks`, `settime flags`, `it_value`, `it_interval`.
    pub timerfd: Option<TimerFdInfo>,
    /// tun/tap: `iff` (the interface name).
    pub tun_iff: Option<String>,
    /// Every other `key: value` line (inotify, fanotify, `lock:` lines, ...), in order, the
    /// value trimmed. Keys may repeat.
    pub other: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventFdInfo {
    pub count: u64,
    pub id: u32,
    pub semaphore: bool,
}

/// One target of an epoll instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpollTarget {
    /// The target's fd number (in the process that added it; it may have been closed since).
    pub tfd: i32,
    /// `EPOLL*` event mask, including `EPOLLET`/`EPOLLONESHOT`/`EPOLLEXCLUSIVE` bits.
    pub events: u32,
    pub data: u64,
    /// The target file's position.
    pub pos: i64,
    pub ino: u64,
    pub sdev: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimerFdInfo {
    pub clockid: i32,
    pub ticks: u64,
    /// `TFD_TIMER_ABSTIME` (1) / `TFD_TIMER_CANCEL_ON_SET` (2).
    pub settime_flags: u32,
    /// Remaining time `(sec, nsec)`; (0, 0) when disarmed.
    pub it_value: (u64, u64),
    /// Interval `(sec, nsec)`.
    pub it_interval: (u64, u64),
}

/// Parses `/proc/PID/fdinfo/N`.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo> {
    const FILE: &str = "fdinfo";
    let mut info = FdInfo::default();
    let (mut pos, mut flags, mut mnt_id, mut ino) = (None, None, None, None);
    let (mut ev_count, mut ev_id, mut ev_sem) = (None, None, None);
    let (mut clockid, mut ticks, mut settime, mut value, mut interval) =
        (None, None, None, None, None);
    for line in lines(text) {
        let err = |reason: &str| CommonError::parse(FILE, line, reason);
        let (key, raw) = line.split_once(':').ok_or_else(|| err("no ':'"))?;
        let v = raw.trim_matches(|c| c == '\t' || c == ' ');
        let bad = || err("bad value");
        match key {
            "pos" => pos = Some(dec_i64(v).ok_or_else(bad)?),
            "flags" => flags = Some(oct_u32(v).ok_or_else(bad)?),
            "mnt_id" => mnt_id = Some(dec_i32(v).ok_or_else(bad)?),
            "ino" => ino = Some(dec_u64(v).ok_or_else(bad)?),
            "eventfd-count" => ev_count = Some(hex_u64(v).ok_or_else(bad)?),
            "eventfd-id" => ev_id = Some(dec_u32(v).ok_or_else(bad)?),
            "eventfd-semaphore" => ev_sem = Some(bool01(v).ok_or_else(bad)?),
            "tfd" => info.epoll.push(parse_epoll_target(v).ok_or_else(bad)?),
            "sigmask" => info.signalfd_sigmask = Some(hex_u64(v).ok_or_else(bad)?),
            "clockid" => clockid = Some(dec_i32(v).ok_or_else(bad)?),
            "ticks" => ticks = Some(dec_u64(v).ok_or_else(bad)?),
            "settime flags" => settime = Some(oct_u32(v).ok_or_else(bad)?),
            "it_value" => value = Some(time_pair(v).ok_or_else(bad)?),
            "it_interval" => interval = Some(time_pair(v).ok_or_else(bad)?),
            "iff" => info.tun_iff = Some(v.to_owned()),
            _ => info.other.push((key.to_owned(), v.to_owned())),
        }
    }
    let missing = |what: &str| CommonError::parse(FILE, "", format!("no {what} line"));
    info.pos = pos.ok_or_else(|| missing("pos"))?;
    info.flags = flags.ok_or_else(|| missing("flags"))?;
    info.mnt_id = mnt_id.ok_or_else(|| missing("mnt_id"))?;
    info.ino = ino.ok_or_else(|| missing("ino"))?;
    info.eventfd = match (ev_count, ev_id, ev_sem) {
        (None, None, None) => None,
        (Some(count), Some(id), Some(semaphore)) => Some(EventFdInfo {
            count,
            id,
            semaphore,
        }),
        _ => return Err(missing("eventfd-count, eventfd-id or eventfd-semaphore")),
    };
    info.timerfd = match (clockid, ticks, settime, value, interval) {
        (None, None, None, None, None) => None,
        (Some(clockid), Some(ticks), Some(settime_flags), Some(it_value), Some(it_interval)) => {
            Some(TimerFdInfo {
                clockid,
                ticks,
                settime_flags,
                it_value,
                it_interval,
            })
        }
        _ => {
            return Err(missing(
                "clockid, ticks, settime flags, it_value or it_interval",
            ))
        }
    };
    Ok(info)
}

fn bool01(v: &str) -> Option<bool> {
    match v {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// `%8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x` (after `tfd:`).
fn parse_epoll_target(v: &str) -> Option<EpollTarget> {
    let mut it = v.split_ascii_whitespace();
    let tfd = dec_i32(it.next()?)?;
    let (mut events, mut data, mut pos, mut ino, mut sdev) = (None, None, None, None, None);
    while let Some(tok) = it.next() {
        let (key, val) = match tok.split_once(':') {
            Some((k, "")) => (k, it.next()?),
            Some((k, v)) => (k, v),
            None => return None,
        };
        match key {
            "events" => events = Some(hex_u32(val)?),
            "data" => data = Some(hex_u64(val)?),
            "pos" => pos = Some(dec_i64(val)?),
            "ino" => ino = Some(hex_u64(val)?),
            "sdev" => sdev = Some(hex_u32(val)?),
            _ => {}
        }
    }
    Some(EpollTarget {
        tfd,
        events: events?,
        data: data?,
        pos: pos?,
        ino: ino?,
        sdev: sdev?,
    })
}

/// `(sec, nsec)`.
fn time_pair(v: &str) -> Option<(u64, u64)> {
    let inner = v.strip_prefix('(')?.strip_suffix(')')?;
    let (a, b) = inner.split_once(',')?;
    Some((dec_u64(a.trim())?, dec_u64(b.trim())?))
}

// ---------------------------------------------------------------------------------------------
// limits

/// The kernel's label of each resource in `/proc/PID/limits`, its `RLIMIT_*` number on x86_64
/// Linux, and the constant's name.
pub const RLIMITS: [(&str, u32, &str); 16] = [
    ("Max cpu time", 0, "RLIMIT_CPU"),
    ("Max file size", 1, "RLIMIT_FSIZE"),
    ("Max data size", 2, "RLIMIT_DATA"),
    ("Max stack size", 3, "RLIMIT_STACK"),
    ("Max core file size", 4, "RLIMIT_CORE"),
    ("Max resident set", 5, "RLIMIT_RSS"),
    ("Max processes", 6, "RLIMIT_NPROC"),
    ("Max open files", 7, "RLIMIT_NOFILE"),
    ("Max locked memory", 8, "RLIMIT_MEMLOCK"),
    ("Max address space", 9, "RLIMIT_AS"),
    ("Max file locks", 10, "RLIMIT_LOCKS"),
    ("Max pending signals", 11, "RLIMIT_SIGPENDING"),
    ("Max msgqueue size", 12, "RLIMIT_MSGQUEUE"),
    ("Max nice priority", 13, "RLIMIT_NICE"),
    ("Max realtime priority", 14, "RLIMIT_RTPRIO"),
    ("Max realtime timeout", 15, "RLIMIT_RTTIME"),
];

/// `RLIM_INFINITY`, shown as `unlimited`.
pub const RLIM_INFINITY: u64 = u64::MAX;

/// One line of `/proc/PID/limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    /// The kernel's label, e.g. `"Max open files"`.
    pub name: &'static str,
    /// [`RLIM_INFINITY`] for `unlimited`.
    pub soft: u64,
    pub hard: u64,
}

/// Parses `/proc/PID/limits`. An unknown resource label is an error, so that a limit is never
/// silently lost.
pub fn parse_limits(text: &str) -> Result<Vec<Limit>> {
    const FILE: &str = "limits";
    let mut it = lines(text);
    match it.next() {
        Some(h) if h.starts_with("Limit ") => {}
        Some(h) => return Err(CommonError::parse(FILE, h, "expected the header line")),
        None => return Err(CommonError::parse(FILE, "", "empty file")),
    }
    let mut out = Vec::with_capacity(RLIMITS.len());
    for line in it {
        let err = |reason: &str| CommonError::parse(FILE, line, reason);
        let (name, resource, rest) = RLIMITS
            .iter()
            .find_map(|&(name, nr, _)| {
                let rest = line.strip_prefix(name)?;
                rest.starts_with(' ').then_some((name, nr, rest))
            })
            .ok_or_else(|| err("unknown resource"))?;
        let mut vals = rest.split_ascii_whitespace();
        let limit = |s: Option<&str>| match s {
            Some("unlimited") => Some(RLIM_INFINITY),
            Some(s) => dec_u64(s),
            None => None,
        };
        let soft = limit(vals.next()).ok_or_else(|| err("bad soft limit"))?;
        let hard = limit(vals.next()).ok_or_else(|| err("bad hard limit"))?;
        // Then at most the unit.
        if vals.nth(1).is_some() {
            return Err(err("trailing fields"));
        }
        out.push(Limit {
            resource,
            name,
            soft,
            hard,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// timers

/// How a POSIX timer notifies (the `sigev_notify` value without `SIGEV_THREAD_ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerNotify {
    /// `SIGEV_SIGNAL` (0); with [`PosixTimerInfo::thread`] it is `SIGEV_THREAD_ID` (4).
    Signal,
    /// `SIGEV_NONE` (1).
    None,
    /// `SIGEV_THREAD` (2); glibc implements it with `SIGEV_THREAD_ID`, so rare here.
    Thread,
}

/// One timer of `/proc/PID/timers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PosixTimerInfo {
    pub id: i32,
    pub signal: i32,
    /// `sigev_value` (the `sival_ptr`, 64 bits).
    pub sigev_value: u64,
    pub notify: TimerNotify,
    /// `SIGEV_THREAD_ID` set: `target` is a TID, not a PID.
    pub thread: bool,
    /// The PID or TID notified, in the PID namespace of the /proc mount.
    pub target: i32,
    pub clockid: i32,
}

impl PosixTimerInfo {
    /// The `sigev_notify` value for `timer_create`.
    pub fn sigev_notify(&self) -> i32 {
        let base = match self.notify {
            TimerNotify::Signal => 0,
            TimerNotify::None => 1,
            TimerNotify::Thread => 2,
        };
        if self.thread {
            base | 4
        } else {
            base
        }
    }
}

/// Parses `/proc/PID/timers`: groups of `ID:`, `signal:`, `notify:`, `ClockID:` lines.
pub fn parse_timers(text: &str) -> Result<Vec<PosixTimerInfo>> {
    const FILE: &str = "timers";
    const ORDER: [&str; 4] = ["ID", "signal", "notify", "ClockID"];
    let mut out = Vec::new();
    let mut cur = PosixTimerInfo {
        id: 0,
        signal: 0,
        sigev_value: 0,
        notify: TimerNotify::None,
        thread: false,
        target: 0,
        clockid: 0,
    };
    let mut expect = 0;
    let mut last_line = "";
    for line in lines(text) {
        last_line = line;
        let err = |reason: &str| CommonError::parse(FILE, line, reason);
        let (key, v) = line.split_once(": ").ok_or_else(|| err("no ': '"))?;
        if key != ORDER[expect] {
            return Err(err(&format!("expected an {} line", ORDER[expect])));
        }
        let bad = || err("bad value");
        match expect {
            0 => cur.id = dec_i32(v).ok_or_else(bad)?,
            1 => {
                let (sig, val) = v.split_once('/').ok_or_else(bad)?;
                cur.signal = dec_i32(sig).ok_or_else(bad)?;
                cur.sigev_value = hex_u64(val).ok_or_else(bad)?;
            }
            2 => {
                let (how, who) = v.split_once('/').ok_or_else(bad)?;
                cur.notify = match how {
                    "signal" => TimerNotify::Signal,
                    "none" => TimerNotify::None,
                    "thread" => TimerNotify::Thread,
                    _ => return Err(bad()),
                };
                let (kind, id) = who.split_once('.').ok_or_else(bad)?;
                cur.thread = match kind {
                    "tid" => true,
                    "pid" => false,
                    _ => return Err(bad()),
                };
                cur.target = dec_i32(id).ok_or_else(bad)?;
            }
            _ => {
                cur.clockid = dec_i32(v).ok_or_else(bad)?;
                out.push(cur);
            }
        }
        expect = (expect + 1) % ORDER.len();
    }
    if expect != 0 {
        return Err(CommonError::parse(FILE, last_line, "incomplete timer"));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// timens_offsets

/// A clock offset of a time namespace. `nsecs` is below 1e9; `secs` may be negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeOffset {
    pub secs: i64,
    pub nsecs: u32,
}

/// `/proc/PID/timens_offsets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimensOffsets {
    pub monotonic: TimeOffset,
    pub boottime: TimeOffset,
}

/// Parses `/proc/PID/timens_offsets` (`monotonic SECS NSECS` and `boottime SECS NSECS`).
pub fn parse_timens_offsets(text: &str) -> Result<TimensOffsets> {
    const FILE: &str = "timens_offsets";
    let mut out = TimensOffsets::default();
    let mut seen = [false; 2];
    for line in lines(text) {
        let err = |reason: &str| CommonError::parse(FILE, line, reason);
        let mut it = line.split_ascii_whitespace();
        let (name, secs, nsecs) = match (it.next(), it.next(), it.next(), it.next()) {
            (Some(n), Some(s), Some(ns), None) => (n, s, ns),
            _ => return Err(err("expected a clock and two numbers")),
        };
        let secs = dec_i64(secs).ok_or_else(|| err("bad seconds"))?;
        let nsecs = dec_u32(nsecs)
            .filter(|&n| n < 1_000_000_000)
            .ok_or_else(|| err("bad nanoseconds"))?;
        let (slot, i) = match name {
            "monotonic" => (&mut out.monotonic, 0),
            "boottime" => (&mut out.boottime, 1),
            _ => return Err(err("unknown clock")),
        };
        *slot = TimeOffset { secs, nsecs };
        seen[i] = true;
    }
    if seen != [true, true] {
        return Err(CommonError::parse(
            FILE,
            "",
            "expected monotonic and boottime lines",
        ));
    }
    Ok(out)
}

/// The text to write to `/proc/PID/timens_offsets` of a new time namespace (in one `write`,
/// before any process has entered it): both clocks, by name.
pub fn format_timens_offsets(o: &TimensOffsets) -> String {
    let mut s = String::new();
    for (name, off) in [("monotonic", o.monotonic), ("boottime", o.boottime)] {
        let _ = writeln!(s, "{name} {} {}", off.secs, off.nsecs);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// children

/// Parses `/proc/PID/task/TID/children` (space-separated PIDs, possibly none).
pub fn parse_children(text: &str) -> Result<Vec<i32>> {
    text.split_ascii_whitespace()
        .map(|t| {
            dec_i32(t)
                .filter(|&p| p > 0)
                .ok_or_else(|| CommonError::parse("children", text.trim_end(), "bad pid"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// net/unix

/// One bound unix socket of `/proc/PID/net/unix`: its inode and its filesystem path (abstract
/// names and unnamed sockets are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixPath {
    pub inode: u64,
    pub path: String,
}

/// Parses `/proc/PID/net/unix` (`Num RefCount Protocol Flags Type St Inode Path`).
pub fn parse_net_unix(text: &str) -> Result<Vec<UnixPath>> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_ascii_whitespace();
        let inode = f
            .nth(6)
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| CommonError::parse("net/unix", line, "no inode"))?;
        if let Some(path) = f.next().filter(|p| p.starts_with('/')) {
            out.push(UnixPath {
                inode,
                path: path.to_owned(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod net_unix_tests {
    #[test]
    fn parses_bound_paths() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 81234 /tmp/umlx/u1/mconsole\n\
            0000000000000000: 00000002 00000000 00000000 0001 03 81235\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 81236 @vkmigrate-x\n";
        let got = super::parse_net_unix(text).expect("test");
        assert_eq!(
            got,
            vec![super::UnixPath {
                inode: 81234,
                path: "/tmp/umlx/u1/mconsole".into()
            }]
        );
        assert!(super::parse_net_unix("h\nshort line\n").is_err());
    }
}
