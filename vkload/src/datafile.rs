//! A regular file written with plain write(2) at the descriptor's own offset, so that the
//! offset is state a restore must bring back (together with the file's content).

use std::fs::{File, OpenOptions};
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const REC: usize = 64;

pub struct DataFile {
    file: File,
    path: PathBuf,
    bytes: u64,
}

impl DataFile {
    pub fn open(pid: u32) -> std::io::Result<DataFile> {
        let dir = std::env::var_os("VKLOAD_DIR").unwrap_or_else(|| "/tmp".into());
        // Every vkload sees itself as pid 2 of its namespace: the start time keeps the files
        // of vkloads side by side apart (the path is kept in memory, so it moves with us).
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = PathBuf::from(dir).join(format!("vkload-{pid}-{nonce}.dat"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(DataFile {
            file,
            path,
            bytes: 0,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn record(tick: u64) -> [u8; REC] {
        let mut rec = [b' '; REC];
        let text = format!("vkload pid={} tick={tick}", std::process::id());
        rec[..text.len()].copy_from_slice(text.as_bytes());
        rec[REC - 1] = b'\n';
        rec
    }

    pub fn tick(&mut self, tick: u64) -> Result<(), String> {
        let what = |e: std::io::Error| format!("{}: {e}", self.path.display());
        (&self.file).write_all(&Self::record(tick)).map_err(what)?;
        self.bytes += REC as u64;
        let pos = (&self.file).stream_position().map_err(what)?;
        if pos != self.bytes {
            return Err(format!(
                "{}: file offset is {pos}, expected {}",
                self.path.display(),
                self.bytes
            ));
        }
        let len = self.file.metadata().map_err(what)?.len();
        if len != self.bytes {
            return Err(format!(
                "{}: file size is {len}, expected {}",
                self.path.display(),
                self.bytes
            ));
        }
        // Record k holds tick k + 1: check the new one and an older one.
        let records = self.bytes / REC as u64;
        for k in [records - 1, crate::pattern::splitmix64(tick) % records] {
            let mut back = [0u8; REC];
            self.file
                .read_exact_at(&mut back, k * REC as u64)
                .map_err(what)?;
            if back != Self::record(k + 1) {
                return Err(format!(
                    "{}: record of tick {} reads back as {:?}",
                    self.path.display(),
                    k + 1,
                    String::from_utf8_lossy(&back)
                ));
            }
        }
        Ok(())
    }
}
