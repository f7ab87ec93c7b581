//! Live migration benchmark: vkload of several sizes, idle and dirtying memory at several
//! rates, sent from hostA to hostB (two network namespaces on a bridge, as in the test lab)
//! with `vkmigrate send --report`; prints one table row per case from the reports.
//!
//! ```text
//! cargo build --release --workspace --bins
//! sudo target/release/migrate --sizes 256,1024,4096 --rates 0,20,50,200,1000 --runs 3
//! ```
//!
//! With `--uml`, the vkernel is a Debian User-Mode Linux of each size (`mem=`) booted with the
//! host's root as hostfs; "idle" runs a once-a-second counter, any non-zero rate a guest job
//! that rewrites 32 MiB of its tmpfs with random data in a loop (as fast as the guest can).
//!
//! A move counts as failed (column "failed", the reason on stderr) when `send` fails, or when
//! the vkernel does not go on at hostB: no new tick line on its console there within 10 s, or
//! a sign of a crash (a guest kernel panic, a vkload check that failed).
//!
//! The lab's links have an MTU of 65535 (`--mtu`), like loopback, where the QEMU figures the
//! README compares with were measured.
//!
//! "Idle" (rate 0) is vkload's own minimum of 8 pages per tick. Its verifier reads the whole
//! region once per `--verify-s` (30 s here, 2 s by default): a guest does not read all of its
//! RAM every other second, and that reading would compete with the migration for the cores.
//! Nor does it move a window over its RAM file (`--without window`; the tests keep it, and
//! UML does it): a remap in the last round makes the freeze read smaps again, 5 ms at 256 MiB.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    sizes: Vec<u64>,
    rates: Vec<u64>,
    runs: usize,
    downtime_ms: u64,
    uml: bool,
    mtu: u32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        sizes: vec![256, 1024],
        rates: vec![0, 20],
        runs: 1,
        downtime_ms: 20,
        uml: false,
        // As wide as loopback's (65536; a veth takes at most 65535), where the QEMU figures
        // this is compared with were measured: QUIC's packets are as large as the link's
        // frames, and its cost is per packet (`--mtu 1500` for a plain Ethernet LAN).
        mtu: 65535,
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>| -> Result<Vec<u64>> {
        v.context("a value is missing")?
            .split(',')
            .map(|x| x.trim().parse::<u64>().context("not a number"))
            .collect()
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => a.sizes = list(it.next())?,
            "--rates" => a.rates = list(it.next())?,
            "--runs" => a.runs = it.next().context("--runs N")?.parse()?,
            "--downtime-ms" => a.downtime_ms = it.next().context("--downtime-ms MS")?.parse()?,
            "--uml" => a.uml = true,
            "--mtu" => a.mtu = it.next().context("--mtu BYTES")?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: migrate [--sizes MIB,...] [--rates MBPS,...] [--runs N] [--downtime-ms MS] [--uml] [--mtu BYTES]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// The two namespaces and everything in them; removed on drop.
struct Lab {
    tag: String,
    work: PathBuf,
    bin: PathBuf,
    listener: Option<std::process::Child>,
}

impl Lab {
    fn new(bin: &Path, mtu: u32) -> Result<Lab> {
        let tag = format!("vkmbench{}", std::process::id());
        let work = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&work)?;
        let lab = Lab {
            tag,
            work,
            bin: bin.to_path_buf(),
            listener: None,
        };
        let (a, b, lan) = (lab.ns("a"), lab.ns("b"), lab.ns("lan"));
        for ns in [&a, &b, &lan] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&["ip", "-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &lan, "link", "set", "br0", "up"])?;
        for (i, ns) in [&a, &b].into_iter().enumerate() {
            let vh = format!("vh{i}");
            sh(&[
                "ip", "-n", &lan, "link", "add", &vh, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            let mtu = mtu.to_string();
            sh(&["ip", "-n", &lan, "link", "set", &vh, "mtu", &mtu])?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "mtu", &mtu])?;
            sh(&["ip", "-n", &lan, "link", "set", &vh, "master", "br0", "up"])?;
            let addr = format!("198.18.0.{}/24", i + 1);
            sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        }
        let vkm = lab.bin.join("vkmigrate");
        let ca = lab.work.join("ca");
        run(Command::new(&vkm)
            .args(["pki", "init", "--ca-dir"])
            .arg(&ca))?;
        for (h, ip) in [("a", "198.18.0.1"), ("b", "198.18.0.2")] {
            run(Command::new(&vkm)
                .args(["pki", "issue", "--ca-dir"])
                .arg(&ca)
                .args(["--name", h, "--ip", ip, "--out"])
                .arg(lab.work.join(h).join("tls")))?;
        }
        Ok(lab)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    /// `vkmigrate --state-dir ... ARGS` on `host`.
    fn vkm(&self, host: &str, args: &[&str]) -> Command {
        // nsenter, not `ip netns exec`, which remounts /sys and so hides the cgroups that
        // `send` throttles with.
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg("--")
            .arg(self.bin.join("vkmigrate"))
            .arg("--state-dir")
            .arg(self.work.join(host).join("state"))
            .args(args)
            .env("VKLOAD_DIR", &self.work);
        c
    }

    fn listen(&mut self) -> Result<()> {
        let tls = self.work.join("b").join("tls");
        let log = std::fs::File::create(self.work.join("listen.log"))?;
        let child = self
            .vkm(
                "b",
                &[
                    "listen",
                    "--addr",
                    "198.18.0.2:4433",
                    "--tls-dir",
                    path(&tls)?,
                ],
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.listener = Some(child);
        let t0 = Instant::now();
        while !std::fs::read_to_string(self.work.join("listen.log"))
            .unwrap_or_default()
            .contains("listening on")
        {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the listener did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.listener.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in ["a", "b"] {
            let _ = self.vkm(h, &["kill", "bench"]).output();
        }
        for h in ["a", "b", "lan"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

fn sh(args: &[&str]) -> Result<()> {
    run(Command::new(args[0]).args(&args[1..])).map(|_| ())
}

fn run(c: &mut Command) -> Result<Output> {
    let out = c.output().with_context(|| format!("cannot run {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

struct Sample {
    total_ms: f64,
    downtime_ms: f64,
    rounds: usize,
    wire_mib: f64,
    round0_gbs: f64,
    throttle: f64,
}

/// Boot a UML of `size` MiB as vkernel "bench" on hostA and wait for its init to run.
fn start_uml(lab: &Lab, size: u64, rate: u64) -> Result<()> {
    let job = if rate > 0 {
        "while true; do dd if=/dev/urandom of=/dev/shm/blob bs=1M count=32 2>/dev/null; done &\n"
    } else {
        ""
    };
    let init = lab.work.join("init.sh");
    std::fs::write(
        &init,
        format!(
            "#!/bin/sh\nmount -t proc proc /proc\nmount -t tmpfs tmpfs /dev/shm\n{job}\
             i=0\nwhile true; do echo \"uml-tick $i\"; i=$((i+1)); sleep 1; done\n"
        ),
    )?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let uml_dir = lab.work.join("uml");
    std::fs::create_dir_all(&uml_dir)?;
    let (mem, umldir, initarg) = (
        format!("mem={size}M"),
        format!("uml_dir={}", path(&uml_dir)?),
        format!("init={}", path(&init)?),
    );
    run(&mut lab.vkm(
        "a",
        &[
            "run",
            "--name",
            "bench",
            "--",
            "linux.uml",
            &mem,
            "umid=bench",
            &umldir,
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            &initarg,
            "con0=fd:0,fd:1",
            "con=null",
        ],
    ))?;
    let log = lab
        .work
        .join("a")
        .join("state")
        .join("bench")
        .join("console.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("uml-tick 3")
    {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the UML did not boot");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn one(lab: &Lab, size: u64, rate: u64, downtime_ms: u64, uml: bool) -> Result<Sample> {
    if uml {
        start_uml(lab, size, rate)?;
    } else {
        start_vkload(lab, size, rate)?;
    }
    send_and_report(lab, downtime_ms, uml)
}

/// Start vkload of `size` MiB as vkernel "bench" on hostA, once its memory is written.
fn start_vkload(lab: &Lab, size: u64, rate: u64) -> Result<()> {
    let vkload = lab.bin.join("vkload");
    let (size_s, rate_s) = (size.to_string(), rate.to_string());
    let mut args = vec![
        "run",
        "--name",
        "bench",
        "--",
        path(&vkload)?,
        "--mem",
        &size_s,
        "--verify-s",
        "30",
        "--without",
        "file,window",
    ];
    if rate > 0 {
        args.extend(["--dirty-mbps", &rate_s]);
    }
    run(&mut lab.vkm("a", &args))?;
    // Until it is set up: its memory written and its threads started, which its first tick
    // line on the console follows. (A vkernel that starts threads during pre-copy makes the
    // destination rebuild its skeleton: a different case from the one measured here.)
    let log = lab.work.join("a/state/bench/console.log");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("vkload tick=2 ")
    {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "vkload did not start within 2 minutes (see {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Signs on a console that the vkernel there is broken.
const CRASH_SIGNS: [&str; 6] = [
    "Kernel panic",
    "Segfault",
    "BUG",
    "Oops",
    "segfault",
    "FAIL",
];

/// After a move that `send` reported done: the vkernel must go on at hostB, its console
/// showing a new tick line and none of [`CRASH_SIGNS`]. A guest that crashed on arrival is
/// a failed move, whatever `send` said.
fn arrived(lab: &Lab, uml: bool) -> Result<()> {
    let log = lab.work.join("b/state/bench/console.log");
    let tick = if uml { "uml-tick " } else { "vkload tick=" };
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| CRASH_SIGNS.iter().any(|s| l.contains(s)))
        {
            bail!("the vkernel broke on hostB: {line}");
        }
        // The last line may still be partial: a complete tick line counts.
        if text
            .split_inclusive('\n')
            .any(|l| l.ends_with('\n') && l.contains(tick))
        {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the vkernel showed no tick on hostB within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `send` the vkernel "bench" from hostA to hostB, check that it goes on there, clean both
/// up, and read the report.
fn send_and_report(lab: &Lab, downtime_ms: u64, uml: bool) -> Result<Sample> {
    let report = lab.work.join("report.json");
    let tls = lab.work.join("a").join("tls");
    let dt = downtime_ms.to_string();
    let out = lab
        .vkm(
            "a",
            &[
                "send",
                "bench",
                "198.18.0.2:4433",
                "--tls-dir",
                path(&tls)?,
                "--downtime-ms",
                &dt,
                "--report",
                path(&report)?,
            ],
        )
        .output()?;
    if std::env::var_os("RUST_LOG").is_some() {
        // Whoever asked for logs gets send's.
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let arrival = if out.status.success() {
        arrived(lab, uml)
    } else {
        Ok(())
    };
    for h in ["a", "b"] {
        let _ = lab.vkm(h, &["kill", "bench"]).output();
        // `kill` returns before the shim has removed its state: wait for it.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let ps = run(&mut lab.vkm(h, &["ps", "--json"]))?;
            if !String::from_utf8_lossy(&ps.stdout).contains("\"bench\"") {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if !out.status.success() {
        bail!(
            "send failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    arrival?;
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    eprintln!(
        "downtime {} ms = {}; final round {}",
        r["downtime_ms"], r["downtime"], r["final_round"]
    );
    let r0 = &r["rounds"][0];
    let secs = r0["duration_ms"].as_f64().unwrap_or(1.0) / 1000.0;
    Ok(Sample {
        total_ms: r["total_ms"].as_f64().unwrap_or(0.0),
        downtime_ms: r["downtime_ms"].as_f64().unwrap_or(0.0),
        rounds: r["rounds"].as_array().map_or(0, Vec::len) + 1,
        wire_mib: r["bytes_on_wire"].as_f64().unwrap_or(0.0) / 1048576.0,
        round0_gbs: r0["bytes_raw"].as_f64().unwrap_or(0.0) / secs / 1e9,
        throttle: r["throttle_percent"].as_f64().unwrap_or(100.0),
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let bin = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .to_path_buf();
    let mut lab = Lab::new(&bin, args.mtu)?;
    lab.listen()?;
    println!(
        "| size | dirtying | runs | failed | total time | downtime (pause) | rounds | on the wire | round-0 page throughput | throttle |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &size in &args.sizes {
        for &rate in &args.rates {
            let mut samples = Vec::new();
            let mut failed = 0;
            for _ in 0..args.runs {
                match one(&lab, size, rate, args.downtime_ms, args.uml) {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{size} MiB at {rate} MB/s: {e:#}");
                    }
                }
            }
            if samples.is_empty() {
                println!("| {size} MiB | {rate} MiB/s | 0 | {failed} | | | | | | |");
                continue;
            }
            let range = |f: &dyn Fn(&Sample) -> f64, digits: usize| {
                let lo = samples.iter().map(f).fold(f64::INFINITY, f64::min);
                let hi = samples.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
                if (hi - lo).abs() < 1e-9 {
                    format!("{lo:.digits$}")
                } else {
                    format!("{lo:.digits$}–{hi:.digits$}")
                }
            };
            let rate_s = if rate == 0 {
                "idle".to_string()
            } else if args.uml {
                "guest rewrites 32 MiB".to_string()
            } else {
                format!("{rate} MiB/s")
            };
            let throttle = if samples.iter().all(|s| s.throttle >= 100.0) {
                "–".to_string()
            } else {
                format!("{} %", range(&|s| s.throttle, 1))
            };
            println!(
                "| {size} MiB | {rate_s} | {} | {failed} | {} ms | {} ms | {} | {} MiB | {} GB/s | {throttle} |",
                samples.len(),
                range(&|s| s.total_ms, 0),
                range(&|s| s.downtime_ms, 1),
                range(&|s| s.rounds as f64, 0),
                range(&|s| s.wire_mib, 0),
                range(&|s| s.round0_gbs, 2),
            );
        }
    }
    Ok(())
}
