use std::path::PathBuf;

/// The one error type of the syscall layer.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// A system call failed; `op` names it and `pid` the task it was aimed at (0 = none).
    #[error("System call {op} failed for task {pid}")]
    Syscall {
        op: &'static str,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    /// A syscall injected into a stopped task returned an error.
    #[error("Injected {op} failed in task {pid}")]
    Remote {
        op: &'static str,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    /// A file under /proc (or elsewhere) could not be read or written.
    #[error("Cannot access {path}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A /proc file did not parse.
    #[error("Cannot parse {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: vkm_common::error::CommonError,
    },
    /// A traced task stopped in a way the tracer did not expect.
    #[error("Task {pid} {what}")]
    Unexpected { pid: i32, what: String },
}

impl SysError {
    pub(crate) fn last(op: &'static str, pid: i32) -> Self {
        SysError::Syscall {
            op,
            pid,
            source: std::io::Error::last_os_error(),
        }
    }

    pub(crate) fn errno(op: &'static str, pid: i32, errno: i32) -> Self {
        SysError::Syscall {
            op,
            pid,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    pub(crate) fn path(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SysError::Path {
            path: path.into(),
            source,
        }
    }

    /// The raw errno when the error came from a failing syscall.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SysError::Syscall { source, .. }
            | SysError::Remote { source, .. }
            | SysError::Path { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
