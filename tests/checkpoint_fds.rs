//! End-to-end: fd kinds beyond vkload's, each in a small Python program that sets the resource
//! up, checks it continuously, prints `ok N ...` once per round and `FAIL ...` (then exits) on
//! any inconsistency. Each test runs it under `vkmigrate run`, checkpoints it to a file,
//! restores it, and wants the rounds to go on where they were, with no FAIL.

mod common;

use std::time::Duration;

use common::{ok_counter, Lab};

const LONG: Duration = Duration::from_secs(30);
/// Rounds that must pass after the restore.
const MORE: u64 = 25;

/// What a checkpoint/restore of one program showed.
struct Run {
    /// Kept for its Drop: the restored vkernel runs until the test ends.
    _lab: Lab,
    /// The last `ok` line before the checkpoint, and the console after the restore.
    before: String,
    after: String,
}

/// Run `prog` with `args` as vkernel `name`, wait for `warmup` rounds, checkpoint, restore, and
/// check that the rounds continue (not reset, none skipped but for the few the console may
/// have lost at the freeze) for [`MORE`] rounds without a FAIL.
fn checkpoint_and_restore(name: &str, prog: &str, args: &[&str], warmup: u64) -> Run {
    let mut lab = Lab::new();
    let py = common::python3();
    let mut cmd = vec![py.as_str(), "-c", prog];
    cmd.extend_from_slice(args);
    lab.run(name, &cmd);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= warmup));
    let (img, before) = lab.checkpoint_tailed(name);
    let last = ok_counter(&before).unwrap_or(0);
    lab.restore(&img, name);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= last + MORE));
    let after = lab.console_log(name);
    let first = after
        .lines()
        .find_map(ok_counter)
        .expect("rounds after the restore");
    assert!(
        first > last && first <= last + 3,
        "round {last} before the checkpoint, {first} after; console:\n{after}"
    );
    Run {
        _lab: lab,
        before,
        after,
    }
}

/// Fields after `ok N` as numbers.
fn fields(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// A socketpair with records in flight both ways (five queued on each end at any time);
/// each reader checks sequence numbers and checksums. argv[1]: stream, dgram or seqpacket.
const SOCKETPAIR: &str = r#"
import socket, struct, sys, time
kind = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM,
        "seqpacket": socket.SOCK_SEQPACKET}[sys.argv[1]]
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
ends = socket.socketpair(socket.AF_UNIX, kind)
sent, got, buf = [0, 0], [0, 0], [b"", b""]
REC = 16
def send(i):
    n = sent[i]
    ends[i].send(struct.pack("<QQ", n, n * 7919 % 1000003 + i))
    sent[i] += 1
def recv(i):
    # One record arriving at end i, sent by the other end.
    if kind == socket.SOCK_STREAM:
        while len(buf[i]) < REC:
            buf[i] += ends[i].recv(REC - len(buf[i]))
        rec, buf[i] = buf[i][:REC], buf[i][REC:]
    else:
        rec = ends[i].recv(4096)
        if len(rec) != REC:
            fail("message of", len(rec), "bytes")
    n, chk = struct.unpack("<QQ", rec)
    if n != got[i] or chk != n * 7919 % 1000003 + (1 - i):
        fail("end", i, "expected record", got[i], "got", n, chk)
    got[i] += 1
for _ in range(5):
    send(0); send(1)
t = 0
while True:
    send(0); send(1)
    recv(1); recv(0)
    t += 1
    print("ok", t, got[0], got[1], flush=True)
    time.sleep(0.02)
"#;

fn socketpair_case(kind: &str) {
    let r = checkpoint_and_restore(&format!("sp-{kind}"), SOCKETPAIR, &[kind], 10);
    let b = fields(&r.before);
    let a = r
        .after
        .lines()
        .find(|l| ok_counter(l).is_some())
        .map(fields);
    let a = a.expect("a round after the restore");
    // Records received go on from where they were on both ends (none lost, none repeated:
    // the program checks the sequence itself).
    assert!(a[1] > b[1] && a[2] > b[2], "before {b:?}, after {a:?}");
}

#[test]
fn socketpair_stream_with_data_in_flight() {
    socketpair_case("stream");
}

#[test]
fn socketpair_dgram_with_data_in_flight() {
    socketpair_case("dgram");
}

#[test]
fn socketpair_seqpacket_with_data_in_flight() {
    socketpair_case("seqpacket");
}

/// An epoll over a pipe (level-triggered, with a backlog), an eventfd (edge-triggered) and
/// the pipe's write end (one-shot, re-armed with EPOLL_CTL_MOD every 10 rounds, which finds
/// the item only under its original fd number), and an idle eventfd added with EPOLLEXCLUSIVE;
/// 64-bit `data` values are checked bit-exactly, in what epoll_wait returns and in fdinfo.
const EPOLL: &str = r#"
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class Ev(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]
EPOLLIN, EPOLLOUT, EPOLLET, EPOLLONESHOT = 1, 4, 1 << 31, 1 << 30
ADD, MOD = 1, 3
DR, DE, DW = 0xdeadbeef00000001, 0xfeedfacecafe0002, 0x123456789abcdef0
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
def ctl(ep, op, fd, events, data):
    ev = Ev(events, data)
    if libc.epoll_ctl(ep, op, fd, ctypes.byref(ev)) != 0:
        fail("epoll_ctl", op, fd, os.strerror(ctypes.get_errno()))
r, w = os.pipe()
os.set_blocking(r, False)
efd = os.eventfd(0, os.EFD_NONBLOCK)
ep = libc.epoll_create1(os.O_CLOEXEC)
ctl(ep, ADD, r, EPOLLIN, DR)
ctl(ep, ADD, efd, EPOLLIN | EPOLLET, DE)
ctl(ep, ADD, w, EPOLLOUT | EPOLLONESHOT, DW)
EPOLLEXCLUSIVE, DX = 1 << 28, 0x8000000000000003
xfd = os.eventfd(0, os.EFD_NONBLOCK)
ctl(ep, ADD, xfd, EPOLLIN | EPOLLEXCLUSIVE, DX)
def items():
    out = {}
    for l in open("/proc/self/fdinfo/%d" % ep).read().splitlines():
        if l.startswith("tfd:"):
            f = l.split()
            out[int(f[1])] = (int(f[3], 16), int(f[5], 16))
    return out
evs = (Ev * 8)()
seq_w = seq_r = 0
for _ in range(3):
    os.write(w, bytes([seq_w & 0xff])); seq_w += 1
expect_w = True
n = 0
while True:
    n += 1
    os.write(w, bytes([seq_w & 0xff])); seq_w += 1
    os.eventfd_write(efd, 1)
    if n % 10 == 0:
        ctl(ep, MOD, w, EPOLLOUT | EPOLLONESHOT, DW)
        expect_w = True
    k = libc.epoll_wait(ep, evs, 8, 2000)
    got = {evs[i].data: evs[i].events for i in range(k)}
    if set(got) - {DR, DE, DW}:
        fail("unknown data", [hex(d) for d in got])
    if not got.get(DR, 0) & EPOLLIN:
        fail("pipe not reported", got)
    if not got.get(DE, 0) & EPOLLIN:
        fail("eventfd not reported", got)
    if (DW in got) != expect_w:
        fail("one-shot item: expected", expect_w, "got", got)
    expect_w = False
    it = items()
    if it.get(xfd) != (EPOLLIN | EPOLLEXCLUSIVE | 0x18, DX):
        fail("exclusive item", it.get(xfd))
    if it.get(r, (0, 0))[1] != DR or it.get(efd, (0, 0))[1] != DE or it.get(w, (0, 0))[1] != DW:
        fail("items", it)
    b = os.read(r, 1)
    if b != bytes([seq_r & 0xff]):
        fail("pipe byte", b, "expected", seq_r & 0xff)
    seq_r += 1
    if os.eventfd_read(efd) < 1:
        fail("eventfd count")
    print("ok", n, flush=True)
    time.sleep(0.02)
"#;

#[test]
fn epoll_registrations_survive() {
    checkpoint_and_restore("epoll", EPOLL, &[], 12);
}

/// A signalfd for SIGUSR1 and SIGALRM (both blocked): SIGALRM from an interval timer, SIGUSR1
/// sent to itself every round; it also checks its own fdinfo (mask) and O_NONBLOCK.
const SIGNALFD: &str = r#"
import ctypes, fcntl, os, select, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGALRM})
mask = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGALRM - 1))
sigset = ctypes.create_string_buffer(struct.pack("<Q", mask) + bytes(120))
fd = libc.signalfd(-1, sigset, os.O_NONBLOCK | os.O_CLOEXEC)
if fd < 0:
    fail("signalfd", os.strerror(ctypes.get_errno()))
signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
usr1 = alrm = n = 0
while True:
    n += 1
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 5
    got_usr1 = False
    while not got_usr1:
        if time.monotonic() > deadline:
            fail("no SIGUSR1 through the signalfd")
        select.select([fd], [], [], 1.0)
        try:
            d = os.read(fd, 128 * 8)
        except BlockingIOError:
            continue
        for off in range(0, len(d), 128):
            signo = struct.unpack_from("<I", d, off)[0]
            if signo == signal.SIGUSR1:
                usr1 += 1; got_usr1 = True
            elif signo == signal.SIGALRM:
                alrm += 1
            else:
                fail("unexpected signal", signo)
    info = open("/proc/self/fdinfo/%d" % fd).read()
    line = [l for l in info.splitlines() if l.startswith("sigmask:")]
    if not line or int(line[0].split()[1], 16) != mask:
        fail("signalfd mask", line)
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
        fail("signalfd lost O_NONBLOCK")
    print("ok", n, usr1, alrm, flush=True)
    time.sleep(0.02)
"#;

#[test]
fn signalfd_keeps_its_mask_and_signals() {
    let r = checkpoint_and_restore("sigfd", SIGNALFD, &[], 10);
    let b = fields(&r.before);
    let a: Vec<u64> = r
        .after
        .lines()
        .rfind(|l| ok_counter(l).is_some())
        .map(fields)
        .expect("rounds after the restore");
    assert!(a[1] > b[1], "SIGUSR1 count went from {} to {}", b[1], a[1]);
    assert!(a[2] > b[2], "SIGALRM count went from {} to {}", b[2], a[2]);
}

/// Four timerfds: a 20 ms periodic CLOCK_MONOTONIC one whose expirations must keep matching the
/// elapsed CLOCK_MONOTONIC time, a one-shot that expired and was never read (it must stay
/// readable), an absolute CLOCK_REALTIME one an hour ahead (its wall-clock deadline must not
/// move), and one never armed (it must stay disarmed).
const TIMERFD: &str = r#"
import ctypes, os, select, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class TS(ctypes.Structure):
    _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
class ITS(ctypes.Structure):
    _fields_ = [("interval", TS), ("value", TS)]
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
def ts(x):
    return TS(int(x), int(round((x - int(x)) * 1e9)))
def mk(clock):
    fd = libc.timerfd_create(clock, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        fail("timerfd_create", os.strerror(ctypes.get_errno()))
    return fd
def settime(fd, flags, value, interval):
    its = ITS(ts(interval), ts(value))
    if libc.timerfd_settime(fd, flags, ctypes.byref(its), None) != 0:
        fail("timerfd_settime", os.strerror(ctypes.get_errno()))
def gettime(fd):
    its = ITS()
    libc.timerfd_gettime(fd, ctypes.byref(its))
    return (its.value.s + its.value.ns / 1e9, its.interval.s + its.interval.ns / 1e9)
PERIOD = 0.02
tick = mk(time.CLOCK_MONOTONIC)
start = time.monotonic()
settime(tick, 0, PERIOD, PERIOD)
fired = mk(time.CLOCK_MONOTONIC)
settime(fired, 0, 0.001, 0)
wall = mk(time.CLOCK_REALTIME)
deadline = time.time() + 3600
settime(wall, 1, deadline, 0)
idle = mk(time.CLOCK_MONOTONIC)
time.sleep(0.01)
total = n = 0
while True:
    n += 1
    select.select([tick], [], [], 1.0)
    try:
        total += struct.unpack("<Q", os.read(tick, 8))[0]
    except BlockingIOError:
        pass
    expected = (time.monotonic() - start) / PERIOD
    if abs(total - expected) > 10:
        fail("periodic timer:", total, "expirations, expected about", int(expected))
    if not select.select([fired], [], [], 0)[0]:
        fail("the expired one-shot timer lost its expiration")
    left, _ = gettime(wall)
    if abs(left - (deadline - time.time())) > 1.0:
        fail("absolute realtime timer moved:", left, "left, expected", deadline - time.time())
    if gettime(idle) != (0.0, 0.0):
        fail("the idle timer got armed", gettime(idle))
    if gettime(tick)[1] != PERIOD:
        fail("periodic timer interval", gettime(tick))
    print("ok", n, total, flush=True)
    time.sleep(0.03)
"#;

#[test]
fn timerfds_keep_ticking() {
    let r = checkpoint_and_restore("timerfd", TIMERFD, &[], 10);
    let b = fields(&r.before);
    let a: Vec<u64> = r
        .after
        .lines()
        .rfind(|l| ok_counter(l).is_some())
        .map(fields)
        .expect("rounds after the restore");
    assert!(a[1] > b[1], "expirations went from {} to {}", b[1], a[1]);
}

/// A process holding POSIX locks (a write lock on bytes 0..100, a read lock from 1000 to EOF),
/// an OFD lock (200..300) and a flock on a second file; its child checks every round, with
/// F_GETLK and a non-blocking flock, that its parent still holds them all. argv[1]: the file.
const LOCKS: &str = r#"
import fcntl, os, struct, sys, time
path = sys.argv[1]
FL = "=hh4xqqi4x"
def fail(*a):
    print("FAIL", *a, flush=True); os._exit(1)
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"x" * 4096)
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(FL, fcntl.F_WRLCK, 0, 0, 100, 0))
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(FL, fcntl.F_RDLCK, 0, 1000, 0, 0))
ofd = os.open(path, os.O_RDWR)
fcntl.fcntl(ofd, fcntl.F_OFD_SETLK, struct.pack(FL, fcntl.F_WRLCK, 0, 200, 100, 0))
ffd = os.open(path + ".flock", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(ffd, fcntl.LOCK_EX)
parent = os.getpid()
if os.fork() != 0:
    while True:
        time.sleep(1)
c = os.open(path, os.O_RDWR)
def getlk(start, ln=1):
    q = struct.pack(FL, fcntl.F_WRLCK, 0, start, ln, 0)
    t, _, st, l, p = struct.unpack(FL, fcntl.fcntl(c, fcntl.F_GETLK, q))
    return (t, st, l, p)
n = 0
while True:
    n += 1
    got = getlk(10)
    if got != (fcntl.F_WRLCK, 0, 100, parent):
        fail("posix write lock", got)
    got = getlk(1500)
    if got != (fcntl.F_RDLCK, 1000, 0, parent):
        fail("posix read lock", got)
    got = getlk(250)
    if got != (fcntl.F_WRLCK, 200, 100, -1):
        fail("ofd lock", got)
    got = getlk(500)
    if got[0] != fcntl.F_UNLCK:
        fail("a lock appeared on 500", got)
    c2 = os.open(path + ".flock", os.O_RDWR)
    try:
        fcntl.flock(c2, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fail("the flock is not held")
    except BlockingIOError:
        pass
    os.close(c2)
    print("ok", n, flush=True)
    time.sleep(0.03)
"#;

#[test]
fn file_locks_are_held_again() {
    let dir = tempfile::Builder::new()
        .prefix("vkm-locks-")
        .tempdir()
        .expect("temp dir");
    let file = dir.path().join("locked.dat");
    checkpoint_and_restore("locks", LOCKS, &[file.to_str().expect("utf-8")], 8);
}

/// A socketpair with a file descriptor in flight (SCM_RIGHTS) cannot be recreated: checkpoint
/// refuses, names the fd, and the vkernel keeps running with its queue intact (the message
/// and its fd are received afterwards) and the socket's peek offset as it was.
const FD_IN_FLIGHT: &str = r#"
import array, os, socket, sys, time
go = sys.argv[1]
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
a, b = socket.socketpair()
r, w = os.pipe()
os.write(w, b"through the passed fd")
a.sendmsg([b"hello"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
os.close(r)
SO_PEEK_OFF = 42
n = 0
while not os.path.exists(go):
    n += 1
    if b.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) != -1:
        fail("peek offset changed")
    print("ok", n, flush=True)
    time.sleep(0.05)
fds = array.array("i")
msg, anc, flags, _ = b.recvmsg(100, socket.CMSG_LEN(4 * fds.itemsize))
for level, kind, data in anc:
    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
if msg != b"hello" or len(fds) != 1:
    fail("message", msg, list(fds))
if os.read(fds[0], 100) != b"through the passed fd":
    fail("passed fd")
print("got fd", flush=True)
while True:
    n += 1
    print("ok", n, flush=True)
    time.sleep(0.05)
"#;

#[test]
fn fd_in_flight_is_refused_and_left_intact() {
    let mut lab = Lab::new();
    let py = common::python3();
    let go = lab.path("go");
    lab.run(
        "inflight",
        &[&py, "-c", FD_IN_FLIGHT, go.to_str().expect("utf-8")],
    );
    let n = lab.wait_line("inflight", LONG, |l| ok_counter(l).filter(|&n| n >= 5));
    let img = lab.path("inflight.vkimg");
    let out = lab.vkm(&["checkpoint", "inflight", "-o", img.to_str().expect("utf-8")]);
    assert!(!out.status.success(), "checkpoint succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("file descriptors in flight") && err.contains("fd "),
        "error does not say what is refused: {err}"
    );
    assert!(!img.exists(), "an image was left behind");
    lab.wait_line("inflight", LONG, |l| ok_counter(l).filter(|&m| m >= n + 5));
    std::fs::write(&go, b"").expect("go file");
    lab.wait_line("inflight", LONG, |l| (l == "got fd").then_some(()));
}

/// Datagrams of every size stay whole and in order: a zero-length one, small ones, and ones
/// larger than the buffer the first peek uses; they are received (and checked) only after
/// the restore, at round 30.
const DGRAM_SIZES: &str = r#"
import hashlib, socket, sys, time
def fail(*a):
    print("FAIL", *a, flush=True); sys.exit(1)
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
def msg(i, n):
    return (hashlib.sha256(str(i).encode()).digest() * (n // 32 + 1))[:n]
sizes = [100000, 5, 0, 70000, 300]
for i, n in enumerate(sizes):
    a.send(msg(i, n))
n = 0
while True:
    n += 1
    if n == 30:
        for i, sz in enumerate(sizes):
            m = b.recv(1 << 20)
            if m != msg(i, sz):
                fail("message", i, "has", len(m), "bytes, expected", sz)
        b.setblocking(False)
        try:
            fail("an extra message", len(b.recv(1 << 20)))
        except BlockingIOError:
            pass
    print("ok", n, flush=True)
    time.sleep(0.03)
"#;

#[test]
fn socketpair_dgram_sizes_and_boundaries() {
    let r = checkpoint_and_restore("dgsize", DGRAM_SIZES, &[], 5);
    let before = ok_counter(&r.before).unwrap_or(0);
    assert!(before < 30, "checked before the checkpoint ({before})");
}

/// A named pipe (FIFO) with records in flight: the program holds a reader and a writer open
/// by path, keeps five records queued, and checks the sequence it reads back.
const FIFO: &str = r#"
import os, struct, sys, tempfile, time
d = tempfile.mkdtemp(dir=sys.argv[1])
path = os.path.join(d, "fifo")
os.mkfifo(path)
r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
w = os.open(path, os.O_WRONLY)
sent = got = 0
for _ in range(5):
    os.write(w, struct.pack("<Q", sent)); sent += 1
n = 0
while True:
    n += 1
    os.write(w, struct.pack("<Q", sent)); sent += 1
    (v,) = struct.unpack("<Q", os.read(r, 8))
    if v != got:
        print("FAIL fifo read", v, "expected", got, flush=True); sys.exit(1)
    got += 1
    if sent - got != 5:
        print("FAIL fifo holds", sent - got, flush=True); sys.exit(1)
    print("ok", n, got, flush=True)
    time.sleep(0.05)
"#;

#[test]
fn fifo_with_records_in_flight() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = checkpoint_and_restore("fifo", FIFO, &[dir.path().to_str().expect("utf-8")], 5);
    // One record read per round: rounds and records advance together unless one was lost or
    // read twice across the restore.
    let offset = |f: &[u64]| f.get(1).zip(f.first()).map(|(got, n)| got.wrapping_sub(*n));
    let before = fields(&run.before);
    for line in run.after.lines().filter(|l| l.starts_with("ok ")) {
        assert_eq!(
            offset(&fields(line)),
            offset(&before),
            "records lost or repeated: {} / {line}",
            run.before
        );
    }
}

/// A memfd mapped privately: the pages the program wrote are its own copies, the others still
/// show the memfd's contents, which the program keeps changing through the fd.
const PRIVATE_MEMFD: &str = r#"
import mmap, os, sys, time
fd = os.memfd_create("priv")
os.ftruncate(fd, 16 * 4096)
os.pwrite(fd, b"F" * (16 * 4096), 0)
m = mmap.mmap(fd, 16 * 4096, flags=mmap.MAP_PRIVATE)
for p in range(0, 16, 2):
    m[p * 4096] = ord("P")
n = 0
while True:
    n += 1
    os.pwrite(fd, bytes([65 + n % 26]), 5 * 4096 + 1)
    for p in range(16):
        want = ord("P") if p % 2 == 0 else ord("F")
        if m[p * 4096] != want:
            print("FAIL page", p, m[p * 4096], flush=True); sys.exit(1)
    if m[5 * 4096 + 1] != 65 + n % 26:
        print("FAIL shared page does not follow the file", flush=True); sys.exit(1)
    print("ok", n, flush=True)
    time.sleep(0.05)
"#;

#[test]
fn private_memfd_mapping_keeps_its_copies() {
    checkpoint_and_restore("pmfd", PRIVATE_MEMFD, &[], 5);
}
