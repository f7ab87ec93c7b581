//! The `vkmigrate` binary end to end: run, ps, console, kill, names and the shim's clean-up.
//! Runs as root; every test has its own state directory and kills what it started.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TICKER: &str = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vkmigrate"));
        c.arg("--state-dir")
            .arg(self.state())
            .env_remove("VKMIGRATE_STATE_DIR")
            .env_remove("RUST_LOG");
        c
    }

    fn vkm(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("vkmigrate runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vkm(args);
        assert!(
            out.status.success(),
            "vkmigrate {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn run_ticker(&self, name: &str) -> i32 {
        let out = self.ok(&["run", "--name", name, "--", "sh", "-c", TICKER]);
        assert!(
            out.starts_with(&format!("started {name}: init pid ")),
            "{out}"
        );
        self.ps_entry(name).expect("listed")["init_pid"]
            .as_i64()
            .expect("pid") as i32
    }

    fn ps(&self) -> Vec<Value> {
        let out = self.ok(&["ps", "--json"]);
        match serde_json::from_str(&out) {
            Ok(Value::Array(v)) => v,
            other => panic!("ps --json gave {other:?}"),
        }
    }

    fn ps_entry(&self, name: &str) -> Option<Value> {
        self.ps().into_iter().find(|e| e["name"] == name)
    }

    fn vk_dir(&self, name: &str) -> PathBuf {
        self.state().join(name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.state()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let _ = self.vkm(&["kill", &name]);
            // If `kill` could not do it, do it by hand: the init (if still the shim's child)
            // and the shim.
            if let Ok(t) = std::fs::read_to_string(e.path().join("vkernel.json")) {
                if let Ok(rec) = serde_json::from_str::<Value>(&t) {
                    let shim = rec["shim_pid"].as_i64().unwrap_or(0) as i32;
                    let init = rec["init_pid"].as_i64().unwrap_or(0) as i32;
                    if shim > 1 && ppid(init) == Some(shim) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(init),
                            nix::sys::signal::SIGKILL,
                        );
                    }
                    if shim > 1
                        && std::fs::read_to_string(format!("/proc/{shim}/cmdline"))
                            .is_ok_and(|c| c.contains("__shim"))
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(shim),
                            nix::sys::signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains("Z"))
    })
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

#[test]
fn run_ps_console_kill() {
    let env = Env::new();
    let init = env.run_ticker("tick1");

    let e = env.ps_entry("tick1").expect("listed");
    assert_eq!(e["state"], "running");
    assert_eq!(e["command"][0], "sh");
    assert!(e["memory_bytes"].as_u64().expect("memory") > 0, "{e}");
    assert!(
        e["console_tty"]
            .as_str()
            .expect("tty")
            .starts_with("/dev/pts/"),
        "{e}"
    );
    assert!(alive(init));
    assert_eq!(ppid(init), e["shim_pid"].as_i64().map(|p| p as i32));

    let table = env.ok(&["ps"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("tick1 ") && l.contains("running")),
        "{table}"
    );

    // The console log grows.
    let log = env.vk_dir("tick1").join("console.log");
    assert!(
        wait_until(Duration::from_secs(5), || file_len(&log) > 0),
        "no console output"
    );
    let before = file_len(&log);
    assert!(
        wait_until(Duration::from_secs(5), || file_len(&log) > before + 20),
        "console log does not grow"
    );
    assert!(std::fs::read_to_string(&log)
        .expect("log")
        .contains("tick 1"));

    // `console` with a stdin that ends at once: recent output, then live output for 1 s.
    let ticks = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
            .collect()
    };
    let logged_before = ticks(&std::fs::read_to_string(&log).expect("log"))
        .into_iter()
        .max()
        .expect("a tick");
    let t0 = Instant::now();
    let out = env.vkm(&["console", "tick1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "ended before the 1 s linger"
    );
    let seen = text(&out.stdout);
    assert!(seen.contains("tick 0"), "recent output missing: {seen}");
    // Ticks printed while it was attached (the log had up to `logged_before` then).
    assert!(
        ticks(&seen).iter().any(|&n| n > logged_before + 1),
        "live output missing (the log had tick {logged_before} when it attached): {seen}"
    );

    // --no-attach-log: only new output.
    let out = env.vkm(&["console", "tick1", "--no-attach-log"]);
    assert!(out.status.success());
    assert!(
        !text(&out.stdout).contains("tick 0\r\n"),
        "old output shown"
    );
    assert!(text(&out.stdout).contains("tick "), "no live output");

    env.ok(&["kill", "tick1"]);
    assert!(!env.vk_dir("tick1").exists(), "state left behind");
    assert!(env.ps().is_empty());
    assert!(
        wait_until(Duration::from_secs(2), || !alive(init)),
        "init survived"
    );

    let out = env.vkm(&["kill", "tick1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "Error: vkernel tick1 does not exist"
    );
}

#[test]
fn console_input_reaches_the_vkernel() {
    let env = Env::new();
    env.ok(&[
        "run",
        "--name",
        "echoer",
        "--",
        "sh",
        "-c",
        "read line; echo got:$line; exec sleep 100",
    ]);
    let mut child = env
        .cmd()
        .args(["console", "echoer"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("console starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\n")
        .expect("write");
    // stdin is closed now: the console ends 1 s later.
    let out = child.wait_with_output().expect("console ends");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("got:hello"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn duplicate_name_is_refused() {
    let env = Env::new();
    let init = env.run_ticker("dup");
    let out = env.vkm(&["run", "--name", "dup", "--", "sleep", "100"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "Error: vkernel dup already exists"
    );
    // The first one is untouched.
    let e = env.ps_entry("dup").expect("still listed");
    assert_eq!(e["init_pid"].as_i64(), Some(i64::from(init)));
    assert_eq!(e["command"][0], "sh");
    assert_eq!(env.ps().len(), 1);
}

#[test]
fn bad_names_are_refused() {
    let env = Env::new();
    let long = "x".repeat(65);
    for name in ["a/b", "..", "", "sp ace", long.as_str()] {
        let out = env.vkm(&["run", "--name", name, "--", "true"]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "name {name:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("name"), "{}", text(&out.stderr));
    }
    for args in [["kill", "a/b"], ["console", "a b"]] {
        assert_eq!(env.vkm(&args).status.code(), Some(2));
    }
    assert!(!env.state().join("a").exists());
}

#[test]
fn missing_command_is_refused_before_anything_is_created() {
    let env = Env::new();
    let out = env.vkm(&["run", "--name", "nocmd", "--", "no-such-command-vkm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Command no-such-command-vkm not found in PATH"),
        "{}",
        text(&out.stderr)
    );
    assert!(!env.vk_dir("nocmd").exists());
}

#[test]
fn shim_cleans_up_when_the_vkernel_ends() {
    let env = Env::new();
    env.ok(&[
        "run",
        "--name",
        "brief",
        "--",
        "sh",
        "-c",
        "echo bye; sleep 0.3",
    ]);
    assert!(
        wait_until(Duration::from_secs(5), || !env.vk_dir("brief").exists()),
        "the shim did not remove the state of an ended vkernel"
    );
    assert!(env.ps().is_empty());
    // The name is free again.
    env.run_ticker("brief");
}

#[test]
fn shim_stops_the_vkernel_on_sigterm() {
    let env = Env::new();
    let init = env.run_ticker("term");
    let shim = env.ps_entry("term").expect("listed")["shim_pid"]
        .as_i64()
        .expect("pid") as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::SIGTERM)
        .expect("signal");
    assert!(
        wait_until(Duration::from_secs(5), || !env.vk_dir("term").exists()),
        "state left behind"
    );
    assert!(
        wait_until(Duration::from_secs(2), || !alive(init)),
        "init survived"
    );
}

#[test]
fn stale_state_is_removed() {
    let env = Env::new();
    // What a shim that died leaves behind: a record and an unlocked lock.
    let dir = env.vk_dir("ghost");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("lock"), b"").expect("lock");
    let rec = serde_json::json!({
        "name": "ghost", "shim_pid": 999_999_999, "init_pid": 999_999_998,
        "argv": ["sh"], "console_tty": "/dev/pts/999", "created": 0
    });
    std::fs::write(dir.join("vkernel.json"), rec.to_string()).expect("record");
    assert!(env.ps().is_empty());
    assert!(!dir.exists(), "ps did not remove the stale state");

    // `run` takes over a stale name as well.
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("vkernel.json"), rec.to_string()).expect("record");
    env.run_ticker("ghost");
    assert_eq!(env.ps().len(), 1);
}

#[test]
fn errors_print_the_cause_chain() {
    let env = Env::new();
    let out = env.vkm(&["console", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim(),
        "Error: vkernel nobody does not exist"
    );

    let out = env.vkm(&["checkpoint", "nobody", "-o", "/nonexistent-dir-vkm/x.vkimg"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with("Error: The output directory /nonexistent-dir-vkm does not exist"),
        "{}",
        text(&out.stderr)
    );

    let existing = env.dir.path().join("exists.vkimg");
    std::fs::write(&existing, b"x").expect("write");
    let out = env.vkm(&[
        "checkpoint",
        "nobody",
        "-o",
        existing.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exists (use --force"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_lists_every_command_and_hides_the_shim() {
    let env = Env::new();
    let help = env.ok(&["--help"]);
    for c in [
        "run",
        "ps",
        "console",
        "checkpoint",
        "restore",
        "inspect",
        "kill",
        "--state-dir",
        "--log-format",
    ] {
        assert!(help.contains(c), "{c} missing from --help: {help}");
    }
    assert!(!help.contains("__shim"));
    let help = env.ok(&["checkpoint", "--help"]);
    for f in ["--output", "--leave-running", "--no-compress", "--force"] {
        assert!(help.contains(f), "{f} missing: {help}");
    }
}
