//! CPU throttling of a vkernel's processes during a live migration (QEMU's auto-converge): when
//! the vkernel dirties memory faster than the link carries it, its CPU time is capped so that the
//! pre-copy rounds converge.
//!
//! The processes are moved into a fresh cgroup of ours whose CPU bandwidth is limited, and moved
//! back to where each one was when the throttle is released or dropped; the cgroup is then
//! removed. Children forked meanwhile are born in the group and go back with their parent's
//! previous cgroup. Both the cgroup v1 `cpu` controller (`cpu.cfs_quota_us`) and cgroup v2
//! (`cpu.max`, when the parent delegates the `cpu` controller) are supported.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vkm_sys::proc;

use crate::SrcError;

/// CFS bandwidth period used when the group's own cannot be read.
const DEFAULT_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const MIN_QUOTA_US: u64 = 1_000;
/// The period used below 1 % of a CPU (the kernel's longest).
const LONG_PERIOD_US: u64 = 1_000_000;
/// How often release re-reads `cgroup.procs` when a process forked into the group while the
/// others were moved out (rmdir says EBUSY).
const RELEASE_ATTEMPTS: u32 = 50;
/// How far up the parent chain a child forked inside the group is followed to find a process
/// whose previous cgroup we know.
const MAX_ANCESTRY: usize = 64;

/// Distinguishes several throttles of one process with the same tag.
static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// cgroup v1 hierarchy with the `cpu` controller: `cpu.cfs_quota_us`, `cpu.cfs_period_us`.
    V1,
    /// cgroup v2 unified hierarchy: `cpu.max`.
    V2,
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgMount {
    flavor: Flavor,
    /// Where it is mounted.
    point: PathBuf,
    /// Which cgroup of the hierarchy (as /proc/PID/cgroup names it) the mount point shows.
    root: String,
}

impl CgMount {
    /// The directory of the cgroup that /proc/PID/cgroup calls `cg_path`, if this mount shows it.
    fn dir_of(&self, cg_path: &str) -> Option<PathBuf> {
        let root = self.root.trim_end_matches('/');
        let rel = cg_path.strip_prefix(root)?;
        if !(rel.is_empty() || rel.starts_with('/')) {
            return None;
        }
        let rel = rel.trim_start_matches('/');
        Some(if rel.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rel)
        })
    }
}

/// Undo the octal escapes (`\040` for a space) of a /proc/self/mountinfo field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let oct = b
                .get(i + 1..i + 4)
                .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)))
                .and_then(|d| std::str::from_utf8(d).ok());
            if let Some(v) = oct.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v1 hierarchy that has the `cpu` controller and the first cgroup2 mount, from the
/// text of /proc/self/mountinfo.
fn parse_mountinfo(text: &str) -> (Option<CgMount>, Option<CgMount>) {
    let mut v1 = None;
    let mut v2 = None;
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split_whitespace().collect();
        let right: Vec<&str> = right.split_whitespace().collect();
        if left.len() < 5 || right.is_empty() {
            continue;
        }
        let mount = |flavor| CgMount {
            flavor,
            point: PathBuf::from(unescape(left[4])),
            root: unescape(left[3]),
        };
        match right[0] {
            "cgroup" if v1.is_none() => {
                let opts = right.get(2).copied().unwrap_or("");
                if opts.split(',').any(|o| o == "cpu") {
                    v1 = Some(mount(Flavor::V1));
                }
            }
            "cgroup2" if v2.is_none() => v2 = Some(mount(Flavor::V2)),
            _ => {}
        }
    }
    (v1, v2)
}

/// The path of the process's cgroup in the hierarchy of `flavor`, from /proc/PID/cgroup text.
fn parse_proc_cgroup(text: &str, flavor: Flavor) -> Option<String> {
    text.lines().find_map(|line| {
        let mut it = line.splitn(3, ':');
        let id = it.next()?;
        let controllers = it.next()?;
        let path = it.next()?;
        let hit = match flavor {
            Flavor::V1 => controllers.split(',').any(|c| c == "cpu"),
            Flavor::V2 => id == "0" && controllers.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

/// `(ppid)` from the text of /proc/PID/stat.
fn parse_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether a /proc read failed because the process is gone.
fn vanished(e: &vkm_sys::SysError) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

fn io_vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

fn cg_err(step: &'static str, path: &Path, source: io::Error) -> SrcError {
    SrcError::Cgroup {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// The thread-group id of `pid` (which may name any thread); None when it is gone.
fn tgid(pid: i32) -> Result<Option<i32>, SrcError> {
    let status = match proc::read(proc::pid_path(pid, "status")) {
        Ok(s) => s,
        Err(e) if vanished(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .or(Some(pid)))
}

/// CPU time (ns) the processes `pids` have used so far, all their threads together (the first
/// field of each thread's schedstat: nanoseconds, where stat's utime counts 10 ms ticks). A
/// process or thread gone meanwhile counts nothing.
pub fn cpu_ns(pids: &[i32]) -> u64 {
    let mut total = 0;
    for &pid in pids {
        let Ok(tids) = vkm_sys::proc::list_numeric(vkm_sys::proc::pid_path(pid, "task")) else {
            continue;
        };
        for tid in tids {
            let path = format!("/proc/{pid}/task/{tid}/schedstat");
            total += std::fs::read_to_string(path)
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Move process `tgid` (all its threads) into the cgroup directory `dir`. Ok(false): it is gone.
fn move_to(dir: &Path, tgid: i32) -> Result<bool, SrcError> {
    let procs = dir.join("cgroup.procs");
    match std::fs::write(&procs, tgid.to_string()) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(cg_err("move a process into", &procs, e)),
    }
}

fn sanitize(tag: &str) -> String {
    tag.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A CPU limit on a set of processes, lifted (processes moved back, cgroup removed) when it is
/// released or dropped.
#[derive(Debug)]
pub struct Throttle {
    mount: CgMount,
    /// Our cgroup's directory.
    dir: PathBuf,
    period_us: u64,
    /// The limit in per mille of one CPU (1000 = none).
    permille: u32,
    /// Each process we moved in (tgid) and the directory of the cgroup it came from, in order.
    prev: Vec<(i32, PathBuf)>,
    released: bool,
}

impl Throttle {
    /// Create a cgroup named after `tag` and our pid and move the processes of `pids` (each by
    /// its thread-group id) into it, unthrottled until [`Throttle::set_permille`].
    /// Processes that have exited are skipped.
    pub fn new(tag: &str, pids: &[i32]) -> Result<Throttle, SrcError> {
        let mut tgids = Vec::with_capacity(pids.len());
        for &pid in pids {
            if let Some(t) = tgid(pid)? {
                if !tgids.contains(&t) {
                    tgids.push(t);
                }
            }
        }
        if tgids.is_empty() {
            return Err(SrcError::Empty);
        }

        let mountinfo = proc::read("/proc/self/mountinfo")?;
        let (v1, v2) = parse_mountinfo(&mountinfo);
        let Some(mount) = v1.or(v2) else {
            return Err(SrcError::ThrottleUnavailable {
                why: "/proc/self/mountinfo shows neither a cgroup v1 hierarchy with the cpu \
                      controller nor a cgroup2 file system"
                    .into(),
            });
        };
        // The group is placed next to the first process that is still alive.
        let mut parent = None;
        for &t in &tgids {
            let found = match mount.flavor {
                Flavor::V1 => Self::v1_parent(&mount, t),
                Flavor::V2 => Self::v2_parent(&mount, t),
            };
            match found {
                Ok(p) => {
                    parent = Some(p);
                    break;
                }
                Err(SrcError::Sys(e)) if vanished(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(parent) = parent else {
            return Err(SrcError::Empty);
        };

        let name = format!("vkm-throttle-{}-{}", sanitize(tag), std::process::id());
        let dir = loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = parent.join(format!("{name}-{n}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1_000_000 => continue,
                Err(e) => return Err(cg_err("create the cgroup", &dir, e)),
            }
        };
        let mut throttle = Throttle {
            mount,
            dir,
            period_us: DEFAULT_PERIOD_US,
            permille: 1000,
            prev: Vec::new(),
            released: false,
        };
        // From here on, an error drops `throttle`, which moves back whatever was moved already.
        let control = throttle.control_file();
        if !control.exists() {
            return Err(SrcError::ThrottleUnavailable {
                why: format!("the new cgroup has no {}", control.display()),
            });
        }
        throttle.period_us = throttle.read_period();
        for t in tgids {
            throttle.add(t)?;
        }
        if throttle.prev.is_empty() {
            return Err(SrcError::Empty);
        }
        tracing::debug!(dir = %throttle.dir.display(), procs = throttle.prev.len(), "throttle cgroup created");
        Ok(throttle)
    }

    /// v1: the group goes below the first process's own cpu cgroup, so that limits already set
    /// on it keep applying.
    fn v1_parent(m: &CgMount, tgid: i32) -> Result<PathBuf, SrcError> {
        let parent = Self::current_dir(m, tgid)?.unwrap_or_else(|| m.point.clone());
        if !parent.join("cpu.cfs_quota_us").exists() {
            return Err(SrcError::ThrottleUnavailable {
                why: format!(
                    "the cgroup v1 cpu hierarchy at {} has no cpu.cfs_quota_us in {} (kernel \
                     without CONFIG_CFS_BANDWIDTH?)",
                    m.point.display(),
                    parent.display()
                ),
            });
        }
        Ok(parent)
    }

    /// v2: a process may only sit in a leaf of the controllers, so the group is a sibling of the
    /// first process's cgroup (or a child of the root when it is in the root), and the parent
    /// must delegate "cpu" to its children.
    fn v2_parent(m: &CgMount, tgid: i32) -> Result<PathBuf, SrcError> {
        let current = Self::current_dir(m, tgid)?.ok_or_else(|| SrcError::ThrottleUnavailable {
            why: format!(
                "process {tgid}'s cgroup2 cgroup is outside the cgroup2 mount at {}",
                m.point.display()
            ),
        })?;
        let parent = if current == m.point {
            current
        } else {
            current
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| m.point.clone())
        };
        let subtree = parent.join("cgroup.subtree_control");
        let delegated = std::fs::read_to_string(&subtree)
            .map(|s| s.split_whitespace().any(|c| c == "cpu"))
            .unwrap_or(false);
        if !delegated {
            return Err(SrcError::ThrottleUnavailable {
                why: format!(
                    "the cgroup2 controller \"cpu\" is not enabled in {} (no cgroup v1 cpu \
                     hierarchy is mounted either)",
                    subtree.display()
                ),
            });
        }
        Ok(parent)
    }

    /// The directory of the cgroup `tgid` is in now (None if this mount does not show it).
    fn current_dir(m: &CgMount, tgid: i32) -> Result<Option<PathBuf>, SrcError> {
        let path = proc::pid_path(tgid, "cgroup");
        let text = proc::read(&path)?;
        let cg =
            parse_proc_cgroup(&text, m.flavor).ok_or_else(|| SrcError::ThrottleUnavailable {
                why: format!(
                    "{} names no cgroup of the {:?} cpu hierarchy",
                    path.display(),
                    m.flavor
                ),
            })?;
        Ok(m.dir_of(&cg))
    }

    fn control_file(&self) -> PathBuf {
        match self.mount.flavor {
            Flavor::V1 => self.dir.join("cpu.cfs_quota_us"),
            Flavor::V2 => self.dir.join("cpu.max"),
        }
    }

    fn read_period(&self) -> u64 {
        let text = match self.mount.flavor {
            Flavor::V1 => std::fs::read_to_string(self.dir.join("cpu.cfs_period_us")).ok(),
            Flavor::V2 => std::fs::read_to_string(self.dir.join("cpu.max"))
                .ok()
                .and_then(|s| s.split_whitespace().nth(1).map(str::to_string)),
        };
        text.and_then(|s| s.trim().parse().ok())
            .filter(|&p| p > 0)
            .unwrap_or(DEFAULT_PERIOD_US)
    }

    /// Move one more process (by its thread-group id) into the group, e.g. one that was forked
    /// before [`Throttle::new`] but found later. Ok(false): it has exited, or it is in already.
    pub fn add(&mut self, pid: i32) -> Result<bool, SrcError> {
        let Some(tgid) = tgid(pid)? else {
            return Ok(false);
        };
        if self.prev.iter().any(|(p, _)| *p == tgid) {
            return Ok(false);
        }
        let home = match Self::current_dir(&self.mount, tgid) {
            Ok(Some(d)) => d,
            Ok(None) => {
                return Err(SrcError::ThrottleUnavailable {
                    why: format!(
                        "process {tgid}'s cgroup is not visible under {}",
                        self.mount.point.display()
                    ),
                })
            }
            Err(SrcError::Sys(e)) if vanished(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        if home == self.dir {
            return Ok(false);
        }
        if !move_to(&self.dir, tgid)? {
            return Ok(false);
        }
        self.prev.push((tgid, home));
        Ok(true)
    }

    /// Limit the group to `permille` ‰ of one CPU (clamped to 1..=1000; 1000 lifts the limit).
    /// Dirtying memory costs little CPU (a writer on 1 % of a CPU still writes some 80 MB/s
    /// here), so the limit goes below 1 %: with the usual 100 ms period that would need a
    /// quota under the kernel's 1 ms minimum, so the period grows to 1 s instead (the vkernel
    /// then runs in bursts of a few ms per second, as QEMU's auto-converge runs a vCPU).
    pub fn set_permille(&mut self, permille: u32) -> Result<(), SrcError> {
        let permille = permille.clamp(1, 1000);
        let period = if permille < 10 {
            LONG_PERIOD_US
        } else {
            self.period_us
        };
        let quota = (period * u64::from(permille) / 1000).max(MIN_QUOTA_US);
        let writes: Vec<(&str, String)> = match (self.mount.flavor, permille) {
            (Flavor::V1, 1000) => vec![
                ("cpu.cfs_quota_us", "-1".to_string()),
                ("cpu.cfs_period_us", self.period_us.to_string()),
            ],
            (Flavor::V1, _) => vec![
                ("cpu.cfs_period_us", period.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
            (Flavor::V2, 1000) => vec![("cpu.max", format!("max {}", self.period_us))],
            (Flavor::V2, _) => vec![("cpu.max", format!("{quota} {period}"))],
        };
        for (file, value) in writes {
            let path = self.dir.join(file);
            std::fs::write(&path, value).map_err(|e| cg_err("set the CPU limit in", &path, e))?;
        }
        self.permille = permille;
        Ok(())
    }

    /// The current limit in per mille of one CPU (1000 = none).
    pub fn permille(&self) -> u32 {
        self.permille
    }

    /// The current limit in % of one CPU (100 = none), as reports show it.
    pub fn percent(&self) -> f64 {
        f64::from(self.permille) / 10.0
    }

    /// The directory of the throttle's cgroup.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lift the limit: move every process still in the group back where it came from and remove
    /// the group. Dropping the throttle does the same but can only log failures.
    pub fn release(mut self) -> Result<(), SrcError> {
        self.cleanup()
    }

    /// Where a process found in the group goes back to: its own previous cgroup, else that of
    /// its nearest ancestor we moved in, else the first one recorded.
    fn home_of(&self, pid: i32, known: &HashMap<i32, &PathBuf>) -> PathBuf {
        let mut p = pid;
        for _ in 0..MAX_ANCESTRY {
            if let Some(dir) = known.get(&p) {
                return (*dir).clone();
            }
            match proc::read(proc::pid_path(p, "stat"))
                .ok()
                .and_then(|s| parse_ppid(&s))
            {
                Some(pp) if pp > 0 => p = pp,
                _ => break,
            }
        }
        self.fallback_home()
    }

    fn fallback_home(&self) -> PathBuf {
        self.prev
            .first()
            .map(|(_, d)| d.clone())
            .or_else(|| self.dir.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| self.mount.point.clone())
    }

    fn cleanup(&mut self) -> Result<(), SrcError> {
        if self.released {
            return Ok(());
        }
        // Whatever happens below, what stays behind should not stay throttled.
        if self.permille != 1000 {
            if let Err(e) = self.set_permille(1000) {
                tracing::debug!(error = %e, "cannot lift the CPU limit before releasing");
            }
        }
        let known: HashMap<i32, &PathBuf> = self.prev.iter().map(|(p, d)| (*p, d)).collect();
        let procs_file = self.dir.join("cgroup.procs");
        let mut first_err: Option<SrcError> = None;
        for attempt in 0..RELEASE_ATTEMPTS {
            let text = match std::fs::read_to_string(&procs_file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.released = true;
                    return Ok(());
                }
                Err(e) => return Err(cg_err("list the processes of", &procs_file, e)),
            };
            for pid in text
                .split_whitespace()
                .filter_map(|s| s.parse::<i32>().ok())
            {
                let home = self.home_of(pid, &known);
                // The previous cgroup may have been removed meanwhile: fall back to the first
                // recorded one, then to the parent of ours, then to the hierarchy's root.
                let mut candidates = vec![home, self.fallback_home()];
                if let Some(parent) = self.dir.parent() {
                    candidates.push(parent.to_path_buf());
                }
                candidates.push(self.mount.point.clone());
                candidates.dedup();
                let mut last_err = None;
                for dir in candidates {
                    match move_to(&dir, pid) {
                        Ok(_) => {
                            last_err = None;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(pid, dir = %dir.display(), error = %e, "cannot move back");
                            last_err = Some(e);
                        }
                    }
                }
                if let Some(e) = last_err {
                    first_err.get_or_insert(e);
                }
            }
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => {
                    self.released = true;
                    return Ok(());
                }
                Err(e) if io_vanished(&e) => {
                    self.released = true;
                    return Ok(());
                }
                // A process forked into the group while we moved the others out (or its exit
                // is not accounted yet): list again.
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY) && attempt + 1 < RELEASE_ATTEMPTS =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(
                        first_err.unwrap_or_else(|| cg_err("remove the cgroup", &self.dir, e))
                    )
                }
            }
        }
        Err(first_err.unwrap_or_else(|| {
            cg_err(
                "remove the cgroup",
                &self.dir,
                io::Error::from_raw_os_error(libc::EBUSY),
            )
        }))
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot release the CPU throttle");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::time::Instant;

    #[test]
    fn throttle_parses_hybrid_and_v2_mounts() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let (v1, v2) = parse_mountinfo(hybrid);
        let v1 = v1.expect("v1 cpu");
        assert_eq!(v1.point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(
            v2.expect("v2").point,
            PathBuf::from("/sys/fs/cgroup/unified")
        );

        let combined =
            "40 31 0:40 /ctr /sys/fs/cgroup/cpu\\040x rw shared:5 - cgroup cgroup rw,cpu,cpuacct\n";
        let m = parse_mountinfo(combined).0.expect("cpu,cpuacct");
        assert_eq!(m.point, PathBuf::from("/sys/fs/cgroup/cpu x"));
        assert_eq!(
            m.dir_of("/ctr"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu x"))
        );
        assert_eq!(
            m.dir_of("/ctr/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu x/a/b"))
        );
        assert_eq!(m.dir_of("/ctrl"), None);
        assert_eq!(m.dir_of("/other"), None);

        let pure = "25 20 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let (v1, v2) = parse_mountinfo(pure);
        assert!(v1.is_none());
        let v2 = v2.expect("v2");
        assert_eq!(v2.dir_of("/"), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            v2.dir_of("/user.slice/x.scope"),
            Some(PathBuf::from("/sys/fs/cgroup/user.slice/x.scope"))
        );

        let cg = "9:name=systemd:/\n2:cpuacct:/a\n1:cpu,cpuacct:/b/c\n0::/u\n";
        assert_eq!(parse_proc_cgroup(cg, Flavor::V1).as_deref(), Some("/b/c"));
        assert_eq!(parse_proc_cgroup(cg, Flavor::V2).as_deref(), Some("/u"));
        assert_eq!(parse_proc_cgroup("0::/\n", Flavor::V1), None);
        assert_eq!(parse_ppid("12 (a) b) S 34 12 12 0"), Some(34));
        assert_eq!(sanitize("a/b c-1.x"), "a_b_c-1.x");
    }

    fn cpu_ticks(pid: i32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reads stat");
        let rest = &stat[stat.rfind(')').expect("has comm") + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime); `rest` starts at field 3.
        f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
    }

    /// Share of one CPU that `pid` used over `wall`.
    fn cpu_share(pid: i32, wall: Duration) -> f64 {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .expect("sysconf")
            .expect("CLK_TCK") as f64;
        let t0 = Instant::now();
        let c0 = cpu_ticks(pid);
        std::thread::sleep(wall);
        let c1 = cpu_ticks(pid);
        (c1 - c0) as f64 / hz / t0.elapsed().as_secs_f64()
    }

    fn spawn(script: &str) -> Child {
        Command::new("sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .expect("spawns sh")
    }

    fn kill(mut child: Child) {
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }

    fn cgroup_of(pid: i32) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("reads cgroup")
    }

    #[test]
    fn throttle_limits_a_busy_loop_and_releases() {
        let child = spawn("while :; do :; done");
        let pid = child.id() as i32;
        let before = cgroup_of(pid);
        let result = std::panic::catch_unwind(|| {
            let free = cpu_share(pid, Duration::from_millis(500));
            let mut t = Throttle::new("test-busy", &[pid]).expect("creates the throttle");
            let dir = t.path().to_path_buf();
            assert_eq!(t.permille(), 1000);
            t.set_permille(100).expect("sets 10 %");
            assert_eq!(t.permille(), 100);
            if t.mount.flavor == Flavor::V1 {
                let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).expect("quota");
                assert_eq!(q.trim().parse::<u64>().ok(), Some(t.period_us / 10));
            }
            std::thread::sleep(Duration::from_millis(200));
            let throttled = cpu_share(pid, Duration::from_millis(1000));
            eprintln!("unthrottled {free:.2} CPU, at 10 %: {throttled:.2} CPU");
            assert!(
                throttled < 0.4,
                "throttled to 10 % but used {throttled:.2} CPU"
            );
            assert_ne!(cgroup_of(pid), before);
            // Below 1 %: a 1 s period, since a quota cannot be under 1 ms; lifted: as before.
            if t.mount.flavor == Flavor::V1 {
                let read = |f: &str| {
                    std::fs::read_to_string(dir.join(f))
                        .expect("cgroup file")
                        .trim()
                        .to_string()
                };
                t.set_permille(5).expect("sets 0.5 %");
                assert_eq!(read("cpu.cfs_period_us"), "1000000");
                assert_eq!(read("cpu.cfs_quota_us"), "5000");
                t.set_permille(1000).expect("lifts the limit");
                assert_eq!(read("cpu.cfs_period_us"), t.period_us.to_string());
                assert_eq!(read("cpu.cfs_quota_us"), "-1");
            }
            t.release().expect("releases");
            assert!(!dir.exists(), "{} still exists", dir.display());
            assert_eq!(cgroup_of(pid), before);
        });
        kill(child);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }

    #[test]
    fn throttle_drop_moves_forked_children_back() {
        // The subshell is forked after the parent was moved into the group.
        let child = spawn("sleep 0.3; (while :; do :; done) & wait");
        let pid = child.id() as i32;
        let before = cgroup_of(pid);
        let result = std::panic::catch_unwind(|| {
            let mut t = Throttle::new("test-fork", &[pid]).expect("creates the throttle");
            t.set_permille(200).expect("sets 20 %");
            let dir = t.path().to_path_buf();
            std::thread::sleep(Duration::from_millis(800));
            let inside = std::fs::read_to_string(dir.join("cgroup.procs")).expect("procs");
            let inside: Vec<i32> = inside
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect();
            assert!(inside.contains(&pid), "{inside:?}");
            let forked: Vec<i32> = inside.iter().copied().filter(|&p| p != pid).collect();
            assert!(
                !forked.is_empty(),
                "no child was forked into the group: {inside:?}"
            );
            drop(t);
            assert!(!dir.exists(), "{} still exists", dir.display());
            assert_eq!(cgroup_of(pid), before);
            for p in forked {
                if let Ok(cg) = std::fs::read_to_string(format!("/proc/{p}/cgroup")) {
                    assert_eq!(cg, before, "forked child {p}");
                }
            }
        });
        kill(child);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }

    #[test]
    fn throttle_of_no_live_process_is_refused() {
        assert!(matches!(
            Throttle::new("test-none", &[]),
            Err(SrcError::Empty)
        ));
    }
}
