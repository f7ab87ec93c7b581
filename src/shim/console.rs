//! The shim's event loop: console pty ⇄ `console.log` + attached clients, and init's exit.
//!
//! One thread, one `poll(2)` over: the SIGTERM signalfd, the listening `console.sock`, the pty
//! master, and every client; with a 100 ms timeout after which init is checked with
//! `waitpid(WNOHANG)` (also after every wake-up). All fds are non-blocking and every buffer is
//! capped: a client that cannot keep up with the output is disconnected, and clients are not
//! read while the input queue to the pty is full.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::console_proto::{self as proto, Frame};
use crate::state::CONSOLE_LOG;

/// Recent output kept in memory for clients that attach.
const RECENT_CAP: usize = 64 << 10;
/// Output queued for one client before it is disconnected as too slow.
const CLIENT_OUT_CAP: usize = 4 << 20;
/// Input queued for the pty before clients stop being read.
const TO_MASTER_CAP: usize = 64 << 10;
/// `console.log` is rotated (to `console.log.1`) when it would grow past this.
pub const LOG_CAP: u64 = 8 << 20;
const MAX_CLIENTS: usize = 32;
const TICK: Duration = Duration::from_millis(100);
const READ_CHUNK: usize = 64 << 10;

pub enum End {
    InitExited(WaitStatus),
    Signal(Signal),
}

struct Client {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: VecDeque<u8>,
    hello: bool,
    read_eof: bool,
    dead: bool,
}

pub struct Server {
    master: File,
    /// No slave is open (reads fail with EIO): the pty is retried every tick instead of polled.
    master_hup: bool,
    last_retry: Instant,
    listener: UnixListener,
    clients: Vec<Client>,
    log: ConsoleLog,
    recent: VecDeque<u8>,
    to_master: VecDeque<u8>,
}

impl Server {
    pub fn new(dir: &Path, master: OwnedFd, listener: UnixListener) -> Server {
        Server {
            master: File::from(master),
            master_hup: false,
            last_retry: Instant::now(),
            listener,
            clients: Vec::new(),
            log: ConsoleLog::new(dir.join(CONSOLE_LOG)),
            recent: VecDeque::new(),
            to_master: VecDeque::new(),
        }
    }

    pub fn run(&mut self, init: Pid, sigfd: &SignalFd) -> Result<End> {
        loop {
            if let Some(sig) = self.poll_once(sigfd)? {
                return Ok(End::Signal(sig));
            }
            if self.master_hup && self.last_retry.elapsed() >= TICK {
                self.last_retry = Instant::now();
                self.read_master();
            }
            match waitpid(init, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(ws @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.finish();
                    return Ok(End::InitExited(ws));
                }
                Ok(other) => tracing::debug!(status = ?other, "init changed state"),
                Err(e) => return Err(e).context("Cannot wait for the vkernel's init"),
            }
        }
    }

    /// One poll and the work it found; `Some(signal)` when asked to stop.
    fn poll_once(&mut self, sigfd: &SignalFd) -> Result<Option<Signal>> {
        let want_input = self.to_master.len() < TO_MASTER_CAP;
        let (sig_ev, lis_ev, master_ev, client_ev) = {
            let mut fds = Vec::with_capacity(3 + self.clients.len());
            fds.push(PollFd::new(sigfd.as_fd(), PollFlags::POLLIN));
            fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            let master_idx = if self.master_hup {
                None
            } else {
                let mut f = PollFlags::POLLIN;
                if !self.to_master.is_empty() {
                    f |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(self.master.as_fd(), f));
                Some(fds.len() - 1)
            };
            let first_client = fds.len();
            for c in &self.clients {
                let mut f = PollFlags::empty();
                if want_input && !c.read_eof {
                    f |= PollFlags::POLLIN;
                }
                if !c.out.is_empty() {
                    f |= PollFlags::POLLOUT;
                }
                // With no events asked, POLLHUP/POLLERR still tell us when it is gone.
                fds.push(PollFd::new(c.stream.as_fd(), f));
            }
            match poll(&mut fds, PollTimeout::from(100u8)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll failed in the shim"),
            }
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .unwrap_or(PollFlags::empty())
            };
            (
                ev(0),
                ev(1),
                master_idx.map(ev).unwrap_or(PollFlags::empty()),
                (first_client..fds.len()).map(ev).collect::<Vec<_>>(),
            )
        };
        if !sig_ev.is_empty() {
            match sigfd.read_signal() {
                Ok(Some(info)) => {
                    let sig = i32::try_from(info.ssi_signo)
                        .ok()
                        .and_then(|s| Signal::try_from(s).ok())
                        .unwrap_or(Signal::SIGTERM);
                    return Ok(Some(sig));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the signalfd"),
            }
        }
        let readable = PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR;
        if master_ev.intersects(readable) {
            self.read_master();
        }
        if master_ev.contains(PollFlags::POLLOUT) {
            self.write_master();
        }
        for (c, ev) in self.clients.iter_mut().zip(client_ev) {
            if ev.intersects(readable) && !c.read_eof {
                c.read(&mut self.to_master, &self.recent, &self.master);
            } else if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                c.dead = true;
            }
            if ev.contains(PollFlags::POLLOUT) && !c.dead {
                c.flush();
            }
        }
        // Input that clients just queued: try right away rather than on the next poll.
        if !self.to_master.is_empty() && !self.master_hup {
            self.write_master();
        }
        self.clients.retain(|c| !c.dead);
        if lis_ev.contains(PollFlags::POLLIN) {
            self.accept();
        }
        Ok(None)
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        tracing::warn!("too many console clients; refusing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "cannot make a console client non-blocking");
                        continue;
                    }
                    tracing::debug!("console client attached");
                    self.clients.push(Client {
                        stream,
                        inbuf: Vec::new(),
                        out: VecDeque::new(),
                        hello: false,
                        read_eof: false,
                        dead: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a console client");
                    return;
                }
            }
        }
    }

    /// Read what the vkernel printed (a bounded amount per call, for fairness).
    fn read_master(&mut self) {
        let mut buf = vec![0u8; READ_CHUNK];
        for _ in 0..4 {
            match self.master.read(&mut buf) {
                Ok(0) => {
                    self.set_hup(true);
                    return;
                }
                Ok(n) => {
                    self.set_hup(false);
                    self.output(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.set_hup(false);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EIO: no process has the console open (any more).
                Err(e) => {
                    if !self.master_hup {
                        tracing::debug!(error = %e, "console pty hung up");
                    }
                    self.set_hup(true);
                    return;
                }
            }
        }
    }

    fn set_hup(&mut self, hup: bool) {
        if hup && !self.master_hup {
            self.last_retry = Instant::now();
        }
        self.master_hup = hup;
    }

    fn write_master(&mut self) {
        while !self.to_master.is_empty() {
            let (a, _) = self.to_master.as_slices();
            match self.master.write(a) {
                Ok(n) => {
                    self.to_master.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, bytes = self.to_master.len(), "console input dropped");
                    self.to_master.clear();
                    return;
                }
            }
        }
    }

    fn output(&mut self, data: &[u8]) {
        self.log.append(data);
        self.recent.extend(data);
        let excess = self.recent.len().saturating_sub(RECENT_CAP);
        self.recent.drain(..excess);
        for c in self.clients.iter_mut().filter(|c| c.hello && !c.dead) {
            if c.out.len() + data.len() > CLIENT_OUT_CAP {
                tracing::warn!(
                    "a console client does not keep up with the output; disconnecting it"
                );
                c.dead = true;
                continue;
            }
            c.out.extend(data);
            c.flush();
        }
    }

    /// Init is gone: take the last output and hand it to the clients (briefly blocking).
    fn finish(&mut self) {
        for _ in 0..64 {
            let before = self.log.written;
            self.read_master();
            if self.master_hup || self.log.written == before {
                break;
            }
        }
        for c in self.clients.iter_mut().filter(|c| !c.dead) {
            let (a, b) = c.out.as_slices();
            let data = [a, b].concat();
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = c.stream.write_all(&data);
        }
        self.clients.clear();
    }
}

impl Client {
    fn read(&mut self, to_master: &mut VecDeque<u8>, recent: &VecDeque<u8>, master: &File) {
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => self.read_eof = true,
            Ok(n) => {
                self.inbuf.extend_from_slice(&buf[..n]);
                self.handle_frames(to_master, recent, master);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::debug!(error = %e, "console client read failed");
                self.dead = true;
            }
        }
    }

    fn handle_frames(
        &mut self,
        to_master: &mut VecDeque<u8>,
        recent: &VecDeque<u8>,
        master: &File,
    ) {
        loop {
            match proto::decode(&mut self.inbuf) {
                Ok(None) => return,
                Ok(Some(Frame::Hello { send_log })) => {
                    self.hello = true;
                    if send_log {
                        self.out.extend(recent);
                    }
                }
                Ok(Some(_)) if !self.hello => {
                    tracing::warn!("console client did not say hello first; disconnecting it");
                    self.dead = true;
                    return;
                }
                Ok(Some(Frame::Data(d))) => to_master.extend(d),
                Ok(Some(Frame::Winsize { rows, cols })) => {
                    if let Err(e) = vkm_sys::calls::set_winsize(master, rows, cols) {
                        tracing::debug!(error = %e, "cannot set the console size");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad console client; disconnecting it");
                    self.dead = true;
                    return;
                }
            }
        }
    }

    fn flush(&mut self) {
        while !self.out.is_empty() {
            let (a, _) = self.out.as_slices();
            match self.stream.write(a) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(error = %e, "console client went away");
                    self.dead = true;
                    return;
                }
            }
        }
    }
}

/// `console.log`, appended, rotated once to `console.log.1` at [`LOG_CAP`].
struct ConsoleLog {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    written: u64,
    failed: bool,
}

impl ConsoleLog {
    fn new(path: PathBuf) -> ConsoleLog {
        ConsoleLog {
            path,
            file: None,
            size: 0,
            written: 0,
            failed: false,
        }
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("console log not open"))
    }

    fn append(&mut self, data: &[u8]) {
        self.written += data.len() as u64;
        if self.failed {
            return;
        }
        if let Err(e) = self.try_append(data) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the console log; no longer logging");
            self.failed = true;
            self.file = None;
        }
    }

    fn try_append(&mut self, data: &[u8]) -> io::Result<()> {
        self.open()?;
        if self.size > 0 && self.size + data.len() as u64 > LOG_CAP {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            fs::rename(&self.path, &old)?;
            self.file = None;
            self.open()?;
        }
        let f = self.open()?;
        f.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_log_rotates_once() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join(CONSOLE_LOG);
        let mut log = ConsoleLog::new(path.clone());
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            log.append(&chunk);
        }
        let cur = fs::metadata(&path)?.len();
        let old = fs::metadata(tmp.path().join("console.log.1"))?.len();
        assert!(cur <= LOG_CAP && old <= LOG_CAP, "{cur} {old}");
        assert_eq!(
            cur + old,
            12 << 20,
            "20 MiB written, 8 MiB dropped with the first rotation"
        );
        Ok(())
    }
}
