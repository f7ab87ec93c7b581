//! First-touch throughput of fresh anonymous memory, printed as a table: what a destination
//! pays, besides copying, for every page of a vkernel it receives.
//!
//! `cargo run --release -p vkm-bench --bin touch [-- --mib 4096 --rounds 3]`
//!
//! Each round maps `--mib` MiB afresh and writes one byte into every 4 KiB page. On bare metal
//! that costs the kernel's page fault and zeroing (about 1–2 µs a page). A VM whose hypervisor
//! has taken back memory the guest left untouched pays its own fault on top, the first time a
//! guest page is used again.

use std::time::Instant;

use anyhow::{Context, Result};

const PAGE: usize = 4096;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| vkm_bench::opt(&args, name);
    let mib: usize = opt("--mib")
        .map_or(Ok(4096), |v| v.parse())
        .context("--mib takes a number")?;
    let rounds: usize = opt("--rounds")
        .map_or(Ok(3), |v| v.parse())
        .context("--rounds takes a number")?;
    let bytes = mib << 20;
    println!("| round | MiB | first touch | per page |");
    println!("|---|---|---|---|");
    for round in 0..rounds {
        // Capacity only: the allocator maps it (it is far above glibc's mmap threshold) and
        // nothing touches it before the loop.
        let mut mem: Vec<u8> = Vec::with_capacity(bytes);
        let t = Instant::now();
        for page in mem.spare_capacity_mut().chunks_mut(PAGE) {
            page[0].write(1);
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| {round} | {mib} | {:.2} GB/s | {:.0} ns |",
            bytes as f64 / secs / 1e9,
            secs / (bytes / PAGE) as f64 * 1e9
        );
        drop(mem);
    }
    Ok(())
}
