//! The syscall layer shared by both sides of a migration.
//!
//! Every `unsafe` of vkmigrate lives in this crate, one small wrapper per call with a `SAFETY:`
//! comment (kvm-ioctls / vmm-sys-util style). The wrappers return typed values (`OwnedFd`,
//! [`Regs`]) and [`SysError`]s that name the operation and the task.

pub mod calls;
pub mod cpu;
pub mod host;
pub mod inject;
pub mod proc;
pub mod ptrace;
pub mod sockdiag;
pub mod tracee;
pub mod tun;
pub mod uffd;

mod error;
pub use error::SysError;
pub use ptrace::Regs;

pub type Result<T> = std::result::Result<T, SysError>;
