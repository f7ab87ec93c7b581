//! `vkmigrate console`: a client of the shim's `console.sock` (see [`crate::console_proto`]).

use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};

use crate::cli::ConsoleArgs;
use crate::console_proto::{self as proto, HELLO_SEND_LOG, KIND_DATA, KIND_HELLO, KIND_WINSIZE};
use crate::state::{StateDir, CONSOLE_SOCK};

/// Ctrl-]: detaches when stdin is a terminal.
const DETACH_KEY: u8 = 0x1d;
/// With a stdin that is not a terminal: how long output is still relayed after its end.
const LINGER: Duration = Duration::from_secs(1);

enum Outcome {
    Detached,
    /// The shim closed the connection: the vkernel ended.
    Closed,
    InputDone,
}

pub fn console(state: &StateDir, args: ConsoleArgs) -> Result<()> {
    let rec = state.alive(&args.name)?;
    let sock = state.dir(&rec.name).join(CONSOLE_SOCK);
    let mut stream = UnixStream::connect(&sock).with_context(|| {
        format!(
            "Cannot connect to the console of vkernel {} at {}",
            rec.name,
            sock.display()
        )
    })?;
    let stdin = io::stdin();
    let tty = stdin.is_terminal();

    let mut hello = Vec::new();
    let flags = if args.no_attach_log {
        0
    } else {
        HELLO_SEND_LOG
    };
    proto::encode(KIND_HELLO, &[flags], &mut hello);
    if tty {
        if let Ok((rows, cols)) = vkm_sys::calls::get_winsize(&stdin) {
            if rows > 0 && cols > 0 {
                proto::encode(
                    KIND_WINSIZE,
                    &proto::winsize_payload(rows, cols),
                    &mut hello,
                );
            }
        }
    }
    stream
        .write_all(&hello)
        .context("Cannot talk to the shim")?;

    let outcome = if tty {
        eprintln!(
            "Attached to the console of {}; detach with Ctrl-]",
            rec.name
        );
        let raw = RawMode::enter().context("Cannot put the terminal in raw mode")?;
        let r = relay(&mut stream, true);
        drop(raw);
        r?
    } else {
        relay(&mut stream, false)?
    };
    match outcome {
        Outcome::Detached => eprintln!("\nDetached from {}", rec.name),
        Outcome::Closed => eprintln!("\nThe console of {} closed (the vkernel ended)", rec.name),
        Outcome::InputDone => {}
    }
    Ok(())
}

fn relay(stream: &mut UnixStream, tty: bool) -> Result<Outcome> {
    let stdin = io::stdin();
    let mut stdout = io::stdout().lock();
    let mut stdin_open = true;
    let mut linger_until: Option<Instant> = None;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let timeout = match linger_until {
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Outcome::InputDone);
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let (sock_ev, in_ev) = {
            let mut fds = vec![PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
            if stdin_open {
                fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll failed"),
            }
            let ev = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .unwrap_or(PollFlags::empty())
            };
            (ev(0), ev(1))
        };
        if !sock_ev.is_empty() {
            match stream.read(&mut buf) {
                Ok(0) => return Ok(Outcome::Closed),
                Ok(n) => match stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
                    Ok(()) => {}
                    // Whoever reads our output has had enough (`| head`): a normal end.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                        return Ok(Outcome::InputDone)
                    }
                    Err(e) => return Err(e).context("Cannot write to stdout"),
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("Cannot read from the console"),
            }
        }
        if !in_ev.is_empty() {
            let n = match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(n) => n,
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                // EIO on a hung-up terminal, EBADF on a closed stdin: the same as its end.
                Err(_) => 0,
            };
            if n == 0 {
                if tty {
                    return Ok(Outcome::InputDone);
                }
                stdin_open = false;
                linger_until = Some(Instant::now() + LINGER);
                continue;
            }
            let data = &buf[..n];
            let (data, detach) = match data.iter().position(|&b| b == DETACH_KEY) {
                Some(i) if tty => (&data[..i], true),
                _ => (data, false),
            };
            if !data.is_empty() {
                let mut frames = Vec::with_capacity(data.len() + 16);
                proto::encode(KIND_DATA, data, &mut frames);
                stream
                    .write_all(&frames)
                    .context("Cannot write to the console")?;
            }
            if detach {
                return Ok(Outcome::Detached);
            }
        }
    }
}

/// Raw mode on stdin for as long as it lives.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(io::stdin(), SetArg::TCSAFLUSH, &self.saved) {
            eprintln!("vkmigrate: cannot restore the terminal settings: {e}");
        }
    }
}
