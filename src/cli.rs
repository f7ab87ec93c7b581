//! The command line: one clap struct per subcommand, every flag documented.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::state;

/// Checkpoint, restore and live-migrate vkernels: process trees that run in their own
/// PID and time namespaces under a per-vkernel shim.
#[derive(Debug, Parser)]
#[command(name = "vkmigrate", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory with one sub-directory of state per vkernel (record, console log, sockets).
    #[arg(
        long,
        global = true,
        env = "VKMIGRATE_STATE_DIR",
        default_value = "/run/vkmigrate",
        value_name = "DIR"
    )]
    pub state_dir: PathBuf,

    /// Format of the log lines written to stderr. The level comes from RUST_LOG (default: warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(RunArgs),
    Ps(PsArgs),
    Console(ConsoleArgs),
    Checkpoint(CheckpointArgs),
    Restore(RestoreArgs),
    Inspect(InspectArgs),
    Kill(KillArgs),
    Pki(PkiArgs),
    Listen(ListenArgs),
    Send(SendArgs),
    Evacuate(EvacuateArgs),
    Undrain(UndrainArgs),
    #[command(name = "__shim", hide = true)]
    Shim(ShimArgs),
}

/// Start a command as a new vkernel under its own shim; returns once it runs.
///
/// Prints the vkernel's name and the host pid of its init. The command gets a fresh pty as its
/// console (see `vkmigrate console`).
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the new vkernel: 1 to 64 characters out of A-Z a-z 0-9 _ . -
    #[arg(long, value_parser = parse_name)]
    pub name: String,

    /// Create a tap device for the vkernel, enslaved to BRIDGE if given, and up. It is
    /// persistent until the vkernel ends (the vkernel opens it itself, e.g. UML's
    /// `eth0=tuntap,NAME`), and it moves with the vkernel. Repeatable.
    #[arg(long = "tap", value_name = "NAME[@BRIDGE]", value_parser = parse_tap)]
    pub taps: Vec<(String, Option<String>)>,

    /// An address of a tap's host side, `[TAP=]ADDR/PREFIX` (TAP may be left out when there is
    /// one --tap). Repeatable.
    #[arg(long = "tap-addr", value_name = "[TAP=]ADDR/PREFIX", value_parser = parse_tap_addr)]
    pub tap_addrs: Vec<(Option<String>, vkm_common::net::IfAddr)>,

    /// Create a --tap's bridge when it does not exist. It is then the vkernel's: recreated
    /// where the vkernel moves, and removed with it once no other port is enslaved to it.
    #[arg(long)]
    pub bridge_create: bool,

    /// The command to run and its arguments (put `--` before it when it has options).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// List the vkernels: name, state, init pid, memory (RSS sum), uptime and command.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Attach to a vkernel's console.
///
/// Prints the recent console output, then relays stdin to the console and the console to
/// stdout. On a terminal, stdin is put in raw mode and Ctrl-] detaches. With a stdin that is not
/// a terminal, the command ends one second after the end of stdin (or when the vkernel ends).
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Name of the vkernel.
    #[arg(value_parser = parse_name)]
    pub name: String,

    /// Do not print the recent console output first; show only new output.
    #[arg(long)]
    pub no_attach_log: bool,
}

/// Write a vkernel's state to an image file.
///
/// Without --leave-running the vkernel is stopped once the image is safely on disk.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Name of the vkernel.
    #[arg(value_parser = parse_name)]
    pub name: String,

    /// Image file to write (it appears only once complete and synced).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Keep the vkernel running after the image is written.
    #[arg(long)]
    pub leave_running: bool,

    /// Store pages uncompressed (faster on fast disks, larger images).
    #[arg(long)]
    pub no_compress: bool,

    /// Overwrite FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Recreate a vkernel from an image under a new shim; returns once it runs.
///
/// The whole image is verified first: a corrupted or truncated image is refused before anything
/// is created.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The image written by `vkmigrate checkpoint`.
    #[arg(value_name = "FILE")]
    pub image: PathBuf,

    /// Name for the restored vkernel (default: the name stored in the image).
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
}

/// Verify an image and show what it holds.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image to inspect.
    #[arg(value_name = "FILE")]
    pub image: PathBuf,

    /// Print JSON (the state model plus a summary of the pages) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Kill a vkernel (every process in it) and wait until its shim has cleaned up.
#[derive(Debug, Args)]
pub struct KillArgs {
    /// Name of the vkernel.
    #[arg(value_parser = parse_name)]
    pub name: String,
}

/// The fleet's certificates: every host that sends or receives vkernels has one, signed by the
/// fleet CA, and accepts only peers whose certificate that CA signed.
#[derive(Debug, Args)]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    Init(PkiInitArgs),
    Issue(PkiIssueArgs),
}

/// Create the fleet CA: DIR/ca.pem (certificate) and DIR/ca-key.pem (key, mode 0600).
///
/// Refuses if DIR already holds a CA. Keep ca-key.pem off the hosts: it is only needed to
/// issue certificates.
#[derive(Debug, Args)]
pub struct PkiInitArgs {
    /// Directory for the CA (created, mode 0700, if missing).
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,

    /// Common name of the CA certificate.
    #[arg(long, default_value = "vkmigrate fleet CA", value_name = "NAME")]
    pub common_name: String,

    /// Validity in days.
    #[arg(long, default_value_t = vkm_transport::pki::CA_DAYS, value_name = "DAYS")]
    pub days: u32,
}

/// Issue a host's certificate, signed by the fleet CA, for use as both TLS server (`listen`)
/// and client (`send`) certificate.
///
/// Writes OUT/ca.pem (the CA certificate), OUT/cert.pem and OUT/key.pem (mode 0600): the
/// directory to pass as --tls-dir on that host. Peers connect to the host by a name or address
/// the certificate carries: --name itself, and each --ip and --dns.
#[derive(Debug, Args)]
pub struct PkiIssueArgs {
    /// Directory of the CA (from `pki init`).
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,

    /// The host's name: the certificate's subject, and a DNS name (or IP address) in it.
    #[arg(long, value_name = "HOST")]
    pub name: String,

    /// An IP address of the host (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    pub ips: Vec<std::net::IpAddr>,

    /// Another DNS name of the host (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    pub dns: Vec<String>,

    /// Directory to write the host's files to (created, mode 0700, if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Validity in days.
    #[arg(long, default_value_t = vkm_transport::pki::HOST_DAYS, value_name = "DAYS")]
    pub days: u32,

    /// Replace an existing cert.pem and key.pem in OUT.
    #[arg(long)]
    pub force: bool,
}

/// Receive vkernels that other hosts send (`vkmigrate send`); runs until SIGTERM or Ctrl-C.
///
/// Each offer is checked first (name free, memory, CPU features, kernel build, mapped files)
/// and refused with a reason the sender prints. An accepted vkernel is received by a new shim,
/// which keeps running it. Several migrations can arrive at once. Prints `listening on ADDR`
/// once ready.
#[derive(Debug, Args)]
pub struct ListenArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:4433", value_name = "ADDR:PORT")]
    pub addr: std::net::SocketAddr,

    /// Directory with this host's certificate (ca.pem, cert.pem, key.pem; see `vkmigrate pki`).
    #[arg(long, default_value = "/etc/vkmigrate/tls", value_name = "DIR")]
    pub tls_dir: PathBuf,

    /// Memory the vkernels on this host may use in all, e.g. 8GiB (default: whatever the
    /// host has available). Offers beyond it are refused, and capacity queries (`evacuate`)
    /// are answered within it.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub max_memory: Option<u64>,
}

/// Live-migrate a running vkernel to another host, where `vkmigrate listen` runs.
///
/// Pages are copied while the vkernel runs (pre-copy rounds, tracking what it writes), then it
/// is frozen for the last pages and its other state; it resumes on the destination, and is
/// removed here only once it runs there. On any failure before that it keeps running here.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Name of the vkernel.
    #[arg(value_parser = parse_name)]
    pub name: String,

    /// The destination's listen address, HOST:PORT (HOST must match its certificate).
    #[arg(value_name = "HOST:PORT")]
    pub dest: String,

    /// Directory with this host's certificate (ca.pem, cert.pem, key.pem; see `vkmigrate pki`).
    #[arg(long, default_value = "/etc/vkmigrate/tls", value_name = "DIR")]
    pub tls_dir: PathBuf,

    /// The pause the vkernel may see: pre-copy goes on until the rest fits in it.
    #[arg(long, default_value_t = 20, value_name = "MS")]
    pub downtime_ms: u64,

    /// Cap on page data sent per second, e.g. 500MB/s, 1GB/s, 100MiB/s (default: no cap).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    pub max_bandwidth: Option<u64>,

    /// Write a JSON report of the migration (rounds, bytes, total time until the vkernel runs
    /// there, the cleanup after, downtime and its parts) to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Send pages uncompressed.
    #[arg(long)]
    pub no_compress: bool,

    /// Give up pre-copy after this many rounds and stop-and-copy.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub max_rounds: u32,

    /// Do not throttle a vkernel that writes memory faster than the link carries.
    #[arg(long)]
    pub no_throttle: bool,
}

/// Move every vkernel of this host to other hosts, e.g. before maintenance.
///
/// Asks each target's `listen` daemon for its room (free memory, the vkernels it runs,
/// whether its CPU, kernel build and network can take each vkernel), places the vkernels
/// largest first on the target that fits each best, and refuses before anything moves if
/// some vkernel has no place. The vkernels that write memory fastest go first, at most
/// --parallel at a time, sharing --max-bandwidth evenly. A migration that fails leaves its
/// vkernel running here, and it is tried on another target. While it runs, this host's own
/// `listen` refuses arrivals (the state dir's draining marker). Exits non-zero, naming them,
/// if any vkernel is left here.
#[derive(Debug, Args)]
pub struct EvacuateArgs {
    /// The targets' listen addresses, HOST:PORT,HOST:PORT,... (HOST must match each one's
    /// certificate).
    #[arg(
        long,
        required = true,
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    pub to: Vec<String>,

    /// Start at this time (RFC 3339 in UTC, e.g. 2026-12-01T02:00:00Z) instead of now;
    /// Ctrl-C or SIGTERM before then cancels without touching anything. After the start they
    /// only keep new migrations from starting: running ones end first.
    #[arg(long, value_parser = parse_time, value_name = "TIME")]
    pub at: Option<std::time::SystemTime>,

    /// Migrations that run at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64), value_name = "N")]
    pub parallel: u32,

    /// Only print the plan (where each vkernel would go, in which order, and what cannot
    /// be placed); move nothing. Exits non-zero if the plan does not fit.
    #[arg(long)]
    pub dry_run: bool,

    /// Keep this host drained (its `listen` refusing arrivals) after the evacuation, until
    /// `vkmigrate undrain`.
    #[arg(long)]
    pub stay_drained: bool,

    /// Directory with this host's certificate (ca.pem, cert.pem, key.pem; see `vkmigrate pki`).
    #[arg(long, default_value = "/etc/vkmigrate/tls", value_name = "DIR")]
    pub tls_dir: PathBuf,

    /// The pause each vkernel may see: pre-copy goes on until the rest fits in it.
    #[arg(long, default_value_t = 20, value_name = "MS")]
    pub downtime_ms: u64,

    /// Cap on page data per second for the whole evacuation, split evenly among the
    /// migrations that run at once, e.g. 1GB/s (default: no cap).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    pub max_bandwidth: Option<u64>,

    /// Write a JSON report to FILE: the targets, the plan, and per vkernel where it went,
    /// how long it took, its downtime and why any attempt failed.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// How long to watch each vkernel's writes to order them (fastest writer first).
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub sample_ms: u64,

    /// Send pages uncompressed.
    #[arg(long)]
    pub no_compress: bool,

    /// Give up pre-copy after this many rounds and stop-and-copy.
    #[arg(long, default_value_t = 30, value_name = "N")]
    pub max_rounds: u32,

    /// Do not throttle a vkernel that writes memory faster than the link carries.
    #[arg(long)]
    pub no_throttle: bool,
}

/// Let this host's `listen` accept vkernels again after `evacuate --stay-drained` (or an
/// evacuation that was killed).
#[derive(Debug, Args)]
pub struct UndrainArgs {}

/// An RFC 3339 time such as 2026-12-01T02:00:00Z.
fn parse_time(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not a time such as 2026-12-01T02:00:00Z ({e})"))
}

/// A size in bytes: a number with an optional unit B, KB, MB, GB (powers of 1000) or KiB,
/// MiB, GiB, and their one-letter forms K, M, G (of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    if s.contains('/') {
        return Err(format!("{s:?} is not a size such as 512MiB"));
    }
    let t = s.trim();
    let t = match t.strip_suffix(['K', 'M', 'G']) {
        Some(n) => format!("{n}{}iB", &t[n.len()..]),
        None => t.to_owned(),
    };
    parse_rate(&t).map_err(|e| e.replace("rate such as 500MB/s", "size such as 512MiB"))
}

/// A rate in bytes per second: a number with an optional unit B, KB, MB, GB (powers of 1000)
/// or KiB, MiB, GiB (of 1024), and an optional `/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate such as 500MB/s"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let v = n * mult;
    if v < 1.0 || !v.is_finite() {
        return Err(format!("{s:?} is not a positive rate"));
    }
    Ok(v as u64)
}

/// Internal: the per-vkernel shim, started by `run` and `restore`.
///
/// Expects the locked state lock on stdin, the status pipe on stdout and its log on stderr.
#[derive(Debug, Args)]
pub struct ShimArgs {
    #[command(subcommand)]
    pub mode: ShimMode,
}

#[derive(Debug, Subcommand)]
pub enum ShimMode {
    /// Start a command.
    Run {
        /// Name of the vkernel.
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// A tap `run` created for it (`TAP`, or `TAP@BRIDGE` when it created the bridge too).
        #[arg(long)]
        owned_tap: Vec<String>,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Restore an image.
    Restore {
        /// Name of the vkernel.
        #[arg(long, value_parser = parse_name)]
        name: String,
        /// Absolute path of the (already verified) image.
        #[arg(long)]
        image: PathBuf,
    },
    /// Receive a live migration (started by `listen`).
    Receive(ReceiveArgs),
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Name of the vkernel.
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    /// Address to accept the sender's connection on (port 0: any).
    #[arg(long)]
    pub bind: std::net::SocketAddr,
    #[arg(long)]
    pub tls_dir: PathBuf,
    /// The migration's id, which the sender must present.
    #[arg(long)]
    pub migration_id: String,
    /// The vkernel's CLOCK_MONOTONIC and CLOCK_BOOTTIME (ns) when our CLOCK_MONOTONIC read
    /// `at_ns`.
    #[arg(long, allow_hyphen_values = true)]
    pub mono_ns: i128,
    #[arg(long, allow_hyphen_values = true)]
    pub boot_ns: i128,
    #[arg(long, allow_hyphen_values = true)]
    pub at_ns: i128,
}

fn parse_tap(s: &str) -> Result<(String, Option<String>), String> {
    let (tap, bridge) = match s.split_once('@') {
        Some((t, b)) => (t, Some(b)),
        None => (s, None),
    };
    for n in std::iter::once(tap).chain(bridge) {
        // IFNAMSIZ is 16 with the terminating NUL.
        let ok = !n.is_empty()
            && n.len() <= 15
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(format!(
                "{n:?} is not an interface name (1 to 15 of A-Z a-z 0-9 - _ .)"
            ));
        }
    }
    Ok((tap.to_owned(), bridge.map(str::to_owned)))
}

fn parse_tap_addr(s: &str) -> Result<(Option<String>, vkm_common::net::IfAddr), String> {
    match s.split_once('=') {
        Some((tap, a)) => Ok((Some(parse_tap(tap)?.0), a.parse()?)),
        None => Ok((None, s.parse()?)),
    }
}

fn parse_name(s: &str) -> Result<String, String> {
    state::validate_name(s).map(|()| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_dashes() {
        let cli = Cli::try_parse_from([
            "vkmigrate",
            "run",
            "--name",
            "a",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .expect("parses");
        match cli.command {
            Command::Run(r) => assert_eq!(r.command, ["sh", "-c", "echo hi"]),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn pki_issue_takes_repeated_addresses() {
        let cli = Cli::try_parse_from([
            "vkmigrate",
            "pki",
            "issue",
            "--ca-dir",
            "ca",
            "--name",
            "hostb",
            "--ip",
            "198.18.0.2",
            "--ip",
            "::1",
            "--dns",
            "hostb.lan",
            "--out",
            "tls",
        ])
        .expect("parses");
        match cli.command {
            Command::Pki(PkiArgs {
                command: PkiCommand::Issue(a),
            }) => {
                assert_eq!(a.ips.len(), 2);
                assert_eq!(a.dns, ["hostb.lan"]);
                assert_eq!(a.days, vkm_transport::pki::HOST_DAYS);
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Cli::try_parse_from([
            "vkmigrate",
            "pki",
            "issue",
            "--ca-dir",
            "ca",
            "--name",
            "h",
            "--ip",
            "nope",
            "--out",
            "tls",
        ])
        .expect_err("bad IP refused");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn run_takes_taps_and_their_addresses() {
        let cli = Cli::try_parse_from([
            "vkmigrate",
            "run",
            "--name",
            "a",
            "--tap",
            "tap0@br0",
            "--tap",
            "tap1",
            "--tap-addr",
            "tap1=198.18.5.1/24",
            "--",
            "sh",
        ])
        .expect("parses");
        match cli.command {
            Command::Run(r) => {
                assert_eq!(r.taps[0], ("tap0".into(), Some("br0".into())));
                assert_eq!(r.taps[1], ("tap1".into(), None));
                assert_eq!(r.tap_addrs[0].0.as_deref(), Some("tap1"));
                assert_eq!(r.tap_addrs[0].1.to_string(), "198.18.5.1/24");
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in [
            ["--tap", "a-name-longer-than-15"],
            ["--tap", "tap0@"],
            ["--tap-addr", "198.18.5.1"],
        ] {
            let mut argv = vec!["vkmigrate", "run", "--name", "a"];
            argv.extend(bad);
            argv.extend(["--", "sh"]);
            let err = Cli::try_parse_from(argv).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn evacuate_takes_a_list_of_targets_and_a_time() {
        let cli = Cli::try_parse_from([
            "vkmigrate",
            "evacuate",
            "--to",
            "hostB:4433,hostC:4433",
            "--at",
            "2026-12-01T02:00:00Z",
            "--parallel",
            "3",
            "--max-bandwidth",
            "1GB/s",
        ])
        .expect("parses");
        match cli.command {
            Command::Evacuate(e) => {
                assert_eq!(e.to, ["hostB:4433", "hostC:4433"]);
                assert_eq!(e.parallel, 3);
                assert_eq!(e.max_bandwidth, Some(1_000_000_000));
                let at = e.at.expect("a time");
                let secs = at
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs();
                assert_eq!(secs, 1_796_090_400);
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in [
            &["--to", "b:1", "--at", "tomorrow"][..],
            &["--to", "b:1", "--parallel", "0"],
            &[],
        ] {
            let mut argv = vec!["vkmigrate", "evacuate"];
            argv.extend(bad);
            let err = Cli::try_parse_from(argv).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1GB/s").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn bad_names_are_usage_errors() {
        let err = Cli::try_parse_from(["vkmigrate", "kill", "a/b"]).expect_err("refused");
        assert_eq!(err.exit_code(), 2);
    }
}
