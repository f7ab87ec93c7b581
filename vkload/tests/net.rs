//! `vkload --net`: in a network namespace of its own, a persistent tap whose host side has
//! 198.18.7.1/24, and vkload attached to it as 198.18.7.2. The host side must resolve and ping
//! vkload, and nothing else may answer. Needs root (network namespaces, taps) and `ip`,
//! `nsenter` and `ping`, which scripts/test installs.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TAP: &str = "vktap0";
const HOST_ADDR: &str = "198.18.7.1/24";
const GUEST_IP: &str = "198.18.7.2";
/// On the tap's subnet but nobody's.
const UNUSED_IP: &str = "198.18.7.3";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs `cmd` to the end, killed after COMMAND_TIMEOUT so that a hang fails the test.
fn output(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} hung for {COMMAND_TIMEOUT:?}");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// kill(2), so that the test needs no kill(1) (procps is not in every minimal image).
fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("PID fits pid_t");
    // SAFETY: plain system call without pointer arguments. The caller owns the Child of `pid`
    // and has not reaped it, so the PID cannot have been reused by another process.
    unsafe { libc::kill(pid, sig) };
}

fn must(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with the tap, and the vkload running in it; Drop removes both, also
/// when the test fails half-way.
struct Lab {
    ns: String,
    vkload: Option<Child>,
    console: Arc<Mutex<String>>,
}

impl Lab {
    fn new(test: &str) -> Lab {
        let ns = format!(
            "vkl-{test}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        must(Command::new("ip").args(["netns", "add", &ns]));
        // From here on Drop deletes the namespace, whatever fails next.
        let lab = Lab {
            ns,
            vkload: None,
            console: Arc::default(),
        };
        lab.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        lab.ip(&["addr", "add", HOST_ADDR, "dev", TAP]);
        lab.ip(&["link", "set", TAP, "up"]);
        // A root ping on a raw socket counts replies whose ICMP checksum is wrong; on an
        // ICMP datagram socket the kernel drops them first. The range is per namespace.
        must(
            lab.in_ns("sh")
                .args(["-c", "echo '0 0' > /proc/sys/net/ipv4/ping_group_range"]),
        );
        lab
    }

    fn ip(&self, args: &[&str]) -> String {
        must(Command::new("ip").args(["-n", &self.ns]).args(args))
    }

    fn in_ns(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(program);
        c
    }

    fn ping(&self, ip: &str, count: &str) -> Output {
        output(
            self.in_ns("ping")
                .args(["-c", count, "-i", "0.2", "-W", "1", ip]),
        )
    }

    /// nsenter execs vkload in its own process, so the child's PID is vkload's.
    fn start_vkload(&mut self, args: &[&str]) {
        let mut child = self
            .in_ns(env!("CARGO_BIN_EXE_vkload"))
            .args(["--mem", "4", "--tick-ms", "100"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting vkload under nsenter");
        let stdout = child.stdout.take().expect("piped stdout");
        self.vkload = Some(child);
        let console = self.console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                c.push_str(&line);
                c.push('\n');
            }
        });
    }

    fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for a console line for which `pred` holds; fails on a vkload FAIL line.
    fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let console = self.console();
            assert!(
                !console.contains("vkload FAIL"),
                "vkload failed:\n{console}"
            );
            if let Some(l) = console.lines().rev().find(|l| pred(l)) {
                return l.to_string();
            }
            assert!(
                t0.elapsed() < COMMAND_TIMEOUT,
                "no {what} within {COMMAND_TIMEOUT:?}; console:\n{console}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, which vkload answers with `vkload exit` and status 0.
    fn stop_vkload(&mut self) -> ExitStatus {
        let mut child = self.vkload.take().expect("vkload running");
        signal(child.id(), libc::SIGTERM);
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().expect("waiting for vkload") {
                return st;
            }
            if t0.elapsed() > COMMAND_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vkload ignored SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.vkload.take() {
            // Child::kill signals exactly this PID; vkload's own children follow through
            // PR_SET_PDEATHSIG.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = output(Command::new("ip").args(["-n", &self.ns, "link", "del", TAP]));
        let _ = output(Command::new("ip").args(["netns", "del", &self.ns]));
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in '{line}'"))
}

fn answers_arp_and_ping(test: &str, vkload_args: &[&str], mac: &str) {
    let mut lab = Lab::new(test);
    // Nothing answers for the guest address before vkload does, so the pings below cannot
    // be answered by anyone else.
    assert!(!lab.ping(GUEST_IP, "1").status.success());
    let net = vkload_args.join(" ");
    lab.start_vkload(vkload_args);
    let announced = lab.wait_line("vkload net line", |l| l.starts_with("vkload net "));
    assert!(
        announced.starts_with(&format!(
            "vkload net tap={TAP} ip={GUEST_IP}/24 mac={mac} fd="
        )),
        "{announced} (for {net})"
    );

    let out = lab.ping(GUEST_IP, "5");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0% packet loss"),
        "ping {GUEST_IP} failed ({}):\n{text}{}\nvkload console:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        lab.console()
    );
    let neigh = lab.ip(&["neigh", "show", GUEST_IP, "dev", TAP]);
    assert!(
        neigh.contains(&format!("lladdr {mac}")),
        "ip neigh for {GUEST_IP}: '{neigh}'"
    );

    // Another address on the segment stays unanswered: vkload speaks for its own IP only.
    assert!(!lab.ping(UNUSED_IP, "1").status.success());

    let tick = lab.wait_line("tick line with 5 echo replies", |l| {
        l.starts_with("vkload tick=") && l.contains(" net_icmp=") && field(l, "net_icmp") >= 5
    });
    let (rx, tx) = (field(&tick, "net_rx"), field(&tick, "net_tx"));
    let (arp, icmp) = (field(&tick, "net_arp"), field(&tick, "net_icmp"));
    assert_eq!(icmp, 5, "{tick}");
    assert!(arp >= 1, "{tick}");
    assert_eq!(tx, arp + icmp, "{tick}");
    // The requests for UNUSED_IP (and the host's IPv6 chatter) are read and ignored.
    assert!(rx > tx, "{tick}");

    let status = lab.stop_vkload();
    let console = lab.console();
    assert!(status.success(), "vkload exited with {status}:\n{console}");
    assert!(console.ends_with("vkload exit\n"), "{console}");
}

#[test]
fn threads_answer_arp_and_ping() {
    answers_arp_and_ping(
        "thr",
        &["--net", &format!("{TAP},{GUEST_IP}/24")],
        "02:00:c6:12:07:02",
    );
}

/// Without threads the main thread drains the tap once per tick; and with a MAC of our own.
#[test]
fn single_thread_answers_arp_and_ping() {
    answers_arp_and_ping(
        "one",
        &[
            "--without",
            "threads",
            "--net",
            &format!("{TAP},{GUEST_IP}/24,02:5e:18:07:00:02"),
        ],
        "02:5e:18:07:00:02",
    );
}

#[test]
fn missing_tap_is_a_failure() {
    let lab = Lab::new("missing");
    let out = output(
        lab.in_ns(env!("CARGO_BIN_EXE_vkload"))
            .args(["--net", &format!("nosuch0,{GUEST_IP}/24")]),
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("vkload FAIL: net: no interface 'nosuch0'"),
        "{stdout}"
    );
    // TUNSETIFF would have created it: vkload must not have.
    let links = lab.ip(&["-br", "link"]);
    assert!(!links.contains("nosuch0"), "{links}");
}
