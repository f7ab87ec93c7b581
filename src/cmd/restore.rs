//! `vkmigrate restore`: verify the whole image here, then let a new shim recreate the vkernel
//! (the shim must be the tracer and the parent of the new namespaces).

use std::ffi::OsString;
use std::fs::File;
use std::io::BufReader;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use vkm_common::image::{verify, ImageReader, PAGE_SIZE};

use crate::cli::{LogFormat, RestoreArgs};
use crate::human;
use crate::shim;
use crate::state::{validate_name, StateDir};

pub fn restore(state: &StateDir, log_format: LogFormat, args: RestoreArgs) -> Result<()> {
    let image = std::path::absolute(&args.image)
        .with_context(|| format!("Cannot resolve the path {}", args.image.display()))?;
    let open =
        || File::open(&image).with_context(|| format!("Cannot open the image {}", image.display()));
    // Refuse a damaged image before anything is created.
    let summary = verify(BufReader::with_capacity(1 << 20, open()?))
        .with_context(|| format!("The image {} failed verification", args.image.display()))?;
    tracing::debug!(
        pages = summary.pages,
        bytes = summary.total_bytes,
        "image verified"
    );
    let vk = ImageReader::new(BufReader::new(open()?))
        .map_err(anyhow::Error::from)
        .and_then(|mut r| shim::read_meta(&mut r))
        .with_context(|| format!("Cannot read the image {}", args.image.display()))?;
    let name = match args.name {
        Some(n) => n,
        None => {
            validate_name(&vk.name)
                .map_err(|e| anyhow!(e))
                .with_context(|| {
                    format!(
                        "The image's vkernel name {:?} cannot be used; choose one with --name",
                        vk.name
                    )
                })?;
            vk.name.clone()
        }
    };
    let claim = state.claim(&name)?;
    let mode: Vec<OsString> = vec![
        "restore".into(),
        "--name".into(),
        name.clone().into(),
        "--image".into(),
        image.clone().into(),
    ];
    let started = shim::start(state, claim, &name, mode, log_format).with_context(|| {
        format!(
            "Cannot restore vkernel {name} from {}",
            args.image.display()
        )
    })?;
    let stats = started.restore.unwrap_or(shim::RestoreStats {
        processes: 0,
        threads: 0,
        pages: 0,
        elapsed_us: 0,
    });
    println!(
        "restored {name} from {}: {} processes, {} threads, {} in {} (init pid {})",
        args.image.display(),
        stats.processes,
        stats.threads,
        human::mib(stats.pages.saturating_mul(PAGE_SIZE as u64)),
        human::ms(Duration::from_micros(stats.elapsed_us)),
        started.init_pid
    );
    Ok(())
}
