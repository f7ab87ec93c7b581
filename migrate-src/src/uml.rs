//! Recognising a User-Mode Linux among the vkernel's processes.

use std::collections::BTreeSet;
use std::path::PathBuf;

use vkm_sys::proc;

use crate::SrcError;

/// The mconsole socket of the UML whose kernel process is `pid` (host pid): the datagram socket
/// it holds bound to a path ending in `/mconsole` (`<uml_dir>/<umid>/mconsole`). None when the
/// process holds no such socket (not a UML, or one booted without an mconsole).
pub fn mconsole_of(pid: i32) -> Result<Option<PathBuf>, SrcError> {
    let mut sockets = BTreeSet::new();
    for fd in proc::list_numeric(proc::pid_path(pid, "fd"))? {
        let Ok(link) = proc::readlink(proc::pid_path(pid, &format!("fd/{fd}"))) else {
            continue;
        };
        if let Some(ino) = link
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok())
        {
            sockets.insert(ino);
        }
    }
    let text = proc::read(proc::pid_path(pid, "net/unix"))?;
    let bound = vkm_common::procfs::parse_net_unix(&text).map_err(|source| SrcError::Parse {
        what: "net/unix",
        pid,
        source,
    })?;
    Ok(bound
        .into_iter()
        .find(|b| sockets.contains(&b.inode) && b.path.ends_with("/mconsole"))
        .map(|b| PathBuf::from(b.path)))
}
