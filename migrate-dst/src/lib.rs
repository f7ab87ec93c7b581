//! The destination side: recreating a vkernel from its state, in a fresh PID + time namespace
//! under a shim, with every PID/TID, mapping, fd and register as it was.

mod files;
pub mod net;
mod restore;
pub mod sandbox;

pub use net::Network;
pub use restore::{
    check_compat, check_offer, restore, vdso_hash, PageTargets, RestoreReport, Skeleton,
};
pub use sandbox::{InitMode, Sandbox};

/// Everything that can make a restore fail. A failed restore leaves nothing behind: the
/// caller kills the sandbox's init, which takes every half-made process with it.
#[derive(Debug, thiserror::Error)]
pub enum DstError {
    #[error(transparent)]
    Sys(#[from] vkm_sys::SysError),
    #[error("Cannot read the image")]
    Image(#[from] vkm_common::error::CommonError),
    #[error("The UML did not carry out `{command}` on its mconsole")]
    Mconsole {
        command: &'static str,
        #[source]
        source: vkm_common::error::CommonError,
    },
    #[error("The image holds no vkernel description before its pages")]
    NoMeta,
    #[error("Restore failed at step '{step}' for process {pid}")]
    Step {
        step: &'static str,
        pid: i32,
        #[source]
        source: Box<DstError>,
    },
    #[error("The image is inconsistent: {0}")]
    Inconsistent(String),
    #[error("This host cannot run the vkernel: {0}")]
    Incompatible(String),
    #[error("The sandbox's init failed: {0}")]
    Init(String),
    #[error("Cannot recreate {ifname}, a tun/tap device of the vkernel")]
    Net {
        ifname: String,
        #[source]
        source: vkm_netconf::NetconfError,
    },
}
