//! Shared helpers for the end-to-end tests: a per-test state directory, the vkmigrate and
//! vkload binaries, console-log parsing. Every test owns a [`Lab`], whose Drop kills what the
//! test started and removes its files, also when the test fails.

#![allow(dead_code)]

pub mod netlab;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Longest any single vkmigrate command may take in a test.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

pub fn vkmigrate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vkmigrate"))
}

/// vkload is another package of the workspace; cargo builds it into the same directory.
pub fn vkload_bin() -> PathBuf {
    let bin = vkmigrate_bin();
    let p = bin.with_file_name("vkload");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// The real interpreter behind `python3` on PATH (not a wrapper script such as pyenv's shim,
/// which would run as a process of its own), so that a vkernel is just the Python process.
pub fn python3() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 on PATH");
    assert!(out.status.success(), "python3 does not run");
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!exe.is_empty(), "python3 does not know its executable");
    exe
}

/// `ok N ...` lines (the convention of the small test programs): N.
pub fn ok_counter(line: &str) -> Option<u64> {
    line.strip_prefix("ok ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    names: Vec<String>,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("vkm-test-")
            .tempdir()
            .expect("temp dir");
        Lab {
            dir,
            names: Vec::new(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run vkmigrate; a command that hangs is killed after [`COMMAND_TIMEOUT`] and fails the
    /// test, so that a hang shows up as a failure, not as a CI job that never ends.
    pub fn vkm(&self, args: &[&str]) -> Output {
        let mut child = Command::new(vkmigrate_bin())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env("VKLOAD_DIR", self.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run vkmigrate");
        // Drained while it runs, so that a large output cannot block it.
        let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out_t = drain(
            child
                .stdout
                .take()
                .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
        );
        let err_t = drain(
            child
                .stderr
                .take()
                .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
        );
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for vkmigrate") {
                break st;
            }
            if t0.elapsed() > COMMAND_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let err = err_t.join().unwrap_or_default();
                panic!(
                    "vkmigrate {args:?} hung for {COMMAND_TIMEOUT:?}: {}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: out_t.join().unwrap_or_default(),
            stderr: err_t.join().unwrap_or_default(),
        }
    }

    /// Run a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vkm(args);
        assert!(
            out.status.success(),
            "vkmigrate {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Start a vkernel under vkmigrate; it is killed when the lab is dropped.
    pub fn run(&mut self, name: &str, cmd: &[&str]) {
        let mut args = vec!["run", "--name", name, "--"];
        args.extend_from_slice(cmd);
        self.ok(&args);
        self.names.push(name.to_string());
    }

    pub fn restore(&mut self, image: &Path, name: &str) {
        self.ok(&[
            "restore",
            image.to_str().expect("utf-8 path"),
            "--name",
            name,
        ]);
        self.names.push(name.to_string());
    }

    pub fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir().join(name).join("console.log")).unwrap_or_default()
    }

    /// Wait until the console shows a vkload line with tick ≥ `tick`; returns that line's fields.
    pub fn wait_tick(&self, name: &str, tick: u64, timeout: Duration) -> BTreeMap<String, String> {
        let t0 = Instant::now();
        loop {
            let log = self.console_log(name);
            assert!(
                !log.contains("vkload FAIL"),
                "vkload failed a self-check:\n{log}"
            );
            if let Some(l) = last_tick_line(&log) {
                if field_u64(&l, "tick") >= tick {
                    return l;
                }
            }
            assert!(
                t0.elapsed() < timeout,
                "no tick {tick} on {name} within {timeout:?}; console:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until some console line of `name` makes `pick` return a value, and return the
    /// value of the last such line. Fails on a line that says `FAIL`, or at the timeout.
    pub fn wait_line<T>(
        &self,
        name: &str,
        timeout: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let t0 = Instant::now();
        loop {
            let log = self.console_log(name);
            assert!(
                !log.lines().any(|l| l.contains("FAIL")),
                "{name} failed a self-check:\n{log}"
            );
            // Only whole lines: the last one may still be on its way.
            let whole = &log[..log.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(v) = whole.lines().filter_map(&mut pick).last() {
                return v;
            }
            assert!(
                t0.elapsed() < timeout,
                "no matching line on {name} within {timeout:?}; console:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checkpoint `name` (which stops it) while tailing its console; the image's path and the
    /// last `ok N` line the vkernel printed before it stopped. Fails on a `FAIL` line.
    pub fn checkpoint_tailed(&mut self, name: &str) -> (PathBuf, String) {
        let tail = ConsoleTail::start(self, name);
        let img = self.path(&format!("{name}.vkimg"));
        self.ok(&["checkpoint", name, "-o", img.to_str().expect("utf-8")]);
        self.forget(name);
        let log = tail.finish();
        assert!(
            !log.contains("FAIL"),
            "failed before the checkpoint:\n{log}"
        );
        let before = log
            .lines()
            .rfind(|l| ok_counter(l).is_some())
            .expect("rounds before the checkpoint")
            .to_string();
        (img, before)
    }

    pub fn forget(&mut self, name: &str) {
        self.names.retain(|n| n != name);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in std::mem::take(&mut self.names) {
            let _ = self.vkm(&["kill", &n]);
        }
    }
}

/// Fields of every `vkload tick=...` line.
pub fn tick_lines(log: &str) -> Vec<BTreeMap<String, String>> {
    log.lines()
        .filter(|l| l.starts_with("vkload tick="))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

pub fn last_tick_line(log: &str) -> Option<BTreeMap<String, String>> {
    tick_lines(log).pop()
}

pub fn field_u64(line: &BTreeMap<String, String>, key: &str) -> u64 {
    line.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {line:?}"))
}

/// Keeps re-reading a vkernel's console log in the background, so that its last lines are
/// known even after a checkpoint stops the vkernel and its shim removes the log.
pub struct ConsoleTail {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<String>>,
}

impl ConsoleTail {
    pub fn start(lab: &Lab, name: &str) -> ConsoleTail {
        let path = lab.state_dir().join(name).join("console.log");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut last = String::new();
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(t) = std::fs::read_to_string(&path) {
                    if t.len() >= last.len() {
                        last = t;
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            last
        });
        ConsoleTail {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop tailing; the last content seen.
    pub fn finish(mut self) -> String {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for ConsoleTail {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
