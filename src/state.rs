//! The state directory: one sub-directory per vkernel, owned by its shim.
//!
//! ```text
//! DIR/NAME/lock          flock'ed (exclusive) by the shim for its whole life: the truth about
//!                        whether the vkernel is managed. The CLI takes it first and hands the very
//!                        same open file description to the shim (as its stdin).
//! DIR/NAME/vkernel.json  the Record, written atomically (tmp + rename) once init runs
//! DIR/NAME/console.log   everything the vkernel printed on its console (rotated once at 8 MiB)
//! DIR/NAME/console.sock  attach here to read the console and type into it
//! DIR/NAME/shim.log      the shim's own log (its stderr)
//! ```
//!
//! A directory whose lock nobody holds is stale (its shim died) and is removed by whoever
//! notices. The shim removes its own directory when the vkernel ends.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const RECORD_FILE: &str = "vkernel.json";
pub const LOCK_FILE: &str = "lock";
pub const CONSOLE_LOG: &str = "console.log";
pub const CONSOLE_SOCK: &str = "console.sock";
pub const SHIM_LOG: &str = "shim.log";
pub const MAX_NAME_LEN: usize = 64;

/// The marker that says this host is being evacuated: `listen` refuses arrivals while it
/// exists. A dot file, so that no vkernel (whose names cannot start with a dot) owns it.
pub const DRAINING_FILE: &str = ".draining";
/// Where a receiving shim notes, just before it lets a vkernel run, which sandbox runs it (one
/// file per migration id): the `listen` daemon answers a sender that lost the link after `go`
/// from it when that shim is gone (see [`StateDir::arrival_runs`]).
const ARRIVALS_DIR: &str = ".arrivals";

/// Names: `[A-Za-z0-9_.-]{1,64}`, not starting with a dot (so not `.` or `..` either: the
/// state directory's own files are dot files).
pub fn validate_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("a vkernel name has 1 to {MAX_NAME_LEN} characters"));
    }
    if s.starts_with('.') {
        return Err("a vkernel name cannot start with '.'".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "invalid character {c:?} in a vkernel name (allowed: A-Z a-z 0-9 _ . -)"
        ));
    }
    Ok(())
}

/// What `vkernel.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    pub shim_pid: i32,
    /// Host pid of the sandbox's init (pid 1 of the vkernel's namespace).
    pub init_pid: i32,
    pub argv: Vec<String>,
    /// The pty slave the vkernel has as its console (`/dev/pts/N`).
    pub console_tty: String,
    /// Unix time (seconds) the vkernel was started or restored.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<PathBuf>,
    /// The live migration that brought it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Network devices vkmigrate created for it here, removed by the shim when it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owned_net: Vec<vkm_common::net::OwnedNet>,
}

/// A vkernel's directory as seen by a command other than its shim.
#[derive(Debug)]
pub enum Probe {
    /// No directory.
    Absent,
    /// A shim holds the lock but has not written its record yet (starting or stopping).
    Busy,
    /// A shim holds the lock and the record is there.
    Alive(Record),
    /// Nobody holds the lock: the directory was left behind by a dead shim and has been
    /// removed.
    Stale,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// The lock of a vkernel directory, held by a command that is creating a vkernel there.
pub struct Claim {
    pub dir: PathBuf,
    pub lock: File,
}

/// An arrival note written but not in effect yet (see [`StateDir::prepare_arrival`]).
pub struct Arrival {
    tmp: Option<PathBuf>,
    path: PathBuf,
}

impl Arrival {
    /// The note takes effect (one rename).
    pub fn post(mut self) -> Result<()> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        fs::rename(&tmp, &self.path)
            .with_context(|| format!("Cannot write {}", self.path.display()))
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Prepare the note that the vkernel of migration `id` runs in the sandbox whose init is
    /// `init_pid` (host pid): written now, it takes effect with [`Arrival::post`] at the
    /// commit point, so that whatever happens to the receiving shim from then on,
    /// [`StateDir::arrival_runs`] tells the truth. Writing it costs about 0.2 ms, which would
    /// otherwise be part of the vkernel's pause. An unposted note is removed when dropped (a shim
    /// killed meanwhile leaves its `.tmp`, which nothing reads).
    pub fn prepare_arrival(&self, id: &str, init_pid: i32) -> Result<Arrival> {
        let path = self.arrival_path(id)?;
        let dir = self.root.join(ARRIVALS_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("Cannot create {}", dir.display()))?;
        let start = start_time(init_pid)
            .with_context(|| format!("Cannot read the start time of process {init_pid}"))?;
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, format!("{init_pid} {start}\n"))
            .with_context(|| format!("Cannot write {}", tmp.display()))?;
        Ok(Arrival {
            tmp: Some(tmp),
            path,
        })
    }

    /// Whether the vkernel of migration `id` runs here according to its arrival note: its
    /// sandbox's init is the same process and alive. A note whose sandbox is gone is removed.
    pub fn arrival_runs(&self, id: &str) -> bool {
        let Ok(path) = self.arrival_path(id) else {
            return false;
        };
        let Ok(text) = fs::read_to_string(&path) else {
            return false;
        };
        let mut it = text.split_whitespace().map(str::parse::<u64>);
        let runs = match (it.next(), it.next()) {
            (Some(Ok(pid)), Some(Ok(start))) => i32::try_from(pid)
                .ok()
                .and_then(|pid| start_time(pid).ok())
                .is_some_and(|now| now == start),
            _ => false,
        };
        if !runs {
            let _ = fs::remove_file(&path);
        }
        runs
    }

    /// Forget the arrival note of migration `id` (its vkernel ended here, or never ran).
    pub fn forget_arrival(&self, id: &str) {
        if let Ok(path) = self.arrival_path(id) {
            let _ = fs::remove_file(path);
        }
    }

    /// The arrival note of migration `id` (ids come from the sender: no path tricks).
    fn arrival_path(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty()
            || id.len() > 128
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("a migration id of unexpected form: {id:?}");
        }
        Ok(self.root.join(ARRIVALS_DIR).join(id))
    }

    /// Why this host refuses arrivals (the draining marker's text), if it does.
    pub fn draining(&self) -> Option<String> {
        let text = fs::read_to_string(self.root.join(DRAINING_FILE)).ok()?;
        let note = text.trim();
        Some(if note.is_empty() {
            "this host is being drained".to_owned()
        } else {
            note.to_owned()
        })
    }

    /// Mark this host as draining, with `note` saying by whom and since when.
    pub fn set_draining(&self, note: &str) -> Result<()> {
        self.ensure_root()?;
        let path = self.root.join(DRAINING_FILE);
        fs::write(&path, format!("{note}\n"))
            .with_context(|| format!("Cannot write the draining marker {}", path.display()))
    }

    /// Accept arrivals again. False if the host was not draining.
    pub fn clear_draining(&self) -> Result<bool> {
        let path = self.root.join(DRAINING_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e)
                .with_context(|| format!("Cannot remove the draining marker {}", path.display())),
        }
    }

    fn ensure_root(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .with_context(|| format!("Cannot create the state directory {}", self.root.display()))
    }

    /// Take the directory of `name` for a new vkernel: refuses a name whose shim is alive,
    /// clears what a dead shim left behind.
    pub fn claim(&self, name: &str) -> Result<Claim> {
        self.ensure_root()?;
        let dir = self.dir(name);
        // A few rounds: a shim may remove the directory between our open and our lock.
        for _ in 0..20 {
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("Cannot create {}", dir.display()));
                }
            }
            let lock_path = dir.join(LOCK_FILE);
            let lock = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&lock_path)
            {
                Ok(f) => f,
                // The directory vanished under us (a shim cleaned up): try again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("Cannot open {}", lock_path.display()));
                }
            };
            match lock.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => bail!("vkernel {name} already exists"),
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("Cannot lock {}", lock_path.display()));
                }
            }
            if !same_file(&lock, &lock_path) {
                continue;
            }
            clear_except_lock(&dir)?;
            return Ok(Claim { dir, lock });
        }
        bail!("vkernel {name} is being created and removed concurrently; try again")
    }

    /// Look at the directory of `name`; a stale one is removed.
    pub fn probe(&self, name: &str) -> Result<Probe> {
        let dir = self.dir(name);
        if !dir.is_dir() {
            return Ok(Probe::Absent);
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = match OpenOptions::new().read(true).open(&lock_path) {
            Ok(f) => f,
            // Being created (the lock comes right after the directory) or being removed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Probe::Busy),
            Err(e) => {
                return Err(e).with_context(|| format!("Cannot open {}", lock_path.display()))
            }
        };
        match lock.try_lock() {
            Err(TryLockError::WouldBlock) => match read_record(&dir) {
                Ok(Some(r)) => Ok(Probe::Alive(r)),
                Ok(None) => Ok(Probe::Busy),
                Err(e) => Err(e),
            },
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("Cannot lock {}", lock_path.display()))
            }
            Ok(()) => {
                if same_file(&lock, &lock_path) {
                    tracing::info!(name, "removing the state of a vkernel whose shim is gone");
                    remove_vkernel_dir(&dir);
                }
                Ok(Probe::Stale)
            }
        }
    }

    /// The record of a vkernel whose shim is alive, or an error saying why there is none.
    pub fn alive(&self, name: &str) -> Result<Record> {
        match self.probe(name)? {
            Probe::Alive(r) => Ok(r),
            Probe::Absent => bail!("vkernel {name} does not exist"),
            Probe::Busy => bail!("vkernel {name} is starting or stopping"),
            Probe::Stale => bail!(
                "vkernel {name} does not exist (its shim had died; its stale state was removed)"
            ),
        }
    }

    /// Names of every vkernel directory, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let rd = match fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("Cannot read the state directory {}", self.root.display())
                })
            }
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| validate_name(n).is_ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Wait until the vkernel recorded as `rec` is gone (its shim removed the directory, or
    /// the name now belongs to another shim). False on timeout.
    pub fn wait_gone(&self, rec: &Record, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.probe(&rec.name) {
                Ok(Probe::Alive(r)) if r.shim_pid == rec.shim_pid => {}
                Ok(Probe::Busy) => {}
                Ok(_) => return true,
                Err(e) => tracing::debug!(error = %e, "probing while waiting"),
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn read_record(dir: &Path) -> Result<Option<Record>> {
    let path = dir.join(RECORD_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("Cannot read {}", path.display())),
    };
    let rec =
        serde_json::from_str(&text).with_context(|| format!("Cannot parse {}", path.display()))?;
    Ok(Some(rec))
}

/// Write the record atomically: a temporary file, fsync, rename.
pub fn write_record(dir: &Path, rec: &Record) -> Result<()> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
    let mut text = serde_json::to_vec_pretty(rec).context("Cannot encode the vkernel record")?;
    text.push(b'\n');
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().with_context(|| format!("Cannot write {}", path.display()))
}

/// Remove a vkernel directory (the caller holds its lock): everything but the lock first, then
/// the lock, then the directory. Errors are logged: there is nobody to report them to.
pub fn remove_vkernel_dir(dir: &Path) {
    if let Err(e) = clear_except_lock(dir) {
        tracing::warn!(dir = %dir.display(), error = %format!("{e:#}"), "cannot clear a vkernel directory");
    }
    let _ = fs::remove_file(dir.join(LOCK_FILE));
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a vkernel directory");
        }
    }
}

fn clear_except_lock(dir: &Path) -> Result<()> {
    let rd = fs::read_dir(dir).with_context(|| format!("Cannot read {}", dir.display()))?;
    for entry in rd {
        let entry = entry.with_context(|| format!("Cannot read {}", dir.display()))?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let path = entry.path();
        let r = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("Cannot remove {}", path.display())),
        }
    }
    Ok(())
}

/// True if `path` still names the file `f` is open on.
pub fn same_file(f: &File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Field 22 of /proc/PID/stat: when the process started, which tells it from a later process
/// with the same pid.
fn start_time(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(vkm_common::procfs::parse_stat(&stat)?.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web1", "A_b.c-d", &"x".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".draining",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\n",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn claim_refuses_a_held_name_and_cleans_a_stale_one() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let sd = StateDir::new(tmp.path().join("state"));
        let claim = sd.claim("vk")?;
        write_record(
            &claim.dir,
            &Record {
                name: "vk".into(),
                shim_pid: 1,
                init_pid: 2,
                argv: vec!["sh".into()],
                console_tty: "/dev/pts/0".into(),
                created: 0,
                restored_from: None,
                migration_id: None,
                owned_net: Vec::new(),
            },
        )?;
        let err = sd.claim("vk").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("vkernel vk already exists"));
        assert!(matches!(sd.probe("vk")?, Probe::Alive(_)));
        drop(claim);
        // Lock released with a record left behind: stale.
        assert!(matches!(sd.probe("vk")?, Probe::Stale));
        assert!(matches!(sd.probe("vk")?, Probe::Absent));
        let again = sd.claim("vk")?;
        assert!(read_record(&again.dir)?.is_none());
        Ok(())
    }
}
