//! End-to-end: System V shared memory segments through a checkpoint and a restore.
//!
//! A Python program (ctypes: the stdlib has no shmget) and a child it forks share segments and
//! check each other every round, printing `ok N ids...` and `FAIL ...` on any inconsistency:
//! - A, with a fixed key and odd size, attached by both; the parent's attachment is split by
//!   mprotect (its last pages read-only), owner, group and mode were changed with IPC_SET;
//! - B, marked IPC_RMID while both have it attached (its key is private since);
//! - C, created by another uid and gid, attached read-only by the child;
//! - D, which nobody keeps attached: the parent checks its contents now and then.
//!
//! The vkernel runs in an IPC namespace of its own: the host never sees these keys.

mod common;

use std::time::Duration;

use common::{ok_counter, Lab};

const LONG: Duration = Duration::from_secs(30);
/// Rounds that must pass after the restore.
const MORE: u64 = 25;

const KEY_A: u32 = 0x5eed_0a01;
const KEY_B: u32 = 0x5eed_0b02;
const KEY_C: u32 = 0x5eed_0c03;
const KEY_D: u32 = 0x5eed_0d04;

const PROG: &str = r#"
import ctypes, os, sys, time, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0o1000, 0o2000, 0, 1, 2
SHM_RDONLY, SHM_DEST = 0o10000, 0o1000
KA, KB, KC, KD = [int(a, 0) for a in sys.argv[1:5]]
PAGE = 4096
SIZE_A = 3 * PAGE + 100
def fail(*a):
    print("FAIL", *a, flush=True); os._exit(1)
def err():
    return os.strerror(ctypes.get_errno())
def shmget(key, size, flags):
    i = libc.shmget(key, size, flags)
    if i < 0: fail("shmget", hex(key), err())
    return i
def shmat(i, flags=0):
    a = libc.shmat(i, None, flags)
    if a is None or a == 2**64 - 1: fail("shmat", i, err())
    return a
def stat(i):
    buf = ctypes.create_string_buffer(128)
    if libc.shmctl(i, IPC_STAT, buf) != 0: fail("IPC_STAT", i, err())
    key, uid, gid, cuid, cgid, mode = struct.unpack_from("<iIIIIH", buf.raw, 0)
    segsz, = struct.unpack_from("<Q", buf.raw, 48)
    nattch, = struct.unpack_from("<Q", buf.raw, 88)
    return dict(key=key, uid=uid, gid=gid, cuid=cuid, cgid=cgid, mode=mode, size=segsz,
                nattch=nattch)
def pattern(n, length):
    return bytes((n * 31 + i * 7) & 0xff for i in range(length))
def put(addr, off, data):
    ctypes.memmove(addr + off, data, len(data))
def get(addr, off, length):
    return ctypes.string_at(addr + off, length)
def u64(addr, off):
    return ctypes.c_uint64.from_address(addr + off)

# Segments come and go first, and A gets an id with a sequence number in a sparse slot, so
# that ids are not simply 0, 1, 2...
for i in range(5):
    libc.shmctl(shmget(0, PAGE, IPC_CREAT | 0o600), IPC_RMID, None)
with open("/proc/sys/kernel/shm_next_id", "w") as f:
    f.write(str(7 * 32768 + 40))
ida = shmget(KA, SIZE_A, IPC_CREAT | IPC_EXCL | 0o600)
if ida != 7 * 32768 + 40: fail("shm_next_id gave", ida)
# Owner, group and mode changed after creation (IPC_SET).
buf = ctypes.create_string_buffer(128)
if libc.shmctl(ida, IPC_STAT, buf) != 0: fail("IPC_STAT", err())
raw = bytearray(buf.raw)
struct.pack_into("<IIIIH", raw, 4, 1234, 4321, 0, 0, 0o640)
raw[12:20] = buf.raw[12:20]  # cuid/cgid are not set by IPC_SET anyway
buf = ctypes.create_string_buffer(bytes(raw), 128)
if libc.shmctl(ida, IPC_SET, buf) != 0: fail("IPC_SET", err())
a = shmat(ida)
idb = shmget(KB, PAGE, IPC_CREAT | IPC_EXCL | 0o600)
b = shmat(idb)
# C is created by another user, in a short-lived helper process.
r, w = os.pipe()
if os.fork() == 0:
    os.setegid(4321); os.seteuid(1234)
    i = libc.shmget(KC, PAGE, IPC_CREAT | IPC_EXCL | 0o644)
    os.write(w, struct.pack("<i", i)); os._exit(0)
idc, = struct.unpack("<i", os.read(r, 4))
os.wait()
if idc < 0: fail("shmget C as another user")
c = shmat(idc)
# D: written once, then detached by everybody.
idd = shmget(KD, 2 * PAGE, IPC_CREAT | IPC_EXCL | 0o600)
d = shmat(idd)
put(d, 0, pattern(99, PAGE)); put(d, PAGE, pattern(77, 50))
if libc.shmdt(d) != 0: fail("shmdt", err())

pid = os.fork()
if pid == 0:
    # The child: attached to A and B through fork, to C read-only by itself.
    cr = shmat(idc, SHM_RDONLY)
    last = 0
    while True:
        n = u64(a, 0).value
        if n == last:
            time.sleep(0.001); continue
        if n != last + 1: fail("child: round", n, "after", last)
        if get(a, PAGE, 256) != pattern(n, 256): fail("child: A page 1 in round", n)
        if u64(cr, 0).value != n * 5: fail("child: C holds", u64(cr, 0).value, "in round", n)
        if u64(b, 0).value != n - 1: fail("child: B holds", u64(b, 0).value, "in round", n)
        put(a, 2 * PAGE, pattern(n * 3, 256))
        put(a, 3 * PAGE, pattern(n * 5, 100))
        u64(b, 0).value = n
        u64(a, 8).value = n
        last = n

# The parent's view of A's last pages becomes read-only (which splits its mapping).
if libc.mprotect(a + 2 * PAGE, 2 * PAGE, 1) != 0: fail("mprotect", err())
# B is removed while attached: it lives on, with a private key, until both detach.
if libc.shmctl(idb, IPC_RMID, None) != 0: fail("IPC_RMID", err())
n = 0
while True:
    n += 1
    put(a, PAGE, pattern(n, 256))
    u64(c, 0).value = n * 5
    u64(a, 0).value = n
    t0 = time.monotonic()
    while u64(a, 8).value != n:
        if time.monotonic() - t0 > 10: fail("no answer from the child in round", n)
        time.sleep(0.001)
    if get(a, 2 * PAGE, 256) != pattern(n * 3, 256): fail("A page 2 in round", n)
    if get(a, 3 * PAGE, 100) != pattern(n * 5, 100): fail("A page 3 in round", n)
    if u64(b, 0).value != n: fail("B holds", u64(b, 0).value, "in round", n)
    if shmget(KA, 0, 0) != ida: fail("key A finds", shmget(KA, 0, 0), "not", ida)
    if shmget(KC, 0, 0) != idc: fail("key C finds another segment")
    if shmget(KD, 0, 0) != idd: fail("key D finds another segment")
    if libc.shmget(KB, 0, 0) >= 0: fail("the removed segment B is found by its key")
    sa, sb, sc = stat(ida), stat(idb), stat(idc)
    # nattch counts mappings: the parent's split attachment of A counts twice, the child has
    # C twice (inherited through fork, and attached read-only).
    if (sa["key"], sa["uid"], sa["gid"], sa["mode"] & 0o777, sa["size"], sa["nattch"]) != \
            (KA, 1234, 4321, 0o640, SIZE_A, 3):
        fail("A is", sa)
    if sb["mode"] & SHM_DEST == 0 or sb["key"] != 0 or sb["nattch"] != 2: fail("B is", sb)
    if (sc["cuid"], sc["cgid"], sc["uid"], sc["gid"], sc["mode"] & 0o777, sc["nattch"]) != \
            (1234, 4321, 1234, 4321, 0o644, 3):
        fail("C is", sc)
    if n % 10 == 0:
        sd = stat(idd)
        if sd["nattch"] != 0 or sd["size"] != 2 * PAGE: fail("D is", sd)
        d = shmat(idd, SHM_RDONLY)
        if get(d, 0, PAGE) != pattern(99, PAGE) or get(d, PAGE, 50) != pattern(77, 50):
            fail("D's contents changed")
        libc.shmdt(d)
    print("ok", n, ida, idb, idc, idd, flush=True)
    time.sleep(0.02)
"#;

/// `ok N idA idB idC idD`: the ids.
fn ids(line: &str) -> Vec<i64> {
    line.split_whitespace()
        .skip(2)
        .filter_map(|w| w.parse().ok())
        .collect()
}

/// Keys of the host's SysV segments (`/proc/sysvipc/shm` shows the reader's namespace).
fn host_keys() -> Vec<u32> {
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse::<i64>().ok())
        .map(|k| k as u32)
        .collect()
}

#[test]
fn sysv_shared_memory_survives_checkpoint_and_restore() {
    let name = "sysv-shm";
    let mut lab = Lab::new();
    let py = common::python3();
    let keys: Vec<String> = [KEY_A, KEY_B, KEY_C, KEY_D]
        .iter()
        .map(|k| format!("{k:#x}"))
        .collect();
    let mut cmd = vec![py.as_str(), "-c", PROG];
    cmd.extend(keys.iter().map(String::as_str));
    lab.run(name, &cmd);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= 15));
    let host = host_keys();
    for k in [KEY_A, KEY_C, KEY_D] {
        assert!(
            !host.contains(&k),
            "key {k:#x} is visible on the host: the vkernel has no IPC namespace of its own"
        );
    }

    let (img, before) = lab.checkpoint_tailed(name);
    let last = ok_counter(&before).unwrap_or(0);
    let before_ids = ids(&before);
    assert_eq!(before_ids.len(), 4, "ids in {before:?}");
    assert!(
        before_ids.iter().any(|&id| id >= 32768),
        "ids without a sequence number: {before:?}"
    );

    // The image describes the segments.
    let inspect = lab.ok(&["inspect", img.to_str().expect("utf-8")]);
    assert!(
        inspect.contains("SysV"),
        "inspect shows no SysV object:\n{inspect}"
    );

    lab.restore(&img, name);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= last + MORE));
    let after = lab.console_log(name);
    let first = after
        .lines()
        .find(|l| ok_counter(l).is_some())
        .expect("rounds after the restore");
    let n = ok_counter(first).unwrap_or(0);
    assert!(
        n > last && n <= last + 3,
        "round {last} before the checkpoint, {n} after; console:\n{after}"
    );
    // shmget(key, 0, 0) finds the very same ids (the program checks it every round too).
    assert_eq!(
        ids(first),
        before_ids,
        "ids before: {before:?}, after: {first:?}"
    );
    let host = host_keys();
    for k in [KEY_A, KEY_C, KEY_D] {
        assert!(
            !host.contains(&k),
            "key {k:#x} leaked to the host's namespace"
        );
    }
}

/// A checkpoint with `--leave-running` and a restore on the same host: the source keeps its
/// segments and the copy gets its own with the same keys and ids, in its own namespace.
#[test]
fn sysv_shared_memory_copy_next_to_its_source() {
    let name = "sysv-src";
    let copy = "sysv-copy";
    let mut lab = Lab::new();
    let py = common::python3();
    let keys: Vec<String> = [KEY_A, KEY_B, KEY_C, KEY_D]
        .iter()
        .map(|k| format!("{k:#x}"))
        .collect();
    let mut cmd = vec![py.as_str(), "-c", PROG];
    cmd.extend(keys.iter().map(String::as_str));
    lab.run(name, &cmd);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= 5));
    let img = lab.path("copy.vkimg");
    lab.ok(&[
        "checkpoint",
        name,
        "--leave-running",
        "-o",
        img.to_str().expect("utf-8"),
    ]);
    let src_last = ok_counter(&lab.wait_line(name, LONG, |l| ok_counter(l).map(|_| l.to_string())))
        .unwrap_or(0);
    lab.restore(&img, copy);
    let line = lab.wait_line(copy, LONG, |l| {
        ok_counter(l).filter(|&n| n >= 10).map(|_| l.to_string())
    });
    // The source goes on too, undisturbed.
    lab.wait_line(name, LONG, |l| {
        ok_counter(l).filter(|&n| n >= src_last + 10)
    });
    let src_line = lab.wait_line(name, LONG, |l| ok_counter(l).map(|_| l.to_string()));
    assert_eq!(
        ids(&line),
        ids(&src_line),
        "source {src_line:?}, copy {line:?}"
    );
}

const SEMAPHORE: &str = r#"
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
if libc.semget(0x5eed0e05, 1, 0o1600) < 0: print("FAIL semget", flush=True)
n = 0
while True:
    n += 1
    print("ok", n, flush=True)
    time.sleep(0.02)
"#;

/// SysV semaphores are not carried by a checkpoint: it is refused, with a reason, and the
/// vkernel keeps running.
#[test]
fn sysv_semaphores_are_refused() {
    let name = "sysv-sem";
    let mut lab = Lab::new();
    let py = common::python3();
    lab.run(name, &[&py, "-c", SEMAPHORE]);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&n| n >= 3));
    let img = lab.path("sem.vkimg");
    let out = lab.vkm(&["checkpoint", name, "-o", img.to_str().expect("utf-8")]);
    assert!(
        !out.status.success(),
        "a checkpoint with a semaphore set succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("semaphore"),
        "the error gives no reason: {err}"
    );
    assert!(!img.exists(), "a refused checkpoint left an image");
    let n = lab.wait_line(name, LONG, ok_counter);
    lab.wait_line(name, LONG, |l| ok_counter(l).filter(|&m| m >= n + 5));
}
