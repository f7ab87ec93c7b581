//! Record streams with data in flight (pipe, socketpair, child heartbeats) and the eventfd
//! exchange.
//!
//! A stream carries fixed-size records (see `pattern::encode_record`) whose sequence numbers
//! must arrive consecutively: a restore that drops, duplicates or reorders buffered bytes
//! breaks the sequence. Both ends work with blocking descriptors (a thread per end, which is
//! how the threads mode leaves a thread sleeping in read) and with non-blocking ones (the
//! single-threaded mode, where the main thread drives both ends each tick).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::check::fail;
use crate::pattern::{decode_record, encode_record, REC_SIZE};
use crate::workers::spawn;

pub static PIPE_RECV: AtomicU64 = AtomicU64::new(0);
pub static SOCK_RECV: AtomicU64 = AtomicU64::new(0);
pub static EFD_ADDED: AtomicU64 = AtomicU64::new(0);
pub static EFD_READ: AtomicU64 = AtomicU64::new(0);

pub const STREAM_PIPE: u64 = 1;
pub const STREAM_SOCK: u64 = 2;
pub const STREAM_HEARTBEAT: u64 = 0x100;

fn stream_name(stream: u64) -> String {
    match stream {
        STREAM_PIPE => "pipe".to_string(),
        STREAM_SOCK => "socketpair".to_string(),
        s => format!("child {} heartbeat pipe", s - STREAM_HEARTBEAT),
    }
}

/// Largest single read; a multiple of the record size is not required (records may straddle
/// reads) but keeps the common case simple.
const READ_MAX: usize = 64 * REC_SIZE;
/// Records the single-threaded mode writes per tick: fewer than one read drains, so the
/// stream is emptied each tick and holds this many records between ticks.
const INLINE_BURST: usize = 32;

pub struct Tx {
    file: File,
    stream: u64,
    seq: u64,
    buf: [u8; REC_SIZE],
    off: usize,
}

impl Tx {
    pub fn new(file: File, stream: u64) -> Tx {
        Tx {
            file,
            stream,
            seq: 0,
            buf: [0; REC_SIZE],
            off: REC_SIZE,
        }
    }

    /// Sends one record, first finishing one a previous call left half-written. Returns
    /// Ok(false) if a non-blocking descriptor is full; the rest goes out on the next call.
    pub fn send(&mut self, aux: u64) -> Result<bool, String> {
        if self.off == REC_SIZE {
            self.buf = encode_record(self.stream, self.seq, aux);
            self.off = 0;
        }
        while self.off < REC_SIZE {
            match (&self.file).write(&self.buf[self.off..]) {
                Ok(0) => return Err(format!("{}: write returned 0", stream_name(self.stream))),
                Ok(n) => self.off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(format!("{}: write: {e}", stream_name(self.stream))),
            }
        }
        self.seq += 1;
        Ok(true)
    }
}

pub struct Rx {
    file: File,
    stream: u64,
    next_seq: u64,
    partial: Vec<u8>,
}

impl Rx {
    pub fn new(file: File, stream: u64) -> Rx {
        Rx {
            file,
            stream,
            next_seq: 0,
            partial: Vec::with_capacity(READ_MAX + REC_SIZE),
        }
    }

    /// One read(2); checks every record it completes and passes its aux value to `each`.
    /// Returns the number of records, or None if a non-blocking descriptor was empty.
    pub fn read_once(
        &mut self,
        mut each: impl FnMut(u64) -> Result<(), String>,
    ) -> Result<Option<u64>, String> {
        let mut buf = [0u8; READ_MAX];
        let n = loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => return Err(format!("{}: unexpected EOF", stream_name(self.stream))),
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(format!("{}: read: {e}", stream_name(self.stream))),
            }
        };
        self.partial.extend_from_slice(&buf[..n]);
        let whole = self.partial.len() / REC_SIZE * REC_SIZE;
        let mut count = 0;
        for rec in self.partial[..whole].chunks_exact(REC_SIZE) {
            let (seq, aux) = decode_record(rec, self.stream)
                .map_err(|e| format!("{}: {e}", stream_name(self.stream)))?;
            if seq != self.next_seq {
                return Err(format!(
                    "{}: got record {seq}, expected {}",
                    stream_name(self.stream),
                    self.next_seq
                ));
            }
            self.next_seq += 1;
            count += 1;
            each(aux)?;
        }
        self.partial.drain(..whole);
        Ok(Some(count))
    }
}

/// Threads mode: the producer writes a record per ~1 ms, the consumer reads in bursts every
/// 20 ms, so that ~20 records are normally in flight.
pub fn spawn_stream(name: &str, mut tx: Tx, mut rx: Rx, counter: &'static AtomicU64) {
    spawn(&format!("vkl-{name}-tx"), move || loop {
        if let Err(e) = tx.send(0) {
            fail(e);
        }
        std::thread::sleep(Duration::from_millis(1));
    });
    spawn(&format!("vkl-{name}-rx"), move || loop {
        std::thread::sleep(Duration::from_millis(20));
        match rx.read_once(|_| Ok(())) {
            Ok(n) => {
                counter.fetch_add(n.unwrap_or(0), Ordering::Relaxed);
            }
            Err(e) => fail(e),
        }
    });
}

/// Single-threaded mode, once per tick: drain what is there, then put a burst in flight.
pub fn inline_stream(tx: &mut Tx, rx: &mut Rx, counter: &AtomicU64) -> Result<(), String> {
    while let Some(n) = rx.read_once(|_| Ok(()))? {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    for _ in 0..INLINE_BURST {
        if !tx.send(0)? {
            break;
        }
    }
    Ok(())
}

fn efd_value(n: u64) -> u64 {
    n % 7 + 1
}

fn efd_add(file: &File, n: u64) -> Result<(), String> {
    let v = efd_value(n);
    // Counted before the write, so the reader can never have read more than was added.
    EFD_ADDED.fetch_add(v, Ordering::SeqCst);
    loop {
        match (&*file).write(&v.to_ne_bytes()) {
            Ok(8) => return Ok(()),
            Ok(k) => return Err(format!("eventfd write returned {k}")),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("eventfd write: {e}")),
        }
    }
}

/// Reads the eventfd counter (0 if a non-blocking one is zero) and checks the totals.
fn efd_read(file: &File) -> Result<u64, String> {
    let mut b = [0u8; 8];
    let got = loop {
        match (&*file).read(&mut b) {
            Ok(8) => break u64::from_ne_bytes(b),
            Ok(k) => return Err(format!("eventfd read returned {k}")),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break 0,
            Err(e) => return Err(format!("eventfd read: {e}")),
        }
    };
    let total = EFD_READ.fetch_add(got, Ordering::SeqCst) + got;
    let added = EFD_ADDED.load(Ordering::SeqCst);
    if total > added {
        return Err(format!(
            "eventfd: read {total} in total but only {added} was added"
        ));
    }
    Ok(total)
}

/// Threads mode: one thread adds every ~5 ms and, every 100 adds, waits until the reader
/// has caught up exactly (a lost count shows as a stall); the other blocks in read.
pub fn spawn_eventfd(file: File) {
    let file: &'static File = Box::leak(Box::new(file));
    spawn("vkl-efd-add", move || {
        let mut n = 0u64;
        loop {
            if let Err(e) = efd_add(file, n) {
                fail(e);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
            if n % 100 == 0 {
                while EFD_READ.load(Ordering::SeqCst) != EFD_ADDED.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    });
    spawn("vkl-efd-read", move || loop {
        if let Err(e) = efd_read(file) {
            fail(e);
        }
    });
}

/// Single-threaded mode, once per tick: everything added before must be readable now, and
/// one more add stays in the counter until the next tick.
pub struct InlineEventfd {
    file: File,
    n: u64,
}

impl InlineEventfd {
    pub fn new(file: File) -> InlineEventfd {
        InlineEventfd { file, n: 0 }
    }

    pub fn tick(&mut self) -> Result<(), String> {
        let total = efd_read(&self.file)?;
        let added = EFD_ADDED.load(Ordering::SeqCst);
        if total != added {
            return Err(format!("eventfd: read {total} in total, added {added}"));
        }
        efd_add(&self.file, self.n)?;
        self.n += 1;
        Ok(())
    }
}
