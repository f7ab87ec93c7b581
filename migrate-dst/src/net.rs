//! The vkernel's network on this host: its tun/tap devices recreated (through `netconf`)
//! before the fds attached to them, kept by the agent until the vkernel runs, then announced
//! so that the LAN's switches learn where the guest is now.
//!
//! Until [`Network::announce`], dropping a [`Network`] removes everything
//! it created: a restore that fails leaves no tap behind.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vkm_common::net::NetDev;
use vkm_netconf::Created;

use crate::DstError;

/// How often the guest's addresses are announced after it resumes (QEMU's default).
pub const ANNOUNCE_ROUNDS: u32 = 5;

/// The devices of one vkernel, created here.
pub struct Network {
    devs: Vec<(NetDev, Created)>,
}

impl Network {
    /// Create every device of `devs` in this network namespace, configured as recorded. On
    /// error, those created before are removed again.
    pub fn create(devs: &[NetDev]) -> Result<Network, DstError> {
        let mut net = Network { devs: Vec::new() };
        for d in devs {
            let created = vkm_netconf::create(d).map_err(|source| DstError::Net {
                ifname: d.name.clone(),
                source,
            })?;
            net.devs.push((d.clone(), created));
        }
        Ok(net)
    }

    /// No devices (a vkernel without tun/tap fds).
    pub fn empty() -> Network {
        Network { devs: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    /// A new fd on the open file description the agent holds for `ifname` (the first one the
    /// vkernel had on that device).
    pub(crate) fn attached(&self, ifname: &str) -> Option<BorrowedFd<'_>> {
        self.devs
            .iter()
            .find(|(d, _)| d.name == ifname)
            .and_then(|(_, c)| c.fd())
    }

    /// The vkernel runs: announce each guest's MAC (and IPs) through its tap, a few times with
    /// back-off, on a thread of its own, then let go of the agent's fds (the devices stay). The thread ends
    /// within a second; failures are logged (the guest runs either way, the LAN learns its
    /// port from its next frame).
    pub fn announce(mut self) {
        if self.devs.is_empty() {
            return;
        }
        // The devices are the vkernel's from now on: only the fds go to the thread.
        let mut jobs: Vec<(NetDev, OwnedFd)> = Vec::new();
        for (d, c) in self.devs.drain(..) {
            if let Some(fd) = c.into_fd() {
                jobs.push((d, fd));
            }
        }
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for (d, fd) in jobs {
                    // The vkernel's fd shares our open file description: its header size is ours.
                    let flags = d.tun_flags;
                    let vnet = vkm_sys::tun::get_vnet_hdr_sz(fd.as_fd()).unwrap_or(0);
                    if let Err(e) =
                        vkm_netconf::announce(fd.as_fd(), flags, vnet, &d, ANNOUNCE_ROUNDS)
                    {
                        tracing::warn!(ifname = %d.name, error = %e, "cannot announce the guest");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start announcing the guests");
        }
    }

    fn undo_all(&mut self) {
        for (d, c) in self.devs.drain(..) {
            if let Err(e) = c.undo() {
                tracing::warn!(ifname = %d.name, error = %e, "cannot remove a tap this restore created; remove it with `ip link del`");
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.undo_all();
    }
}

/// Give the restored process's fd on `ifname` its queue settings.
pub(crate) fn configure_fd(
    fd: &OwnedFd,
    flags: u16,
    vnet_hdr_sz: i32,
    sndbuf: i32,
) -> Result<(), DstError> {
    if flags & vkm_common::net::tun_flags::IFF_VNET_HDR != 0 && vnet_hdr_sz > 0 {
        vkm_sys::tun::set_vnet_hdr_sz(fd.as_fd(), vnet_hdr_sz)?;
    }
    if sndbuf > 0 {
        vkm_sys::tun::set_sndbuf(fd.as_fd(), sndbuf)?;
    }
    Ok(())
}
