//! `vkmigrate checkpoint`: runs in the CLI process (it is the ptrace tracer while it captures);
//! the shim is not involved except that it cleans up when the library kills the vkernel.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vkm_migrate_src::CheckpointOptions;

use crate::cli::CheckpointArgs;
use crate::human;
use crate::state::StateDir;

pub fn checkpoint(state: &StateDir, args: CheckpointArgs) -> Result<()> {
    check_output(&args.output, args.force)?;
    let rec = super::running(state, &args.name)?;
    let opts = CheckpointOptions {
        capture: super::capture_options(&rec),
        init_pid: rec.init_pid,
        output: args.output.clone(),
        leave_running: args.leave_running,
        compression: !args.no_compress,
    };
    let bar = progress_bar();
    let t0 = Instant::now();
    let result = vkm_migrate_src::checkpoint(&opts, &mut |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = result.with_context(|| format!("Cannot checkpoint vkernel {}", rec.name))?;
    let elapsed = t0.elapsed();
    println!(
        "checkpointed {} to {}: {} processes, {} threads, {} ({} zero pages skipped) in {} ms",
        rec.name,
        args.output.display(),
        report.processes,
        report.threads,
        human::mib(report.image_bytes),
        report.stats.zero_pages_skipped,
        elapsed.as_millis()
    );
    tracing::info!(
        vkernel = %rec.name,
        frozen_ms = report.frozen_for.as_millis() as u64,
        pages = report.stats.pages_written,
        bytes_raw = report.stats.bytes_raw,
        "checkpoint written"
    );
    if !args.leave_running && !state.wait_gone(&rec, Duration::from_secs(5)) {
        tracing::warn!(
            vkernel = %rec.name,
            shim_pid = rec.shim_pid,
            "the vkernel was stopped but its shim has not cleaned up within 5 s"
        );
    }
    Ok(())
}

/// Refuse what would fail late or destroy something: a missing directory, a directory as the
/// output, an existing file without --force.
fn check_output(output: &Path, force: bool) -> Result<()> {
    if output.as_os_str().is_empty() || output.file_name().is_none() {
        bail!(
            "The output path {:?} does not name a file",
            output.display().to_string()
        );
    }
    let parent: PathBuf = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("The output directory {} does not exist", parent.display());
    }
    match std::fs::symlink_metadata(output) {
        Ok(m) if m.is_dir() => bail!("The output {} is a directory", output.display()),
        Ok(_) if !force => bail!(
            "The output {} exists (use --force to overwrite it)",
            output.display()
        ),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("Cannot check the output {}", output.display())),
    }
}

/// A byte progress bar on a terminal; nothing otherwise.
fn progress_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} writing pages [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_checks() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let existing = tmp.path().join("a.vkimg");
        std::fs::write(&existing, b"x")?;
        assert!(check_output(&tmp.path().join("new.vkimg"), false).is_ok());
        assert!(check_output(&existing, false).is_err());
        assert!(check_output(&existing, true).is_ok());
        assert!(check_output(tmp.path(), true).is_err());
        assert!(check_output(&tmp.path().join("missing/x.vkimg"), false).is_err());
        assert!(check_output(Path::new("x.vkimg"), false).is_ok());
        Ok(())
    }
}
