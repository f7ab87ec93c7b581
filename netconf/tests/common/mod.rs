//! Test lab helpers: namespaces named after the test, the process and a counter, removed on
//! drop; `ip` subprocesses (allowed in tests) to build the "before" state; a thread that
//! enters a namespace to run the crate's calls there.

#![allow(dead_code)]

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test, process and call, short enough for an interface (15 bytes).
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let s = format!("{tag}{:x}{n}", std::process::id());
    assert!(s.len() <= 15, "{s} is too long for an interface name");
    s
}

/// A network namespace under /run/netns, deleted (with every link in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(test: &str) -> Netns {
        let name = format!(
            "vkm-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS...`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", self.name.as_str()];
        v.extend_from_slice(args);
        run(&v);
    }

    /// `ip -n NS ARGS...` output, or None on failure.
    pub fn ip_out(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn has_link(&self, name: &str) -> bool {
        self.ip_out(&["link", "show", "dev", name]).is_some()
    }

    /// Run `f` on a thread that entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("open netns");
                setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
