//! `vkmigrate run`.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::{LogFormat, RunArgs};
use crate::shim;
use crate::state::StateDir;

pub fn run(state: &StateDir, log_format: LogFormat, args: RunArgs) -> Result<()> {
    let Some(program) = args.command.first() else {
        bail!("No command given");
    };
    // Init would only report this later, on the console; say it now.
    find_program(program)?;
    let claim = state.claim(&args.name)?;
    let mut mode: Vec<OsString> = vec![
        "run".into(),
        "--name".into(),
        args.name.clone().into(),
        "--".into(),
    ];
    mode.extend(args.command.iter().map(OsString::from));
    let started = shim::start(state, claim, &args.name, mode, log_format)
        .with_context(|| format!("Cannot start vkernel {}", args.name))?;
    println!(
        "started {}: init pid {}, console {}",
        args.name, started.init_pid, started.console_tty
    );
    Ok(())
}

/// Where `execvp` would find `program`, or an error saying it would not.
fn find_program(program: &str) -> Result<PathBuf> {
    if program.is_empty() {
        bail!("The command is empty");
    }
    if program.contains('/') {
        let p = Path::new(program);
        if is_executable(p) {
            return Ok(p.to_path_buf());
        }
        bail!("Cannot execute {program}: not an executable file");
    }
    // execvp's default search path when PATH is unset.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("Command {program} not found in PATH")
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs() {
        assert!(find_program("sh").is_ok());
        assert!(find_program("/bin/sh").is_ok());
        assert!(find_program("no-such-program-vkm").is_err());
        assert!(find_program("/etc/passwd").is_err());
    }
}
