//! `vkmigrate ps`.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use super::{init_is_ours, status_field};
use crate::cli::PsArgs;
use crate::human;
use crate::state::{Probe, StateDir};

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    /// `running` or `stopped` (the shim lives but init is gone: it is about to clean up).
    state: &'static str,
    init_pid: i32,
    shim_pid: i32,
    /// Sum of VmRSS of the vkernel's processes (init excluded), in bytes.
    memory_bytes: u64,
    uptime_secs: u64,
    created: String,
    command: Vec<String>,
    console_tty: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    restored_from: Option<PathBuf>,
}

pub fn ps(state: &StateDir, args: PsArgs) -> Result<()> {
    let now = human::now_unix();
    let mut rows = Vec::new();
    for name in state.names()? {
        let rec = match state.probe(&name) {
            Ok(Probe::Alive(r)) => r,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(vkernel = %name, error = %format!("{e:#}"), "cannot read the vkernel's state");
                continue;
            }
        };
        let running = init_is_ours(&rec);
        rows.push(Row {
            state: if running { "running" } else { "stopped" },
            memory_bytes: if running {
                vkernel_rss(rec.init_pid)
            } else {
                0
            },
            uptime_secs: now.saturating_sub(rec.created),
            created: human::rfc3339(rec.created),
            init_pid: rec.init_pid,
            shim_pid: rec.shim_pid,
            command: rec.argv,
            console_tty: rec.console_tty,
            restored_from: rec.restored_from,
            name: rec.name,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.state.to_owned(),
                r.init_pid.to_string(),
                human::size(r.memory_bytes),
                human::age(r.uptime_secs),
                human::shell_words(&r.command),
            ]
        })
        .collect();
    let header = ["NAME", "STATE", "INIT PID", "MEMORY", "UPTIME", "COMMAND"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&table) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
    Ok(())
}

/// Sum of VmRSS over every process below `init` (descendants only: init is ours).
pub(super) fn vkernel_rss(init: i32) -> u64 {
    let mut total = 0;
    let mut queue = vec![init];
    let mut seen = 0usize;
    while let Some(pid) = queue.pop() {
        let Ok(children) = vkm_sys::proc::children(pid) else {
            continue;
        };
        for c in children {
            seen += 1;
            if seen > 1_000_000 {
                return total;
            }
            total += status_field(c, "VmRSS")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kib| kib * 1024);
            queue.push(c);
        }
    }
    total
}
