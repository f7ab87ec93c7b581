//! `vkmigrate`: the command line and the per-vkernel shim. Thin: argument parsing, wiring,
//! printing the error chain; the work happens in the library crates.

mod cli;
mod cmd;
mod console_proto;
mod fault;
mod human;
mod logging;
mod shim;
mod state;
mod wire;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::state::StateDir;

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap), --help/--version with 0.
    let cli = Cli::parse();
    let state_dir =
        std::path::absolute(&cli.global.state_dir).unwrap_or(cli.global.state_dir.clone());
    let state = StateDir::new(state_dir);
    if let Command::Shim(args) = cli.command {
        return shim::main(&state, args, cli.global.log_format);
    }
    logging::init(cli.global.log_format, "warn");
    match cmd::dispatch(&state, cli.global.log_format, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            print_error(&e);
            ExitCode::FAILURE
        }
    }
}

/// The tokio runtime that carries QUIC for `listen`, `send` and a receiving shim: two workers,
/// one per core of the machines this is sized for; page work runs on threads of its own.
fn net_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    vkm_sys::calls::keep_freed_memory();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("Cannot start the network runtime")
}

/// `Error: msg` and then each cause once, numbered (cloud-hypervisor's `cli_print_error_chain`).
fn print_error(err: &anyhow::Error) {
    eprintln!("Error: {err}");
    for (i, cause) in err.chain().skip(1).enumerate() {
        eprintln!("  Caused by ({}): {cause}", i + 1);
    }
}
