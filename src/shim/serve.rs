//! The shim process itself: sandbox set-up for `run` and `restore`, the status reply, then the
//! console loop until the vkernel ends.
//!
//! The shim MUST stay single-threaded: [`Sandbox::create`] forks init from it and, for a
//! restore, the shim's one thread is the ptrace tracer of the restored tree. So: no tokio, no
//! threads, no logging writer that spawns one.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use vkm_common::image::{decode_meta, Frame, ImageReader};
use vkm_common::model::Vkernel;
use vkm_migrate_dst::{InitMode, Sandbox};

use super::console::{End, Server};
use super::{Reply, RestoreStats};
use crate::cli::{LogFormat, ShimArgs, ShimMode};
use crate::logging;
use crate::state::{self, Record, StateDir, CONSOLE_SOCK};

/// A sandbox whose vkernel runs, with the console's pty master.
pub(super) struct Running {
    pub(super) sandbox: Sandbox,
    pub(super) master: OwnedFd,
    pub(super) console_tty: String,
    pub(super) argv: Vec<String>,
    pub(super) restored_from: Option<PathBuf>,
    pub(super) restore: Option<RestoreStats>,
    /// Set for a vkernel received by live migration.
    pub(super) migration_id: Option<String>,
    /// The console socket, when the record was already written (a received vkernel is
    /// published the moment it runs, before the sender hears that it does).
    pub(super) listener: Option<UnixListener>,
    /// Network devices created for this vkernel here: removed when it ends.
    pub(super) owned_net: Vec<vkm_common::net::OwnedNet>,
}

/// Entry point of `vkmigrate __shim`. Never prints to the CLI's terminal: its stdout is the
/// status pipe and its stderr the shim log.
pub fn main(state: &StateDir, args: ShimArgs, log_format: LogFormat) -> ExitCode {
    // Leave the CLI's session and controlling terminal (we are not a group leader: the CLI
    // spawned us into its own process group).
    let setsid = nix::unistd::setsid();
    let (lock, mut status) = match take_stdio() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vkmigrate shim: cannot take over stdin/stdout: {e}");
            return ExitCode::FAILURE;
        }
    };
    close_stray_fds(&[lock.as_raw_fd(), status.as_raw_fd()]);
    logging::init(log_format, "info");
    if let Err(e) = setsid {
        tracing::warn!(error = %e, "setsid failed");
    }

    let (name, dir) = match &args.mode {
        ShimMode::Run { name, .. }
        | ShimMode::Restore { name, .. }
        | ShimMode::Receive(crate::cli::ReceiveArgs { name, .. }) => {
            (name.clone(), state.dir(name))
        }
    };
    let span = tracing::info_span!("shim", vkernel = %name, pid = std::process::id());
    let _enter = span.enter();

    if let Err(e) = check_lock(&lock, &dir) {
        // Not ours: report, and leave the directory alone.
        tracing::error!(error = %format!("{e:#}"), "refusing to run");
        let chain = e.chain().map(ToString::to_string).collect();
        send_reply(&mut status, &Reply::Failed { chain });
        return ExitCode::FAILURE;
    }
    let result = check_single_threaded()
        .and_then(|()| match args.mode {
            ShimMode::Run {
                command, owned_tap, ..
            } => setup_run(command, &owned_tap),
            ShimMode::Restore { image, .. } => setup_restore(image),
            ShimMode::Receive(r) => super::receive::setup_receive(&r, state, &dir, &mut status),
        })
        .and_then(|mut running| {
            // Init and the vkernel have their own working directories now: do not pin the
            // caller's (our paths are absolute).
            if let Err(e) = nix::unistd::chdir("/") {
                tracing::warn!(error = %e, "cannot change to /");
            }
            if let Some(listener) = running.listener.take() {
                return Ok((running, listener));
            }
            match finish_setup(&dir, &name, &running) {
                Ok(listener) => Ok((running, listener)),
                Err(e) => {
                    running.sandbox.kill();
                    Err(e)
                }
            }
        });
    let (mut running, listener) = match result {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the vkernel could not be started");
            let chain = e.chain().map(ToString::to_string).collect();
            send_reply(&mut status, &Reply::Failed { chain });
            state::remove_vkernel_dir(&dir);
            return ExitCode::FAILURE;
        }
    };
    let init = Pid::from_raw(running.sandbox.init_pid);
    tracing::info!(init_pid = init.as_raw(), tty = %running.console_tty, "vkernel running");
    send_reply(
        &mut status,
        &Reply::Ready {
            init_pid: init.as_raw(),
            console_tty: running.console_tty.clone(),
            restore: running.restore.take(),
        },
    );
    drop(status);

    let code = match serve(&dir, running.master, listener, init) {
        Ok(End::InitExited(ws)) => {
            tracing::info!(status = ?ws, "the vkernel ended");
            ExitCode::SUCCESS
        }
        Ok(End::Signal(sig)) => {
            tracing::info!(signal = %sig, "stopping: killing the vkernel");
            running.sandbox.kill();
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the console loop failed: killing the vkernel");
            running.sandbox.kill();
            ExitCode::FAILURE
        }
    };
    release_owned_net(&running.owned_net);
    if let Some(id) = &running.migration_id {
        state.forget_arrival(id);
    }
    state::remove_vkernel_dir(&dir);
    drop(lock);
    code
}

/// The vkernel ended here (or moved away): remove the devices created for it. Those the
/// source of a move removes itself are gone already, which is fine.
pub(super) fn release_owned_net(owned: &[vkm_common::net::OwnedNet]) {
    for o in owned {
        if let Err(e) = vkm_netconf::remove(&o.tap, o.bridge.as_deref()) {
            tracing::warn!(tap = %o.tap, error = %format!("{:#}", anyhow::Error::from(e)),
                "cannot remove the vkernel's tap; remove it with `ip link del`");
        }
    }
}

/// `TAP` or `TAP@BRIDGE` (the bridge is owned too), as `run` passes them.
fn parse_owned(specs: &[String]) -> Vec<vkm_common::net::OwnedNet> {
    specs
        .iter()
        .map(|s| match s.split_once('@') {
            Some((tap, bridge)) => vkm_common::net::OwnedNet {
                tap: tap.to_owned(),
                bridge: Some(bridge.to_owned()),
            },
            None => vkm_common::net::OwnedNet {
                tap: s.clone(),
                bridge: None,
            },
        })
        .collect()
}

/// Take the lock (stdin) and the status pipe (stdout) as owned, close-on-exec fds, and put
/// /dev/null in their place.
fn take_stdio() -> io::Result<(File, File)> {
    let lock = File::from(io::stdin().as_fd().try_clone_to_owned()?);
    let status = File::from(io::stdout().as_fd().try_clone_to_owned()?);
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in [0, 1] {
        nix::unistd::dup2(null.as_raw_fd(), fd)?;
    }
    Ok((lock, status))
}

/// Close every fd above 2 that we did not open on purpose (whatever the CLI's caller leaked to
/// it without close-on-exec), so that the shim holds nothing it does not know about.
fn close_stray_fds(keep: &[i32]) {
    let Ok(rd) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // `rd` is consumed: its own fd, listed above, is closed by now and fails harmlessly below.
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Our stdin must be the lock of our directory, locked by the CLI that started us (the same
/// open file description, so locking it again succeeds).
fn check_lock(lock: &File, dir: &Path) -> Result<()> {
    if !state::same_file(lock, &dir.join(state::LOCK_FILE)) {
        bail!(
            "The shim's stdin is not the lock of {} (the shim is started by `run` and `restore`)",
            dir.display()
        );
    }
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("The shim does not hold the state lock of its vkernel")
}

/// [`Sandbox::create`] forks: refuse to go on if anything started a thread.
fn check_single_threaded() -> Result<()> {
    let status =
        fs::read_to_string("/proc/self/status").context("Cannot read /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    match threads {
        Some(1) => Ok(()),
        other => bail!("The shim must be single-threaded but has {other:?} threads"),
    }
}

fn open_console(winsize: Option<(u16, u16)>) -> Result<(OwnedFd, OwnedFd, String)> {
    let (rows, cols) = winsize.filter(|&(r, c)| r > 0 && c > 0).unwrap_or((24, 80));
    let ws = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&ws), None).context("Cannot open a pty for the console")?;
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .context("Cannot set FD_CLOEXEC on the pty")?;
    }
    let flags =
        fcntl(pty.master.as_raw_fd(), FcntlArg::F_GETFL).context("Cannot read the pty's flags")?;
    fcntl(
        pty.master.as_raw_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .context("Cannot make the pty master non-blocking")?;
    let tty = nix::unistd::ttyname(&pty.slave)
        .context("Cannot find the name of the console's pty")?
        .to_string_lossy()
        .into_owned();
    Ok((pty.master, pty.slave, tty))
}

/// A console pty for a vkernel that had `saved`: its size and terminal settings again.
pub(super) fn restored_console(
    saved: Option<&vkm_common::model::Console>,
) -> Result<(OwnedFd, OwnedFd, String)> {
    let (master, slave, tty) = open_console(saved.map(|c| (c.rows, c.cols)))?;
    if let Some(c) = saved {
        vkm_sys::calls::tcsets(&slave, &c.termios)
            .context("Cannot apply the saved console settings")?;
        if c.rows > 0 && c.cols > 0 {
            vkm_sys::calls::set_winsize(&slave, c.rows, c.cols)
                .context("Cannot apply the saved console size")?;
        }
    }
    Ok((master, slave, tty))
}

/// After init is forked: the shim itself must not die of SIGPIPE when a console client or the
/// CLI goes away. Blocked (not ignored) so that nothing of it is inherited by what init forks
/// later; a write to a closed socket or pipe then fails with EPIPE.
pub(super) fn block_sigpipe() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    if let Err(e) = set.thread_block() {
        tracing::warn!(error = %e, "cannot block SIGPIPE");
    }
}

fn setup_run(argv: Vec<String>, owned_tap: &[String]) -> Result<Running> {
    let (master, slave, tty) = open_console(None)?;
    // SAFETY: the shim is single-threaded (checked by `check_single_threaded`; it starts no
    // threads), which is what `Sandbox::create` needs to fork init from it.
    let sandbox = unsafe {
        Sandbox::create(
            InitMode::Run {
                argv: argv.clone(),
                console: slave,
            },
            None,
        )
    }
    .context("Cannot create the vkernel's sandbox");
    block_sigpipe();
    let sandbox = sandbox?;
    Ok(Running {
        sandbox,
        master,
        console_tty: tty,
        argv,
        restored_from: None,
        restore: None,
        migration_id: None,
        listener: None,
        owned_net: parse_owned(owned_tap),
    })
}

fn setup_restore(image: PathBuf) -> Result<Running> {
    let t0 = Instant::now();
    let file =
        File::open(&image).with_context(|| format!("Cannot open the image {}", image.display()))?;
    let mut reader = ImageReader::new(BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("Cannot read the image {}", image.display()))?;
    let vk = read_meta(&mut reader)
        .with_context(|| format!("Cannot read the image {}", image.display()))?;
    tracing::info!(image = %image.display(), source = %vk.name, processes = vk.processes.len(), "restoring");
    let (master, slave, tty) = restored_console(vk.console.as_ref())?;
    // SAFETY: the shim is single-threaded (checked by `check_single_threaded`; it starts no
    // threads), which is what `Sandbox::create` needs to fork init from it.
    let sandbox = unsafe { Sandbox::create(InitMode::Restore, Some(vk.clocks)) }
        .context("Cannot create the vkernel's sandbox");
    block_sigpipe();
    let mut sandbox = sandbox?;
    let (report, net) = match vkm_migrate_dst::restore(&mut reader, &vk, &mut sandbox, Some(&slave))
    {
        Ok(r) => r,
        Err(e) => {
            sandbox.kill();
            // The CLI says "Cannot restore vkernel NAME from FILE" above this.
            return Err(e.into());
        }
    };
    sandbox.done();
    // The restored processes hold their own console and tap fds now.
    drop(slave);
    net.announce();
    tracing::info!(
        processes = report.processes,
        threads = report.threads,
        pages = report.pages,
        elapsed_ms = report.elapsed.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        "restored"
    );
    Ok(Running {
        sandbox,
        master,
        console_tty: tty,
        argv: vk.argv.clone(),
        restored_from: Some(image),
        restore: Some(RestoreStats {
            processes: report.processes,
            threads: report.threads,
            pages: report.pages,
            elapsed_us: u64::try_from(report.elapsed.as_micros()).unwrap_or(u64::MAX),
        }),
        migration_id: None,
        listener: None,
        owned_net: vkm_common::net::OwnedNet::of(&vk.net),
    })
}

/// The first frame of an image is its vkernel description.
pub fn read_meta<R: io::Read>(reader: &mut ImageReader<R>) -> Result<Vkernel> {
    match reader.next_frame()? {
        Some(Frame::Meta(bytes)) => {
            Ok(decode_meta::<Vkernel>(&bytes).context("Cannot decode the vkernel description")?)
        }
        Some(_) => bail!("The image does not start with a vkernel description"),
        None => bail!("The image holds no vkernel description"),
    }
}

/// Listen on the console socket and write the record: from here on, commands see the vkernel.
fn finish_setup(dir: &Path, name: &str, running: &Running) -> Result<UnixListener> {
    publish(
        dir,
        Record {
            name: name.to_owned(),
            shim_pid: i32::try_from(std::process::id()).unwrap_or(-1),
            init_pid: running.sandbox.init_pid,
            argv: running.argv.clone(),
            console_tty: running.console_tty.clone(),
            created: 0,
            restored_from: running.restored_from.clone(),
            migration_id: running.migration_id.clone(),
            owned_net: running.owned_net.clone(),
        },
    )
}

/// Bind the console socket and write `record` (its `created` time is set here).
pub(super) fn publish(dir: &Path, mut record: Record) -> Result<UnixListener> {
    let sock = dir.join(CONSOLE_SOCK);
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("Cannot listen on {}", sock.display()))?;
    listener
        .set_nonblocking(true)
        .context("Cannot make the console socket non-blocking")?;
    record.created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    state::write_record(dir, &record)?;
    Ok(listener)
}

pub(super) fn send_reply(status: &mut File, reply: &Reply) {
    let line = match serde_json::to_string(reply) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the status reply");
            return;
        }
    };
    if let Err(e) = status.write_all(format!("{line}\n").as_bytes()) {
        // The CLI went away (e.g. Ctrl-C): the vkernel still runs and shows in `ps`.
        tracing::warn!(error = %e, "cannot send the status reply");
    }
}

fn serve(dir: &Path, master: OwnedFd, listener: UnixListener, init: Pid) -> Result<End> {
    // Blocked only now: init and the vkernel were forked before and keep default masks.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block().context("Cannot block SIGTERM")?;
    let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("Cannot create a signalfd")?;
    let mut server = Server::new(dir, master, listener);
    let end = server.run(init, &sigfd)?;
    if let End::InitExited(WaitStatus::Exited(_, code)) = end {
        tracing::info!(code, "init exited");
    }
    Ok(end)
}
