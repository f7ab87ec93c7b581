//! Checkpoint and restore benchmarks, printed as a table.
//!
//! `sudo cargo run --release -p vkm-bench [-- --sizes 256,2048 --runs 3 --dir /dev/shm]`
//!
//! Each case starts vkload (the self-checking test vkernel) with the given memory in a sandbox,
//! lets it fill its memory, checkpoints it to an image in `--dir` (tmpfs by default) and
//! restores it, then checks that the restored vkload keeps ticking without a self-check
//! failure. Throughput is image payload (raw page bytes) over wall time of the library call:
//! checkpoint = freeze + capture + write + fsync; restore = namespaces + processes + layout +
//! pages + state + resume. This binary stays single-threaded: it creates namespaces and
//! ptraces, like the shim.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vkm_common::image::{decode_meta, Frame, ImageReader};
use vkm_common::model::Vkernel;
use vkm_migrate_dst::{InitMode, Sandbox};
use vkm_migrate_src::{CaptureOptions, CheckpointOptions};

struct Case {
    label: String,
    argv: Vec<String>,
    compression: bool,
    /// How long to let the vkernel run before the checkpoint (vkload fills its memory first).
    warmup: Duration,
}

struct Row {
    label: String,
    raw_mib: f64,
    image_mib: f64,
    ckpt: Duration,
    restore: Duration,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| vkm_bench::opt(&args, name);
    let sizes: Vec<u64> = opt("--sizes")
        .unwrap_or_else(|| "256,2048".into())
        .split(',')
        .map(|s| s.parse().context("--sizes takes MiB values"))
        .collect::<Result<_>>()?;
    let runs: usize = opt("--runs")
        .map_or(Ok(3), |r| r.parse())
        .context("--runs")?;
    let dir = PathBuf::from(opt("--dir").unwrap_or_else(|| "/dev/shm".into()));
    let vkload = std::env::current_exe()?.with_file_name("vkload");
    if !vkload.exists() {
        bail!(
            "{} is missing: cargo build --release --workspace --bins",
            vkload.display()
        );
    }
    let work = dir.join(format!("vkm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let vk = vkload.to_string_lossy().into_owned();
    let mut cases = vec![Case {
        label: "small (vkload 1 MiB, 1 process)".into(),
        argv: vec![
            vk.clone(),
            "--mem".into(),
            "1".into(),
            "--ram-file-mib".into(),
            "1".into(),
            "--without".into(),
            "socketpair,children,threads".into(),
        ],
        compression: false,
        warmup: Duration::from_millis(500),
    }];
    for &mib in &sizes {
        for compression in [false, true] {
            cases.push(Case {
                label: format!(
                    "vkload {mib} MiB, lz4 {}",
                    if compression { "on" } else { "off" }
                ),
                argv: vec![
                    vk.clone(),
                    "--mem".into(),
                    mib.to_string(),
                    "--without".into(),
                    "socketpair".into(),
                ],
                compression,
                warmup: Duration::from_millis(1000 + mib * 2),
            });
        }
    }
    let mut rows = Vec::new();
    for case in &cases {
        let mut best: Option<Row> = None;
        for run in 0..runs {
            let row = run_case(case, &work, run).with_context(|| format!("case {}", case.label))?;
            if best
                .as_ref()
                .is_none_or(|b| row.ckpt + row.restore < b.ckpt + b.restore)
            {
                best = Some(row);
            }
        }
        if let Some(b) = best {
            rows.push(b);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "checkpoint/restore, image in {} (best of {runs})",
        dir.display()
    );
    println!(
        "{:<34} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "case", "raw MiB", "img MiB", "ckpt ms", "ckpt GB/s", "rest ms", "rest GB/s"
    );
    for r in rows {
        let gbs = |d: Duration| r.raw_mib * 1.048_576 / 1000.0 / d.as_secs_f64();
        println!(
            "{:<34} {:>9.1} {:>9.1} {:>10.1} {:>10.2} {:>10.1} {:>10.2}",
            r.label,
            r.raw_mib,
            r.image_mib,
            r.ckpt.as_secs_f64() * 1e3,
            gbs(r.ckpt),
            r.restore.as_secs_f64() * 1e3,
            gbs(r.restore)
        );
    }
    Ok(())
}

fn run_case(case: &Case, work: &Path, run: usize) -> Result<Row> {
    let log_path = work.join(format!("console-{run}.log"));
    let log = File::create(&log_path)?;
    // SAFETY: this benchmark is single-threaded.
    let sb = unsafe {
        Sandbox::create(
            InitMode::Run {
                argv: case.argv.clone(),
                console: log.into(),
            },
            None,
        )
    }?;
    let mut guard = SandboxGuard(sb);
    std::thread::sleep(case.warmup);
    let img = work.join(format!("bench-{run}.vkimg"));
    let _ = std::fs::remove_file(&img);
    let opts = CheckpointOptions {
        capture: CaptureOptions {
            name: "bench".into(),
            argv: case.argv.clone(),
            console_tty: None,
            skip_page_runs: false,
            owned_net: Vec::new(),
            known_net: Vec::new(),
            known_smaps: Default::default(),
        },
        init_pid: guard.0.init_pid,
        output: img.clone(),
        leave_running: false,
        compression: case.compression,
    };
    let t0 = Instant::now();
    let report = vkm_migrate_src::checkpoint(&opts, &mut |_, _| {})?;
    let ckpt = t0.elapsed();
    guard.0.kill();

    let mut reader = ImageReader::new(BufReader::with_capacity(1 << 20, File::open(&img)?))?;
    let Some(Frame::Meta(meta)) = reader.next_frame()? else {
        bail!("image without a description")
    };
    let vk: Vkernel = decode_meta(&meta)?;
    let t1 = Instant::now();
    // SAFETY: this benchmark is single-threaded.
    let sb = unsafe { Sandbox::create(InitMode::Restore, Some(vk.clocks)) }?;
    let mut guard = SandboxGuard(sb);
    vkm_migrate_dst::restore(&mut reader, &vk, &mut guard.0, None)?;
    let restore = t1.elapsed();
    guard.0.done();
    // The restored vkload must go on without a self-check failure.
    let len0 = std::fs::metadata(&log_path)?.len();
    std::thread::sleep(Duration::from_millis(600));
    let text = std::fs::read_to_string(&log_path)?;
    if text.contains("FAIL") || std::fs::metadata(&log_path)?.len() <= len0 {
        bail!(
            "the restored vkload did not continue cleanly:\n{}",
            text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    let _ = std::fs::remove_file(&img);
    Ok(Row {
        label: case.label.clone(),
        raw_mib: report.stats.bytes_raw as f64 / 1_048_576.0,
        image_mib: report.image_bytes as f64 / 1_048_576.0,
        ckpt,
        restore,
    })
}

/// Kills the sandbox (and with it the vkernel) however the case ends.
struct SandboxGuard(Sandbox);

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        self.0.kill();
    }
}
