//! The source side: freezing a vkernel, reading its state, and writing it out as an image
//! (checkpoint) — later also the pre-copy sender of a live migration.

mod capture;
pub mod checkpoint;
pub mod dirty;
pub mod freeze;
pub mod live;
pub mod throttle;
pub mod uml;

pub use capture::{capture, CaptureOptions, Captured};
pub use checkpoint::{checkpoint, CheckpointOptions, CheckpointReport};

use std::path::PathBuf;

/// Everything that can make a capture or checkpoint fail. The vkernel keeps running in every
/// case (it is thawed before the error is returned).
#[derive(Debug, thiserror::Error)]
pub enum SrcError {
    #[error(transparent)]
    Sys(#[from] vkm_sys::SysError),
    #[error("Cannot parse {what} of process {pid}")]
    Parse {
        what: &'static str,
        pid: i32,
        #[source]
        source: vkm_common::error::CommonError,
    },
    #[error("Process {pid} holds fd {fd} of an unsupported kind ({kind}); checkpoint refused, the vkernel keeps running")]
    UnsupportedFd { pid: i32, fd: i32, kind: String },
    #[error("Process {pid} has an unsupported mapping {start:#x}-{end:#x} ({what}); checkpoint refused, the vkernel keeps running")]
    UnsupportedVma {
        pid: i32,
        start: u64,
        end: u64,
        what: String,
    },
    #[error("Process {pid} is unsupported: {what}; checkpoint refused, the vkernel keeps running")]
    Unsupported { pid: i32, what: String },
    #[error("Task {pid} vanished while the vkernel was being frozen")]
    Vanished { pid: i32 },
    #[error("Task {pid} does not stop (it may be waiting for a vfork child or for I/O); the vkernel keeps running, try again")]
    NotStopping { pid: i32 },
    #[error("Cannot kill the vkernel's init {pid}")]
    Kill {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("The link to the destination failed: {what}")]
    Link { what: String },
    #[error("Process {pid} is traced by task {tracer} of the vkernel, which is not a UML kernel with an mconsole socket; only UML's own tracing can be checkpointed (the vkernel keeps running)")]
    Traced { pid: i32, tracer: i32 },
    #[error("The UML kernel process {pid} did not carry out mconsole {command:?}; the vkernel keeps running")]
    Mconsole {
        pid: i32,
        command: &'static str,
        #[source]
        source: vkm_common::error::CommonError,
    },
    #[error("The vkernel has no processes")]
    Empty,
    #[error("Cannot read the configuration of {ifname}, a tun/tap device of the vkernel; the vkernel keeps running")]
    Net {
        ifname: String,
        #[source]
        source: vkm_netconf::NetconfError,
    },
    #[error("Cannot write the image")]
    Image(#[from] vkm_common::error::CommonError),
    #[error("Cannot {step} {path}")]
    Output {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CPU throttling is unavailable: {why}; mount the cgroup v1 cpu controller or enable \"cpu\" in the cgroup2 parent's cgroup.subtree_control, or migrate without auto-converge")]
    ThrottleUnavailable { why: String },
    #[error("Cannot {step} {path} for the CPU throttle (it needs root and a writable cgroup hierarchy); the vkernel keeps running")]
    Cgroup {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Sort [start, end) ranges and merge those that overlap or touch.
pub(crate) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some((_, le)) if *le >= s => *le = (*le).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}
