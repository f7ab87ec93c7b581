//! Network-namespace test lab for live-migration tests (DESIGN.md §5): a `lan` namespace with a
//! bridge and the client address, one namespace per host joined to it by a veth pair, one fleet
//! CA, and per host a state dir and a TLS dir. Everything is named after the test, the process
//! and a per-process counter, and the lab's Drop removes it all, also when the test fails.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead as _, Read, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{field_u64, last_tick_line, tick_lines, vkload_bin, vkmigrate_bin, COMMAND_TIMEOUT};

/// The host side of a host's veth pair (its lan side is `vhI` in the lan namespace).
pub const HOST_IF: &str = "eth0";
/// The bridge in the lan namespace, and in a [`NetLab::bridged`] lab each host's own bridge,
/// which enslaves the host's uplink and the taps of its vkernels.
pub const BRIDGE: &str = "br0";
/// The client's address: on the bridge in the lan namespace.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The port `Host::spawn_listen` listens on.
pub const LISTEN_PORT: u16 = 4433;

static LABS: AtomicUsize = AtomicUsize::new(0);
type Pids = Arc<Mutex<Vec<u32>>>;

fn pids(p: &Pids) -> std::sync::MutexGuard<'_, Vec<u32>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `cmd` to the end with stdout and stderr drained while it runs; killed after `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out_t, err_t) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let err = err_t.join().unwrap_or_default();
                let err = String::from_utf8_lossy(&err);
                return Err(format!("{cmd:?} hung for {timeout:?}: {err}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for {cmd:?}: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Run a command that must succeed within [`COMMAND_TIMEOUT`]; its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = output_within(cmd, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n NETNS ARGS` (ARGS split at spaces), which must succeed.
pub fn ip(netns: &str, args: &str) -> String {
    must(Command::new("ip").args(["-n", netns]).args(args.split(' ')))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

pub struct Host {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    pub state_dir: PathBuf,
    pub tls_dir: PathBuf,
    /// The host's own directory in the lab (state, TLS, listener logs, VKLOAD_DIR).
    pub dir: PathBuf,
    listeners: Pids,
}

impl Host {
    /// `program args...` in the host's network namespace, not started yet. Through
    /// `nsenter --net`, not `ip netns exec`: the latter also remounts /sys, which hides the
    /// cgroup hierarchy that `send` throttles a vkernel with.
    pub fn cmd<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program)
            .args(args)
            .env("VKLOAD_DIR", &self.dir);
        c
    }

    /// `ip -n NETNS ARGS` in the host's namespace, which must succeed; its stdout.
    pub fn ip(&self, args: &str) -> String {
        ip(&self.netns, args)
    }

    /// `ip -n NETNS ARGS` in the host's namespace, whatever its outcome.
    pub fn try_ip(&self, args: &str) -> Output {
        let mut c = Command::new("ip");
        c.args(["-n", &self.netns]).args(args.split(' '));
        output_within(&mut c, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Whether interface `ifname` exists on this host.
    pub fn has_link(&self, ifname: &str) -> bool {
        self.try_ip(&format!("link show dev {ifname}"))
            .status
            .success()
    }

    fn vkm_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.cmd(vkmigrate_bin(), &["--state-dir", s(&self.state_dir)]);
        c.args(args);
        c
    }

    /// `vkmigrate --state-dir S ARGS` in the host's namespace; a hang fails the test.
    pub fn vkm(&self, args: &[&str]) -> Output {
        output_within(&mut self.vkm_cmd(args), COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("on {}: {e}", self.name))
    }

    /// [`Host::vkm`] that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        must(&mut self.vkm_cmd(args))
    }

    /// Start vkload as vkernel `name` on this host.
    pub fn run_vkload(&self, name: &str, args: &[&str]) {
        let bin = vkload_bin();
        let mut a = vec!["run", "--name", name, "--", s(&bin)];
        a.extend_from_slice(args);
        self.ok(&a);
    }

    /// Names of the vkernels `ps` lists on this host.
    pub fn ps_names(&self) -> Result<Vec<String>, String> {
        let out = output_within(&mut self.vkm_cmd(&["ps", "--json"]), COMMAND_TIMEOUT)?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("ps --json: {e}"))?;
        Ok(rows
            .iter()
            .filter_map(|r| r["name"].as_str().map(String::from))
            .collect())
    }

    /// `vkmigrate listen` on ADDR:4433 with the host's TLS dir, once it said `listening on`.
    pub fn spawn_listen(&self) -> Listener {
        self.spawn_listen_with(&[])
    }

    /// [`Host::spawn_listen`] with more options (e.g. `--max-memory`).
    pub fn spawn_listen_with(&self, extra: &[&str]) -> Listener {
        let addr = SocketAddrV4::new(self.addr, LISTEN_PORT).to_string();
        let mut cmd = self.vkm_cmd(&["listen", "--addr", &addr, "--tls-dir", s(&self.tls_dir)]);
        cmd.args(extra);
        self.spawn_ready("listen", cmd, "listening on ")
    }

    /// `vkmigrate --state-dir S ARGS` in the host's namespace, not started yet (for a
    /// command the test watches or signals while it runs).
    pub fn vkm_command(&self, args: &[&str]) -> Command {
        self.vkm_cmd(args)
    }

    /// Start `cmd` (from [`Host::cmd`]) as a daemon and wait (20 s at most) until its first
    /// stdout line starts with `ready`; its stdout and stderr go to `DIR/TAG.stdout`, `.stderr`.
    pub fn spawn_ready(&self, tag: &str, mut cmd: Command, ready: &str) -> Listener {
        let stdout_path = self.dir.join(format!("{tag}.stdout"));
        let stderr_path = self.dir.join(format!("{tag}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("start the daemon");
        pids(&self.listeners).push(child.id());
        let mut l = Listener {
            addr: SocketAddrV4::new(self.addr, LISTEN_PORT),
            child,
            stdout_path,
            stderr_path,
            live: self.listeners.clone(),
            reaped: false,
        };
        let (tx, rx) = mpsc::channel();
        let mut file = File::create(&l.stdout_path).expect("stdout file");
        let out = l.child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                let _ = tx.send(line);
            }
        });
        let first = rx.recv_timeout(Duration::from_secs(20));
        assert!(
            matches!(&first, Ok(line) if line.starts_with(ready)),
            "{tag} on {} did not print {ready:?} first (got {first:?}); stderr:\n{}",
            self.name,
            l.stderr()
        );
        l
    }

    /// `vkmigrate send NAME` from this host to `to`'s listener with this host's certificate,
    /// and `extra` options.
    pub fn send(&self, name: &str, to: &Host, extra: &[&str]) -> Output {
        let dest = SocketAddrV4::new(to.addr, LISTEN_PORT).to_string();
        let mut args = vec!["send", name, dest.as_str(), "--tls-dir", s(&self.tls_dir)];
        args.extend_from_slice(extra);
        self.vkm(&args)
    }

    /// The last tick vkload `name` printed on this host (0 for none); no check failed.
    pub fn last_tick(&self, name: &str) -> u64 {
        let log = self.console_log(name);
        assert!(!log.contains("vkload FAIL"), "vkload failed:\n{log}");
        last_tick_line(&log).map_or(0, |l| field_u64(&l, "tick"))
    }

    /// Every tick vkload `name` printed on this host's console, in order.
    pub fn ticks(&self, name: &str) -> Vec<u64> {
        tick_lines(&self.console_log(name))
            .iter()
            .map(|l| field_u64(l, "tick"))
            .collect()
    }

    /// vkload `name` runs on this host and ticks 5 more times within `timeout`, checks passing.
    pub fn still_ticking(&self, name: &str, timeout: Duration) {
        let t = self.last_tick(name);
        self.wait_tick(name, t + 5, timeout);
    }

    /// The pids of the `__shim receive` processes working for this host's state dir (the
    /// shims `listen` starts for arriving vkernels).
    pub fn receiving_shims(&self) -> Vec<u32> {
        let dir = s(&self.state_dir);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                // Gone meanwhile, or a zombie: an empty command line.
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
                args.contains(&dir.as_bytes()) && args.contains(&&b"receive"[..])
            })
            .collect()
    }

    pub fn console_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir.join(name).join("console.log")).unwrap_or_default()
    }

    /// Wait until the console shows a vkload line with tick ≥ `tick`; returns that line's fields.
    pub fn wait_tick(&self, name: &str, tick: u64, timeout: Duration) -> BTreeMap<String, String> {
        let t0 = Instant::now();
        loop {
            let log = self.console_log(name);
            assert!(!log.contains("vkload FAIL"), "vkload failed:\n{log}");
            if let Some(l) = last_tick_line(&log).filter(|l| field_u64(l, "tick") >= tick) {
                return l;
            }
            assert!(
                t0.elapsed() < timeout,
                "no tick {tick} on {}/{name} within {timeout:?}; console:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A daemon started by [`Host::spawn_ready`]: SIGTERM (then SIGKILL after 5 s) on Drop.
pub struct Listener {
    pub addr: SocketAddrV4,
    pub child: Child,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    live: Pids,
    reaped: bool,
}

impl Listener {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL now (a crashed receiver), and reap it.
    pub fn kill(&mut self) {
        self.stop(Duration::ZERO);
    }

    /// Its exit status, if it has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let st = self.child.try_wait().ok().flatten();
        if st.is_some() {
            self.forget();
        }
        st
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn forget(&mut self) {
        self.reaped = true;
        let pid = self.child.id();
        pids(&self.live).retain(|p| *p != pid);
    }

    /// SIGTERM, and SIGKILL if it still runs after `grace` (at once if `grace` is zero).
    fn stop(&mut self, grace: Duration) {
        if self.reaped {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let sig = if grace.is_zero() {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        let _ = kill(pid, sig);
        let t0 = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t0.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = self.child.wait();
        }
        self.forget();
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

pub struct NetLab {
    pub dir: tempfile::TempDir,
    pub lan: String,
    pub hosts: Vec<Host>,
    /// Every namespace this lab created (and only those), in creation order.
    namespaces: Vec<String>,
    listeners: Pids,
}

impl NetLab {
    pub fn new(test: &str, hosts: &[&str]) -> NetLab {
        NetLab::build(test, hosts, false)
    }

    /// A lab whose hosts each have a bridge [`BRIDGE`] with their uplink [`HOST_IF`] enslaved
    /// and their address on the bridge, so that a vkernel's tap on that bridge is on the LAN.
    pub fn bridged(test: &str, hosts: &[&str]) -> NetLab {
        NetLab::build(test, hosts, true)
    }

    fn build(test: &str, hosts: &[&str], bridged: bool) -> NetLab {
        assert!(hosts.len() < 99, "at most 98 hosts");
        let tag: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let prefix = format!(
            "vkm-{tag}-{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("vkm-net-")
            .tempdir()
            .expect("temp dir");
        let mut lab = NetLab {
            dir,
            lan: format!("{prefix}-lan"),
            hosts: Vec::new(),
            namespaces: Vec::new(),
            listeners: Pids::default(),
        };
        // From here on a panic drops `lab`, which removes what exists so far.
        let lan = lab.lan.clone();
        lab.add_netns(&lan);
        ip(&lan, &format!("link add {BRIDGE} type bridge"));
        ip(&lan, &format!("addr add {CLIENT_ADDR}/24 dev {BRIDGE}"));
        ip(&lan, &format!("link set {BRIDGE} up"));
        let ca = lab.dir.path().join("ca");
        must(Command::new(vkmigrate_bin()).args(["pki", "init", "--ca-dir", s(&ca)]));
        for (i, name) in hosts.iter().enumerate() {
            let valid = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            assert!(
                valid && *name != "lan" && !hosts[..i].contains(name),
                "bad host name {name:?}"
            );
            let netns = format!("{prefix}-{name}");
            lab.add_netns(&netns);
            let (lan_if, addr) = (format!("vh{i}"), Ipv4Addr::new(198, 18, 0, i as u8 + 1));
            let veth = format!("link add {HOST_IF} type veth peer name {lan_if} netns {lan}");
            ip(&netns, &veth);
            ip(&lan, &format!("link set {lan_if} master {BRIDGE} up"));
            if bridged {
                ip(&netns, &format!("link add {BRIDGE} type bridge"));
                ip(&netns, &format!("link set {HOST_IF} master {BRIDGE}"));
                ip(&netns, &format!("addr add {addr}/24 dev {BRIDGE}"));
                ip(&netns, &format!("link set {BRIDGE} up"));
            } else {
                ip(&netns, &format!("addr add {addr}/24 dev {HOST_IF}"));
            }
            ip(&netns, &format!("link set {HOST_IF} up"));
            let hdir = lab.dir.path().join(name);
            let (state_dir, tls_dir) = (hdir.join("state"), hdir.join("tls"));
            std::fs::create_dir_all(&state_dir).expect("state dir");
            lab.issue(&ca, name, addr, &tls_dir);
            lab.hosts.push(Host {
                name: name.to_string(),
                netns,
                addr,
                state_dir,
                tls_dir,
                dir: hdir,
                listeners: lab.listeners.clone(),
            });
        }
        lab
    }

    fn add_netns(&mut self, netns: &str) {
        must(Command::new("ip").args(["netns", "add", netns]));
        self.namespaces.push(netns.to_string());
        ip(netns, "link set lo up");
    }

    fn issue(&self, ca: &Path, name: &str, addr: Ipv4Addr, out: &Path) {
        let addr = addr.to_string();
        let args = ["--name", name, "--ip", &addr, "--out", s(out)];
        must(
            Command::new(vkmigrate_bin())
                .args(["pki", "issue", "--ca-dir", s(ca)])
                .args(args),
        );
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this lab"))
    }

    /// A TLS dir for `host` whose certificate (and ca.pem) come from a second, unrelated CA.
    pub fn foreign_tls(&self, host: &str) -> PathBuf {
        let h = self.host(host);
        let (ca, out) = (
            self.dir.path().join("foreign-ca"),
            h.dir.join("foreign-tls"),
        );
        if !ca.join("ca.pem").exists() {
            must(Command::new(vkmigrate_bin()).args(["pki", "init", "--ca-dir", s(&ca)]));
        }
        if !out.join("cert.pem").exists() {
            self.issue(&ca, host, h.addr, &out);
        }
        out
    }

    /// Shape `host`'s egress with a token bucket of `rate` (tc syntax, e.g. `20mbit`).
    pub fn limit(&self, host: &str, rate: &str) {
        // 20 ms worth of tokens, at least a few full-size packets.
        let burst = (rate_bytes(rate) / 50).max(16 * 1024);
        let ns = &self.host(host).netns;
        let args = format!(
            "-n {ns} qdisc replace dev {HOST_IF} root tbf rate {rate} burst {burst} latency 100ms"
        );
        must(Command::new("tc").args(args.split(' ')));
    }

    /// Take `host`'s link down.
    pub fn cut(&self, host: &str) {
        ip(&self.host(host).netns, &format!("link set {HOST_IF} down"));
    }

    /// Bring `host`'s link back up.
    pub fn restore_link(&self, host: &str) {
        ip(&self.host(host).netns, &format!("link set {HOST_IF} up"));
    }

    /// A command in the lan namespace (the client's).
    pub fn client_cmd<S: AsRef<OsStr>>(&self, program: impl AsRef<OsStr>, args: &[S]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.lan]).arg(program).args(args);
        c
    }

    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

/// Bytes per second of a tc rate such as `100mbit`, `10Mbit`, `2mbps` (1 MB/s if unknown).
fn rate_bytes(rate: &str) -> u64 {
    let r = rate.to_ascii_lowercase();
    let split = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
    let n: u64 = r[..split].parse().unwrap_or(1);
    let (unit, per) = match r[split..].strip_suffix("bit") {
        Some(unit) => (unit, 1),
        None => (r[split..].strip_suffix("bps").unwrap_or("?"), 8),
    };
    let scale = match unit {
        "" => 1,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        _ => return 1 << 20,
    };
    n * scale * per / 8
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut *pids(&self.listeners)) {
            // Not reaped yet (its Listener still exists), so the pid is still that daemon's.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        for h in &self.hosts {
            for name in h.ps_names().unwrap_or_default() {
                let _ = output_within(&mut h.vkm_cmd(&["kill", &name]), COMMAND_TIMEOUT);
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = output_within(
                Command::new("ip").args(["netns", "del", ns]),
                COMMAND_TIMEOUT,
            );
        }
    }
}
