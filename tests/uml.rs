//! User-Mode Linux under vkmigrate: a real Debian UML (package `user-mode-linux`) is booted
//! with the host's root as its hostfs root and a small init that prints a counter and its
//! uptime every second (every tick starts new guest processes: `sleep`, `cut`). Checkpointed
//! and restored, the guest must go on where it was: same kernel (no reboot: the uptime keeps
//! growing), the counter continues, new guest processes run under the restored kernel process.
//! Runs as root; every test has its own directory (the UML's `uml_dir` and init are in it).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::netlab::{Host, NetLab};
use common::Lab;

const BOOT: Duration = Duration::from_secs(60);
const TICKS: Duration = Duration::from_secs(30);

/// The guest's init: `uml-tick N UPTIME` once a second.
const INIT: &str = "#!/bin/sh\n\
    mount -t proc proc /proc 2>/dev/null\n\
    i=0\n\
    while true; do echo \"uml-tick $i $(cut -d' ' -f1 /proc/uptime)\"; i=$((i+1)); sleep 1; done\n";

/// `(counter, uptime)` of a `uml-tick` line.
fn tick(line: &str) -> Option<(u64, f64)> {
    let mut f = line.trim().strip_prefix("uml-tick ")?.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// The command line of a UML named `name` whose init and `uml_dir` are in `dir`.
fn uml_command(dir: &Path, name: &str) -> Vec<String> {
    uml_command_with(dir, name, INIT, &[])
}

/// [`uml_command`] with its own init script and extra kernel arguments.
fn uml_command_with(dir: &Path, name: &str, init_text: &str, extra: &[String]) -> Vec<String> {
    let init = dir.join("init.sh");
    std::fs::write(&init, init_text).expect("write init");
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod init");
    let uml_dir = dir.join("uml");
    std::fs::create_dir_all(&uml_dir).expect("uml dir");
    vec![
        "linux.uml".to_string(),
        "mem=64M".into(),
        format!("umid={name}"),
        format!("uml_dir={}", uml_dir.display()),
        "rootfstype=hostfs".into(),
        "rootflags=/".into(),
        "rw".into(),
        format!("init={}", init.display()),
        "con0=fd:0,fd:1".into(),
        "con=null".into(),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .collect()
}

/// Boot a UML named `name` in the lab; returns once its init has ticked twice.
fn boot(lab: &mut Lab, name: &str) -> (u64, f64) {
    let args = uml_command(lab.dir.path(), name);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.run(name, &argv);
    wait_tick(lab, name, |(n, _)| n >= 2, BOOT)
}

/// The last tick line `log` shows that `ok` accepts, waiting for one.
fn wait_log_tick(
    log: impl Fn() -> String,
    ok: impl Fn((u64, f64)) -> bool,
    t: Duration,
) -> (u64, f64) {
    wait_log_tick_or(log, ok, t, String::new)
}

/// [`wait_log_tick`], with `why` (logs that may explain it) in the message if none comes.
fn wait_log_tick_or(
    log: impl Fn() -> String,
    ok: impl Fn((u64, f64)) -> bool,
    t: Duration,
    why: impl Fn() -> String,
) -> (u64, f64) {
    let t0 = Instant::now();
    loop {
        let text = log();
        if let Some(x) = text.lines().filter_map(tick).filter(|&x| ok(x)).last() {
            return x;
        }
        assert!(
            t0.elapsed() < t,
            "no such tick within {t:?}; console:\n{text}\n{}",
            why()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a tick line on `name`'s console that `ok` accepts; returns the last one.
fn wait_tick(lab: &Lab, name: &str, ok: impl Fn((u64, f64)) -> bool, t: Duration) -> (u64, f64) {
    lab.wait_line(name, t, |l| tick(l).filter(|&x| ok(x)))
}

/// The first tick line on `name`'s console (a restored vkernel's console starts empty).
fn first_tick(lab: &Lab, name: &str) -> (u64, f64) {
    let t0 = Instant::now();
    loop {
        let log = lab.console_log(name);
        if let Some(t) = log.lines().find_map(tick) {
            return t;
        }
        assert!(t0.elapsed() < TICKS, "{name} never ticked; console:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_uml_goes_on_after_checkpoint_and_restore_twice_from_one_image() {
    let mut lab = Lab::new();
    let (n0, up0) = boot(&mut lab, "uml1");
    let image = lab.path("uml1.vkimg");
    let image_s = image.to_str().expect("utf-8");
    lab.ok(&["checkpoint", "uml1", "-o", image_s]);
    lab.forget("uml1");
    assert!(
        !lab.ok(&["ps"]).contains("uml1"),
        "the checkpointed UML still runs"
    );

    lab.restore(&image, "uml2");
    let (k, up_k) = first_tick(&lab, "uml2");
    assert!(
        k > n0 && k <= n0 + 3,
        "the counter did not continue: {n0} before, {k} after the restore"
    );
    assert!(
        up_k > up0,
        "the guest's uptime went from {up0} to {up_k}: it rebooted"
    );
    // Every tick is new guest processes (sleep, cut), i.e. new host processes under the
    // restored UML kernel process.
    wait_tick(&lab, "uml2", |(n, _)| n >= k + 3, TICKS);
    lab.ok(&["kill", "uml2"]);

    lab.restore(&image, "uml3");
    let (k3, up_k3) = first_tick(&lab, "uml3");
    // Same state, same next tick; the uptime differs only by how long each restore took.
    assert!(
        k3 == k && (up_k3 - up_k).abs() < 3.0,
        "two restores of one image did not start at the same point: {k} at {up_k} s, then {k3} at {up_k3} s"
    );
    let (_, up_end) = wait_tick(&lab, "uml3", |(n, _)| n >= k + 3, TICKS);
    assert!(up_end > up_k3);
}

/// A vkernel whose process is traced by another of its processes, not UML's way (no mconsole),
/// cannot be checkpointed: the refusal names the traced process and its tracer, and it runs on.
#[test]
fn a_vkernel_that_traces_its_own_process_otherwise_is_refused_and_runs_on() {
    let mut lab = Lab::new();
    let py = common::python3();
    let script = "import ctypes, os, signal, sys, time\n\
        libc = ctypes.CDLL(None, use_errno=True)\n\
        pid = os.fork()\n\
        if pid == 0:\n\
        \x20   libc.ptrace(0, 0, None, None)\n\
        \x20   os.kill(os.getpid(), signal.SIGSTOP)\n\
        \x20   while True: time.sleep(1)\n\
        os.waitpid(pid, os.WUNTRACED)\n\
        libc.ptrace(7, pid, None, None)\n\
        i = 0\n\
        while True:\n\
        \x20   print('ok', i, flush=True); i += 1; time.sleep(0.2)\n";
    lab.run("tr1", &[&py, "-c", script]);
    lab.wait_line("tr1", TICKS, common::ok_counter);
    let out = lab.vkm(&[
        "checkpoint",
        "tr1",
        "-o",
        lab.path("tr1.vkimg").to_str().expect("utf-8"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a traced process was checkpointed");
    assert!(
        err.contains("is traced by task") && err.contains("not a UML"),
        "unclear refusal: {err}"
    );
    assert!(!Path::new(&lab.path("tr1.vkimg")).exists());
    let before = lab.wait_line("tr1", TICKS, common::ok_counter);
    lab.wait_line("tr1", TICKS, |l| {
        common::ok_counter(l).filter(|&n| n > before)
    });
}

/// A UML live-migrates from hostA to hostB: its counter goes on there without a reboot, and the
/// copy on hostA is gone with all its processes.
#[test]
fn a_running_uml_moves_to_another_host_and_goes_on() {
    move_uml("uml-move", INIT);
}

/// The same while the guest rewrites 32 MiB of its memory (tmpfs) over and over: pre-copy must
/// still end (throttling the guest if need be) and the guest go on.
#[test]
fn a_uml_with_a_memory_heavy_job_moves_and_goes_on() {
    let init = INIT.replace(
        "i=0\n",
        "mount -t tmpfs tmpfs /dev/shm\n\
         while true; do dd if=/dev/urandom of=/dev/shm/blob bs=1M count=32 2>/dev/null; done &\n\
         i=0\n",
    );
    assert_ne!(init, INIT);
    move_uml("uml-busy", &init);
}

/// The destination's UML exits as it is let go (injected: told `halt` instead of `go`, which
/// runs its exit handlers as a crash on arrival does), removing its umid directory: on one
/// filesystem the source's too. The source must resume its UML all the same, with its
/// mconsole where it was, and leave nothing of the move behind.
#[test]
fn a_uml_that_exits_on_arrival_goes_on_at_the_source() {
    let lab = NetLab::new("uml-exit", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let addr = std::net::SocketAddrV4::new(b.addr, common::netlab::LISTEN_PORT).to_string();
    let tls = b.tls_dir.to_str().expect("utf-8 path");
    let mut listen = b.vkm_command(&["listen", "--addr", &addr, "--tls-dir", tls]);
    listen.env("VKMIGRATE_FAULT", "receiver-uml-exits-at-go");
    let _listener = b.spawn_ready("listen", listen, "listening on ");
    let args = uml_command(&a.dir, "umlx");
    let mut run = vec!["run", "--name", "umlx", "--"];
    run.extend(args.iter().map(String::as_str));
    a.ok(&run);
    let (n0, _) = wait_log_tick(|| a.console_log("umlx"), |(n, _)| n >= 2, BOOT);
    let umid_dir = a.dir.join("uml").join("umlx");
    let pid_file = std::fs::read(umid_dir.join("pid")).expect("the UML's pid file");

    let out = a.send("umlx", b, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "send succeeded: {err}");
    assert!(err.contains("keeps running here"), "{err}");
    assert_eq!(a.ps_names().expect("ps on a"), ["umlx"]);
    assert!(b.ps_names().expect("ps on b").is_empty());
    // The guest goes on on A ...
    wait_log_tick_or(
        || a.console_log("umlx"),
        |(n, _)| n > n0 + 3,
        TICKS,
        || {
            let log = |h: &Host| {
                std::fs::read_to_string(h.state_dir.join("umlx").join("shim.log"))
                    .unwrap_or_default()
            };
            format!("--- send ---\n{err}\n--- shim on A ---\n{}", log(a))
        },
    );
    // ... with its mconsole and pid file where they were, and nothing else of the move left.
    let socket = umid_dir.join("mconsole");
    let version = mconsole_in(a, &socket, "version");
    let listing = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        version.is_ok(),
        "mconsole at {}: {version:?}\n{:?} {:?}\n--- send ---\n{err}",
        socket.display(),
        listing(&a.dir.join("uml")),
        listing(&umid_dir),
    );
    assert_eq!(std::fs::read(umid_dir.join("pid")).ok(), Some(pid_file));
    let strays: Vec<_> = std::fs::read_dir(a.dir.join("uml"))
        .expect("uml dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "umlx")
        .collect();
    assert!(strays.is_empty(), "left in the uml dir: {strays:?}");
}

/// Both shims' logs of vkernel `name`, B's daemon's, and what `kept` kept of B's files, for a
/// failure's message.
fn shim_logs(a: &Host, b: &Host, name: &str, kept: &Kept) -> String {
    let read = |h: &Host| {
        std::fs::read_to_string(h.state_dir.join(name).join("shim.log")).unwrap_or_default()
    };
    let log_b = read(b);
    format!(
        "--- shim log on A ---\n{}\n--- shim log on B ---\n{log_b}\n--- processes on B ---\n{}\n\
         --- B's daemon ---\n{}\n--- kept ---\n{}\n--- the guest, through its mconsole ---\n{}",
        read(a),
        tree_of(&log_b),
        std::fs::read_to_string(b.dir.join("listen.stderr")).unwrap_or_default(),
        kept.text(),
        guest_view(b, &a.dir.join("uml").join(name).join("mconsole")),
    )
}

/// What the guest kernel says of itself (its timers above all, for a guest whose clock
/// stopped), asked through its mconsole (which moved with it).
fn guest_view(host: &Host, socket: &Path) -> String {
    ["proc uptime", "proc loadavg", "proc timer_list"]
        .iter()
        .map(|c| {
            let said = mconsole_in(host, socket, c).unwrap_or_else(|e| e);
            let cut: String = said.chars().take(6000).collect();
            format!("> {c}\n{cut}\n")
        })
        .collect()
}

/// `command` on the mconsole at `socket`, asked from `host`'s network namespace: UML answers
/// to the client's address, an abstract one, which names a socket only in the UML's namespace.
fn mconsole_in(host: &Host, socket: &Path, command: &str) -> Result<String, String> {
    let ns =
        std::fs::File::open(format!("/run/netns/{}", host.netns)).map_err(|e| e.to_string())?;
    let (socket, command) = (socket.to_path_buf(), command.to_string());
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        vkm_common::mconsole::request(&socket, &command).map_err(|e| e.to_string())
    })
    .join()
    .unwrap_or_else(|_| Err("the mconsole client panicked".into()))
}

/// The last contents seen of some files, read every 100 ms until dropped: a vkernel that ends
/// takes its directory (console and shim log) with it.
struct Kept {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(PathBuf, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Kept {
    fn new(paths: Vec<PathBuf>) -> Kept {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(
            paths
                .iter()
                .map(|p| (p.clone(), String::new()))
                .collect::<Vec<_>>(),
        ));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut v) = s.lock() {
                    for (p, text) in v.iter_mut() {
                        if let Ok(t) = std::fs::read_to_string(&*p) {
                            *text = t;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Kept { seen, stop }
    }

    fn text(&self) -> String {
        self.seen
            .lock()
            .map(|v| {
                v.iter()
                    .map(|(p, t)| format!("{}:\n{t}", p.display()))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every process below the sandbox init that `log` (a receiving shim's) names: pid, name,
/// state, where it waits, its tracer, pending and blocked signals.
fn tree_of(log: &str) -> String {
    let Some(init) = log
        .split("init_pid=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return "(no init pid in the log)".into();
    };
    let mut out = String::new();
    let below = vkm_sys::proc::descendants(init).unwrap_or_default();
    for pid in std::iter::once(init).chain(below) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l[k.len()..].trim().to_string())
                .unwrap_or_default()
        };
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        // Where it is: its syscall (or "running"), twice, 20 ms apart.
        let syscall = || {
            std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let l = std::fs::read_link(e.path()).unwrap_or_default();
                        let flags = std::fs::read_to_string(format!(
                            "/proc/{pid}/fdinfo/{}",
                            e.file_name().to_string_lossy()
                        ))
                        .unwrap_or_default()
                        .lines()
                        .find(|l| l.starts_with("flags:"))
                        .unwrap_or_default()
                        .to_string();
                        // Who gets the SIGIO of a tap (F_GETOWN, F_GETSIG), through a
                        // copy of the fd.
                        let owner = if l.to_string_lossy() == "/dev/net/tun" {
                            let fd: i32 = e.file_name().to_string_lossy().parse().unwrap_or(-1);
                            vkm_sys::calls::pidfd_open(pid)
                                .and_then(|p| vkm_sys::calls::pidfd_getfd(&p, fd, pid))
                                .map(|d| {
                                    format!(
                                        " owner={} sig={}",
                                        vkm_sys::calls::get_owner(&d),
                                        vkm_sys::calls::get_sig(&d)
                                    )
                                })
                                .unwrap_or_default()
                        } else {
                            String::new()
                        };
                        format!(
                            "{}={} ({flags}){owner}",
                            e.file_name().to_string_lossy(),
                            l.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        // The process's line first, then what belongs to it, indented (the other way round,
        // a syscall line once read as the next process's).
        out += &format!(
            "{pid} {} {} wchan={wchan} tracer={} threads={} pnd={} shdpnd={} blk={}\n",
            field("Name:"),
            field("State:"),
            field("TracerPid:"),
            field("Threads:"),
            field("SigPnd:"),
            field("ShdPnd:"),
            field("SigBlk:"),
        );
        out += &format!("  syscall: {} | {}\n  fds: {fds}\n", syscall(), {
            std::thread::sleep(Duration::from_millis(20));
            syscall()
        });
        let timers = std::fs::read_to_string(format!("/proc/{pid}/timers"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        out += &format!("  timers: {timers}\n  rip: {}\n", rip_samples(pid));
    }
    out
}

/// Where `pid` is, sampled 5 times 10 ms apart through ptrace (rip, rax, orig_rax), when no
/// one traces it; a process that spins shows where.
fn rip_samples(pid: i32) -> String {
    use vkm_sys::ptrace;
    let mut out = Vec::new();
    let mut first_rip = None;
    for _ in 0..5 {
        if ptrace::seize(pid, 0).is_err() {
            return "(cannot seize)".into();
        }
        let regs = ptrace::interrupt(pid)
            .ok()
            .and_then(|()| ptrace::wait_timeout(pid, Duration::from_millis(200)).ok())
            .and_then(|_| ptrace::getregs(pid).ok());
        let _ = ptrace::detach(pid, 0);
        if first_rip.is_none() {
            first_rip = regs.map(|r| r.rip);
        }
        match regs {
            Some(r) => out.push(format!(
                "{:#x}/{}/{}",
                r.rip, r.rax as i64, r.orig_rax as i64
            )),
            None => out.push("?".into()),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The mapping of the first sample's rip.
    let region = first_rip.and_then(|rip| {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        vkm_common::procfs::parse_maps(&maps)
            .ok()?
            .into_iter()
            .find(|v| (v.start..v.end).contains(&rip))
            .map(|v| format!("{:#x}-{:#x} {}", v.start, v.end, v.path.unwrap_or_default()))
    });
    format!("{} in {}", out.join(" "), region.unwrap_or_default())
}

/// `send` NAME from `a` to `b`, which must succeed; prints its summary (rounds, downtime) for
/// whoever runs the tests with `--nocapture`.
fn send_ok(a: &Host, name: &str, b: &Host) {
    let out = a.send(name, b, &[]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

fn move_uml(test: &str, init: &str) {
    let lab = NetLab::new(test, &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    let args = uml_command_with(&a.dir, "umlm", init, &[]);
    let mut run = vec!["run", "--name", "umlm", "--"];
    run.extend(args.iter().map(String::as_str));
    a.ok(&run);
    let (n0, up0) = wait_log_tick(|| a.console_log("umlm"), |(n, _)| n >= 2, BOOT);
    let kept = Kept::new(vec![
        b.state_dir.join("umlm").join("console.log"),
        b.state_dir.join("umlm").join("shim.log"),
    ]);
    send_ok(a, "umlm", b);
    assert!(!a.ps_names().expect("ps on a").contains(&"umlm".to_string()));
    let (n1, up1) = wait_log_tick_or(
        || b.console_log("umlm"),
        |(n, _)| n > n0 + 3,
        TICKS,
        || shim_logs(a, b, "umlm", &kept),
    );
    // A page that did not come along shows up as the guest kernel's own complaints.
    let log = b.console_log("umlm");
    for sign in ["BUG", "segfault", "Kernel panic", "Oops"] {
        assert!(
            !log.contains(sign),
            "the guest on B is corrupt ({sign}):\n{log}"
        );
    }
    assert!(
        up1 > up0,
        "uptime {up0} on A, {up1} on B: the guest rebooted"
    );
    let first = b
        .console_log("umlm")
        .lines()
        .find_map(tick)
        .expect("B's console has ticks");
    assert!(
        first.0 > n0 && first.0 <= n1,
        "B's counter did not go on from A's {n0}: first {first:?}"
    );
}

/// The guest's address on the lab's LAN, and the port of its TCP echo service.
const GUEST_IP: &str = "198.18.0.201";
const ECHO_PORT: u16 = 7000;

/// A TCP service in the guest: echoes every line back.
const ECHO: &str = "import socket\n\
s = socket.socket()\n\
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
s.bind(('0.0.0.0', 7000))\n\
s.listen(4)\n\
while True:\n\
\x20   c, _ = s.accept()\n\
\x20   for line in c.makefile('rb'):\n\
\x20       c.sendall(line)\n";

/// The client in the lan: one connection, numbered messages every 50 ms, each echo checked in
/// order; touches READY after 20, stops when STOP exists; `ok N` at the end, `FAIL ...` else.
const CLIENT: &str = "import os, socket, sys, time\n\
ip, port, ready, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]\n\
t0 = time.time()\n\
while True:\n\
\x20   try:\n\
\x20       s = socket.create_connection((ip, port), timeout=5); break\n\
\x20   except OSError:\n\
\x20       if time.time() - t0 > 90: print('FAIL no connection', flush=True); sys.exit(1)\n\
\x20       time.sleep(0.5)\n\
s.settimeout(60)\n\
f = s.makefile('rb')\n\
n = 0\n\
while not os.path.exists(stop):\n\
\x20   msg = b'msg %d\\n' % n\n\
\x20   s.sendall(msg)\n\
\x20   got = f.readline()\n\
\x20   if got != msg: print('FAIL sent', msg, 'got', got, flush=True); sys.exit(1)\n\
\x20   n += 1\n\
\x20   if n == 20: open(ready, 'w').close()\n\
\x20   time.sleep(0.05)\n\
print('ok', n, flush=True)\n";

/// Kills the client if the test fails before it ends.
struct Client(std::process::Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_file(path: &Path, what: &str, t: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(t0.elapsed() < t, "{what} within {t:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test: a UML on hostA's bridge, with its own address on eth0 and a TCP echo
/// service; a client in the LAN holds one connection through the whole move to hostB, and no
/// message is lost or repeated.
#[test]
fn a_uml_keeps_its_tcp_connection_through_a_move() {
    let lab = NetLab::bridged("uml-tcp", &["a", "b"]);
    let (a, b) = (lab.host("a"), lab.host("b"));
    let _listener = b.spawn_listen();
    let echo = a.dir.join("echo.py");
    std::fs::write(&echo, ECHO).expect("write echo.py");
    let init = format!(
        "#!/bin/sh\n\
         mount -t proc proc /proc 2>/dev/null\n\
         ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         python3 {} &\n\
         i=0\n\
         while true; do echo \"uml-tick $i $(cut -d' ' -f1 /proc/uptime)\"; i=$((i+1)); sleep 1; done\n",
        echo.display()
    );
    let extra = ["eth0=tuntap,tap0,02:00:00:00:03:00".to_string()];
    let args = uml_command_with(&a.dir, "umln", &init, &extra);
    let mut run = vec!["run", "--name", "umln", "--tap", "tap0@br0", "--"];
    run.extend(args.iter().map(String::as_str));
    a.ok(&run);
    wait_log_tick(|| a.console_log("umln"), |(n, _)| n >= 2, BOOT);

    let (ready, stop) = (lab.dir.path().join("ready"), lab.dir.path().join("stop"));
    let client_py = lab.dir.path().join("client.py");
    std::fs::write(&client_py, CLIENT).expect("write client.py");
    let port = ECHO_PORT.to_string();
    let mut cmd = lab.client_cmd(
        "python3",
        &[
            client_py.to_str().expect("utf-8"),
            GUEST_IP,
            &port,
            ready.to_str().expect("utf-8"),
            stop.to_str().expect("utf-8"),
        ],
    );
    let mut client = Client(
        cmd.stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the client"),
    );
    wait_file(
        &ready,
        "the client exchanged 20 messages",
        Duration::from_secs(120),
    );

    let kept = Kept::new(vec![
        b.state_dir.join("umln").join("console.log"),
        b.state_dir.join("umln").join("shim.log"),
    ]);
    send_ok(a, "umln", b);
    wait_log_tick_or(
        || b.console_log("umln"),
        |(n, _)| n >= 1,
        TICKS,
        || shim_logs(a, b, "umln", &kept),
    );
    // Some more messages after the move, then the client stops and reports.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&stop, b"").expect("stop file");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = client.0.try_wait().expect("wait for the client") {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "the client hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    if let Some(mut o) = client.0.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut said);
    }
    if !status.success() {
        let show = |what: &str, mut c: std::process::Command| {
            let out = c
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            format!("--- {what} ---\n{out}")
        };
        let fdb = "bridge fdb show | grep -v permanent";
        let fdb_links = "bridge fdb show | grep -v permanent; ip -s link";
        panic!(
            "the connection broke: {said}\n{}\n{}\n{}\n{}",
            shim_logs(a, b, "umln", &kept),
            show("LAN", lab.client_cmd("sh", &["-c", fdb])),
            show("hostA", a.cmd("sh", &["-c", fdb_links])),
            show("hostB", b.cmd("sh", &["-c", fdb_links])),
        );
    }
    let n: u64 = said
        .trim()
        .strip_prefix("ok ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("client said {said:?}"));
    assert!(n > 40, "only {n} messages went through");
    // The tap went with the guest.
    assert!(!a.has_link("tap0"), "tap0 is still on hostA");
    assert!(b.has_link("tap0"), "tap0 is not on hostB");
}
