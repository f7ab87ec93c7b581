//! `vkmigrate checkpoint`: freeze, capture, write the image safely, then stop or thaw.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vkm_common::image::{ImageWriter, WriteStats};
use vkm_common::model::features;

use crate::capture::{capture, CaptureOptions};
use crate::freeze::Frozen;
use crate::SrcError;

pub struct CheckpointOptions {
    pub capture: CaptureOptions,
    /// Host pid of the vkernel's namespace init.
    pub init_pid: i32,
    pub output: PathBuf,
    /// Keep the vkernel running after the image is written.
    pub leave_running: bool,
    pub compression: bool,
}

#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub processes: usize,
    pub threads: usize,
    pub stats: WriteStats,
    pub image_bytes: u64,
    /// From the freeze to the image being durable on disk.
    pub frozen_for: Duration,
}

/// Write the vkernel's state to `opts.output`. The image appears only when complete and
/// fsynced (written under a temporary name, then renamed); on any failure the temporary file
/// is removed and the vkernel keeps running.
pub fn checkpoint(
    opts: &CheckpointOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckpointReport, SrcError> {
    let mut frozen = Frozen::freeze(opts.init_pid)?;
    let t0 = Instant::now();
    let captured = capture(&frozen, &opts.capture)?;
    frozen.unpin();
    let tmp = tmp_path(&opts.output);
    let result = write_image(&tmp, &captured, opts.compression, progress);
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&tmp, &opts.output) {
        let _ = std::fs::remove_file(&tmp);
        return Err(SrcError::Output {
            step: "rename the image to",
            path: opts.output.clone(),
            source: e,
        });
    }
    sync_dir(&opts.output);
    let frozen_for = t0.elapsed();
    let report = CheckpointReport {
        processes: captured.vk.processes.len(),
        threads: captured.vk.processes.iter().map(|p| p.threads.len()).sum(),
        image_bytes: stats.bytes_written,
        stats,
        frozen_for,
    };
    if opts.leave_running {
        let mut frozen = frozen;
        frozen.thaw();
        redeliver(&captured.held);
    } else {
        frozen.kill()?;
        // The image holds the network too; a restore recreates it.
        release_net(&captured.vk.net);
    }
    Ok(report)
}

/// The vkernel is gone from this host (moved, or checkpointed and stopped): remove the
/// tun/tap devices it held that outlive it (persistent ones), with their addresses, and the
/// bridges vkmigrate created for it once nothing else is enslaved to them. A restore or the
/// destination recreates them; left here they would keep routes to a vkernel that is not here.
pub(crate) fn release_net(devs: &[vkm_common::net::NetDev]) {
    for d in devs {
        let owned_bridge = d
            .bridge
            .as_ref()
            .filter(|b| b.owned)
            .map(|b| b.name.as_str());
        if let Err(e) = vkm_netconf::remove(&d.name, owned_bridge) {
            tracing::warn!(
                ifname = %d.name,
                error = %vkm_common::error::chain(&e),
                "cannot remove the vkernel's tap here; remove it with `ip link del {}`",
                d.name
            );
        }
    }
}

/// Signals that arrived during capture injections were held back; a vkernel that keeps
/// running gets them now.
pub(crate) fn redeliver(held: &[(i32, i32, i32)]) {
    for &(tgid, tid, sig) in held {
        tracing::debug!(tgid, tid, sig, "re-delivering a signal held during capture");
        // tgkill, not the original siginfo: the kernel refuses kernel-generated siginfos from
        // another process, and the handlers of a running vkernel only see the number.
        if let Err(e) = vkm_sys::calls::tgkill(tgid, tid, sig) {
            tracing::warn!(tid, sig, error = %e, "could not re-deliver a held signal");
        }
    }
}

fn write_image(
    tmp: &Path,
    captured: &crate::Captured,
    compression: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteStats, SrcError> {
    let out_err = |step: &'static str| {
        move |e: std::io::Error| SrcError::Output {
            step,
            path: tmp.to_path_buf(),
            source: e,
        }
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(out_err("create"))?;
    let mut w = ImageWriter::new(
        BufWriter::with_capacity(1 << 20, file),
        features::XSTATE | features::TIME_NS,
    )?;
    w.set_compression(compression);
    w.write_meta(&captured.vk)?;
    let total = captured.memory.total_bytes();
    let mut done = 0u64;
    captured.memory.write_pages(&mut w, compression, &mut |n| {
        done += n;
        progress(done, total);
    })?;
    let (buf, stats) = w.finish()?;
    let file: File = buf.into_inner().map_err(|e| SrcError::Output {
        step: "flush",
        path: tmp.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(out_err("fsync"))?;
    Ok(stats)
}

fn tmp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_dir(path: &Path) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
