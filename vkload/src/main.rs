//! vkload: a self-checking test "vkernel" for checkpoint/restore and live migration.
//!
//! A process tree that holds many kinds of kernel state (threads with TLS and live vector
//! registers, private and shared memory, a memfd mapped twice, pipes and a socketpair with
//! data in flight, an eventfd, an interval timer, a POSIX timer, signal handlers on an
//! alternate stack, forked children in their own process group, a regular file with an
//! offset) and checks all of it continuously. After a restore it must carry on where it was:
//! counters continue, checks keep passing. Any inconsistency prints `vkload FAIL: <reason>` on
//! stderr and stdout and exits with status 1. SIGTERM prints `vkload exit` and exits 0.
//! Usage errors exit 2.
//!
//! ```text
//! vkload [--mem MIB] [--threads N] [--children N] [--ram-file-mib M] [--dirty-mbps R]
//!        [--without FEAT[,FEAT...]] [--tick-ms MS] [--net TAP,IP/PREFIX[,MAC]] [--helper]
//! FEAT: threads memfd pipe socketpair itimer posix-timer signals children eventfd file window
//! ```
//!
//! Every tick the main thread prints exactly one line on stdout, with a single write(2):
//!
//! ```text
//! vkload tick=<n> pid=<getpid> mono_ms=<CLOCK_MONOTONIC ms> tls=<c0,c1,...> pipe=<records>
//!   sock=<records> alrm=<SIGALRM count> ptimer=<POSIX timer signals> usr2=<SIGUSR2 count>
//!   mem=<pages verified> child=<sum of child counters> file=<bytes>
//!   [net_rx=<frames read> net_tx=<frames sent> net_arp=<ARP replies> net_icmp=<echo replies>]
//!   maxgap_ms=<n> ok
//! ```
//!
//! (one line, single spaces, keys in this order). `tick` starts at 1 and grows by exactly 1
//! per line. `tls` lists the per-worker TLS counters (`0` without workers). Disabled features
//! print 0, except that the `net_*` keys appear only with `--net`, so that the line without
//! it stays as it was. `maxgap_ms` is the largest gap between two consecutive ticks seen so far: vkload
//! never fails on gaps (a stopped or frozen process sees them); tests decide. Counters that
//! must keep moving fail only after 3 s of CLOCK_MONOTONIC *and* enough ticks without
//! progress, so SIGSTOP/SIGCONT or a freeze does not trip them.
//!
//! `--without threads` makes vkload single-threaded: the main thread then drives the pipe,
//! socketpair, eventfd, memory writer and SIGUSR2 itself once per tick. With threads, the
//! asynchronous signals are blocked in every thread but the main one.
//!
//! `--net TAP,IP/PREFIX[,MAC]` attaches to the existing tap TAP and answers ARP and ICMP echo
//! for IP (see `net.rs`); it first prints `vkload net tap=<TAP> ip=<IP/PREFIX> mac=<MAC>
//! fd=<tun fd>`. A thread sleeps in poll on the tap, or without threads the main thread
//! drains it once per tick.

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("vkload supports x86_64 Linux only");

mod args;
mod chan;
mod check;
mod children;
mod datafile;
mod helper;
mod mem;
mod net;
mod pattern;
mod ramfile;
mod signals;
mod sys;
mod workers;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use args::{Config, Feature, Parsed};
use chan::{InlineEventfd, Rx, Tx, PIPE_RECV, SOCK_RECV, STREAM_PIPE, STREAM_SOCK};
use check::{fail, OrFail, Stall};

fn main() {
    let argv: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match args::parse(&argv) {
        Ok(Parsed::Help) => print!("{}", args::USAGE),
        Ok(Parsed::Run(cfg)) => run(&cfg),
        Err(e) => {
            eprint!("vkload: {e}\n{}", args::USAGE);
            std::process::exit(2);
        }
    }
}

/// What the main thread drives itself in single-threaded mode.
#[derive(Default)]
struct Inline {
    mem_writer: Option<mem::Writer>,
    pipe: Option<(Tx, Rx)>,
    sock: Option<(Tx, Rx)>,
    eventfd: Option<InlineEventfd>,
    usr2: bool,
}

fn socketpair(nonblock: bool) -> (File, File) {
    let (a, b) = UnixStream::pair().or_fail("socketpair");
    a.set_nonblocking(nonblock).or_fail("socketpair");
    b.set_nonblocking(nonblock).or_fail("socketpair");
    (File::from(OwnedFd::from(a)), File::from(OwnedFd::from(b)))
}

fn run(cfg: &Config) -> ! {
    let pid = std::process::id();
    let start_ms = sys::mono_ns() / 1_000_000;

    // The RAM file and the children's counter slots must exist before the fork so that the
    // children share them; the big private region is made after it so they do not.
    let mut ram = cfg.has(Feature::Memfd).then(|| {
        ramfile::RamFile::create(cfg.ram_file_mib, cfg.tick_ms, cfg.has(Feature::Window))
            .or_fail("creating the RAM file")
    });
    let mut children = (cfg.child_count() > 0).then(|| {
        let (a, b) = match &ram {
            Some(r) => r.control_pages(),
            None => {
                let p = sys::map_shared_anon(pattern::PAGE_SIZE).or_fail("child slots");
                (p, p)
            }
        };
        children::Children::spawn(cfg.child_count(), a, b, start_ms, cfg.tick_ms)
    });
    let child_pids = children.as_ref().map(|c| c.pids()).unwrap_or_default();
    let region = (cfg.mem_mib > 0)
        .then(|| mem::Region::new(cfg.mem_mib).or_fail("mapping the memory region"));
    let mut verifier = region.map(|r| mem::Verifier::new(r, cfg.tick_ms, cfg.verify_s));
    let mut heap = mem::Heap::new();
    let mut data_file = cfg
        .has(Feature::File)
        .then(|| datafile::DataFile::open(pid).or_fail("opening the data file"));
    signals::install(cfg).or_fail("signal setup");
    // After the fork, so that the children do not share the tun descriptor.
    let mut tap = cfg.net.as_ref().map(net::Responder::open);

    let mut inline = Inline::default();
    let mut tls: &'static [AtomicU64] = &[];
    let writer = region.map(|r| mem::Writer::new(r, cfg.dirty_mbps, cfg.tick_ms, start_ms));
    if cfg.has(Feature::Threads) {
        let mask = signals::main_thread_signals();
        // Threads inherit the mask, so they never run with these signals unblocked.
        sys::sigmask(libc::SIG_BLOCK, &mask);
        tls = workers::spawn_tls_workers(cfg.threads);
        if let Some(w) = writer {
            workers::spawn_mem_writer(w);
        }
        if cfg.has(Feature::Pipe) {
            let (r, w) = sys::pipe(false).or_fail("pipe");
            let (tx, rx) = (Tx::new(w, STREAM_PIPE), Rx::new(r, STREAM_PIPE));
            chan::spawn_stream("pipe", tx, rx, &PIPE_RECV);
        }
        if cfg.has(Feature::Socketpair) {
            let (a, b) = socketpair(false);
            let (tx, rx) = (Tx::new(a, STREAM_SOCK), Rx::new(b, STREAM_SOCK));
            chan::spawn_stream("sock", tx, rx, &SOCK_RECV);
        }
        if cfg.has(Feature::Eventfd) {
            chan::spawn_eventfd(sys::eventfd(false).or_fail("eventfd"));
        }
        if cfg.has(Feature::Signals) {
            workers::spawn_usr2_sender();
        }
        if cfg.helper {
            helper::spawn();
        }
        if let Some(t) = tap.take() {
            t.spawn();
        }
        sys::sigmask(libc::SIG_UNBLOCK, &mask);
    } else {
        inline.mem_writer = writer;
        if cfg.has(Feature::Pipe) {
            let (r, w) = sys::pipe(true).or_fail("pipe");
            inline.pipe = Some((Tx::new(w, STREAM_PIPE), Rx::new(r, STREAM_PIPE)));
        }
        if cfg.has(Feature::Socketpair) {
            let (a, b) = socketpair(true);
            inline.sock = Some((Tx::new(a, STREAM_SOCK), Rx::new(b, STREAM_SOCK)));
        }
        if cfg.has(Feature::Eventfd) {
            let efd = sys::eventfd(true).or_fail("eventfd");
            inline.eventfd = Some(InlineEventfd::new(efd));
        }
        inline.usr2 = cfg.has(Feature::Signals);
    }

    // Everything that must keep moving, with where to read it.
    let mut stalls: Vec<(Stall, Box<dyn Fn() -> u64>)> = Vec::new();
    let mut watch = |what: String, f: Box<dyn Fn() -> u64>| {
        stalls.push((Stall::new(what, start_ms, cfg.tick_ms), f));
    };
    let load = |a: &'static AtomicU64| -> Box<dyn Fn() -> u64> {
        Box::new(move || a.load(Ordering::Relaxed))
    };
    for (i, c) in tls.iter().enumerate() {
        watch(format!("TLS worker {i}"), load(c));
    }
    for (feat, what, counter) in [
        (Feature::Itimer, "SIGALRM count", &signals::ALRM),
        (
            Feature::PosixTimer,
            "POSIX timer signal count",
            &signals::PTIMER,
        ),
        (Feature::Signals, "SIGUSR2 count", &signals::USR2),
        (Feature::Pipe, "pipe records", &PIPE_RECV),
        (Feature::Socketpair, "socketpair records", &SOCK_RECV),
        (Feature::Eventfd, "eventfd total", &chan::EFD_READ),
    ] {
        if cfg.has(feat) {
            watch(what.to_string(), load(counter));
        }
    }
    if region.is_some() {
        watch("memory writer".to_string(), load(&mem::WRITTEN));
    }

    let tick_ns = cfg.tick_ms * 1_000_000;
    let mut prev_ns = sys::mono_ns();
    let mut next_ns = prev_ns + tick_ns;
    let mut max_gap_ms = 0;
    let mut tick: u64 = 0;
    loop {
        loop {
            if signals::TERM.load(Ordering::Relaxed) {
                let _ = sys::write_all_fd(1, b"vkload exit\n");
                check::kill_children(&child_pids);
                sys::exit_now(0);
            }
            if sys::sleep_until(next_ns) {
                break;
            }
        }
        let now_ns = sys::mono_ns();
        if now_ns < prev_ns {
            fail(format_args!(
                "CLOCK_MONOTONIC went backwards from {prev_ns} ns to {now_ns} ns"
            ));
        }
        max_gap_ms = max_gap_ms.max((now_ns - prev_ns) / 1_000_000);
        prev_ns = now_ns;
        // After a stop, resume the rhythm from now instead of printing the missed ticks.
        next_ns += tick_ns;
        if next_ns <= now_ns {
            next_ns = now_ns + tick_ns;
        }
        tick += 1;
        let now_ms = now_ns / 1_000_000;

        if let Some(msg) = signals::handler_failure() {
            fail(msg);
        }
        if let Some(w) = &mut inline.mem_writer {
            w.step(now_ms);
        }
        if let Some((tx, rx)) = &mut inline.pipe {
            chan::inline_stream(tx, rx, &PIPE_RECV).or_fail_as_is();
        }
        if let Some((tx, rx)) = &mut inline.sock {
            chan::inline_stream(tx, rx, &SOCK_RECV).or_fail_as_is();
        }
        if let Some(e) = &mut inline.eventfd {
            e.tick().or_fail_as_is();
        }
        if inline.usr2 {
            sys::kill(pid as libc::pid_t, libc::SIGUSR2).or_fail("kill SIGUSR2");
        }
        if let Some(t) = &mut tap {
            t.tick();
        }
        if let Some(v) = &mut verifier {
            v.tick().or_fail_as_is();
        }
        heap.tick().or_fail_as_is();
        if let Some(r) = &mut ram {
            r.tick().or_fail_as_is();
        }
        let child_sum = match &mut children {
            Some(c) => c.tick(now_ms).or_fail_as_is(),
            None => 0,
        };
        if let Some(f) = &mut data_file {
            f.tick(tick).or_fail_as_is();
        }
        for (stall, value) in &mut stalls {
            stall.observe(value(), now_ms).or_fail_as_is();
        }

        let tls_list = if tls.is_empty() {
            "0".to_string()
        } else {
            let v: Vec<String> = tls
                .iter()
                .map(|c| c.load(Ordering::Relaxed).to_string())
                .collect();
            v.join(",")
        };
        let net_fields = if cfg.net.is_some() {
            net::tick_fields()
        } else {
            String::new()
        };
        let line = format!(
            "vkload tick={tick} pid={pid} mono_ms={now_ms} tls={tls_list} pipe={} sock={} \
             alrm={} ptimer={} usr2={} mem={} child={child_sum} file={} {net_fields}\
             maxgap_ms={max_gap_ms} ok\n",
            PIPE_RECV.load(Ordering::Relaxed),
            SOCK_RECV.load(Ordering::Relaxed),
            signals::ALRM.load(Ordering::Relaxed),
            signals::PTIMER.load(Ordering::Relaxed),
            signals::USR2.load(Ordering::Relaxed),
            verifier.as_ref().map_or(0, |v| v.verified),
            data_file.as_ref().map_or(0, |f| f.bytes()),
        );
        // Nobody reading stdout any more is not a self-check failure.
        let _ = sys::write_all_fd(1, line.as_bytes());
    }
}
