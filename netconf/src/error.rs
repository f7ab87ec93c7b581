use vkm_common::net::IfAddr;

/// The one error type of `netconf`. Each variant names the interface and the step; the cause
/// is only the `#[source]`.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("Cannot start the netlink thread")]
    Runtime(#[source] std::io::Error),
    #[error("Cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("The netlink thread panicked")]
    Panicked,
    /// A netlink request failed; `step` reads "set the MTU of", "list the addresses of", ...
    #[error("Cannot {step} {ifname}")]
    Netlink {
        step: &'static str,
        ifname: String,
        /// Boxed: rtnetlink's error embeds a whole netlink message.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// A tun ioctl failed; `step` as in [`NetconfError::Netlink`].
    #[error("Cannot {step} {ifname}")]
    Tun {
        step: &'static str,
        ifname: String,
        #[source]
        source: Box<vkm_sys::SysError>,
    },
    #[error("Cannot write an announcement frame to {ifname}")]
    Announce {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Route {route} through {ifname} mixes address families")]
    BadRoute { route: String, ifname: String },
    #[error("There is no interface {ifname}")]
    NotFound { ifname: String },
    #[error("Interface {ifname} is not a tun/tap device")]
    NotTun { ifname: String },
    #[error(
        "Interface {ifname} already exists on this host: delete it (ip link del {ifname}) or \
         choose another host"
    )]
    TapExists { ifname: String },
    #[error(
        "Bridge {bridge} (the master of {tap}) does not exist on this host: create it \
         (ip link add {bridge} type bridge) or mark it owned so that it is created"
    )]
    BridgeMissing { bridge: String, tap: String },
    #[error(
        "Interface {ifname} exists on this host but is not a bridge, so {tap} cannot be \
         enslaved to it: rename or delete it"
    )]
    NotABridge { ifname: String, tap: String },
    #[error(
        "Address {addr} of {wanted_by} is already assigned to {held_by} on this host: remove \
         it there (ip addr del {addr} dev {held_by}) or choose another host"
    )]
    AddressInUse {
        addr: IfAddr,
        wanted_by: String,
        held_by: String,
    },
}

pub type Result<T> = std::result::Result<T, NetconfError>;
