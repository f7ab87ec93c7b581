//! tun/tap character-device ioctls (linux/if_tun.h, `Documentation/networking/tuntap.rst`).
//!
//! rtnetlink can list a tun device and show its `IFLA_TUN_*` attributes but the kernel refuses
//! `RTM_NEWLINK` of kind `tun`: a tun device exists only while an fd from `/dev/net/tun` is
//! attached to it (or it is persistent), so it is created here with `TUNSETIFF`.
//!
//! Every call acts on an fd of `/dev/net/tun` (ours, or a `pidfd_getfd` duplicate of the
//! vkernel's); the device is created in the network namespace of the calling thread.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::{Result, SysError};

const TUN_PATH: &CStr = c"/dev/net/tun";

/// An `ifreq` holding `name` (at most `IFNAMSIZ - 1` bytes, no NUL) and `flags`.
fn ifreq(name: &str, flags: u16) -> Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(SysError::errno("ioctl(TUNSETIFF)", 0, libc::EINVAL));
    }
    // SAFETY: `ifreq` is plain old data (arrays, integers and a union of such); all-zero is a
    // valid value of every field.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(ifr)
}

/// Open `/dev/net/tun` (`O_RDWR | O_CLOEXEC`) and attach it to interface `name` with
/// `TUNSETIFF(flags)`, creating the interface when it does not exist. `flags` are
/// [`vkm_common::net::tun_flags`] bits (`IFF_TAP | IFF_NO_PI`, ...). See
/// <https://docs.kernel.org/networking/tuntap.html>.
pub fn open_tun(name: &str, flags: u16) -> Result<OwnedFd> {
    let mut ifr = ifreq(name, flags)?;
    // SAFETY: the path is a NUL-terminated C string; open returns a new fd or -1.
    let raw = unsafe { libc::open(TUN_PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(SysError::path(
            "/dev/net/tun",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a freshly opened fd that nobody else owns; the OwnedFd closes it on
    // every error path below.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: TUNSETIFF reads and writes back one `struct ifreq`, which `ifr` is, on a
    // /dev/net/tun fd.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, std::ptr::addr_of_mut!(ifr)) };
    if r < 0 {
        return Err(SysError::last("ioctl(TUNSETIFF)", 0));
    }
    Ok(fd)
}

/// `TUNGETIFF`: the interface name and flags (`IFF_TUN`/`IFF_TAP`, `IFF_NO_PI`,
/// `IFF_VNET_HDR`, `IFF_MULTI_QUEUE`, `IFF_PERSIST`, ...) of an attached tun fd.
pub fn get_iff(fd: BorrowedFd<'_>) -> Result<(String, u16)> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `ifr`; a non-tun fd fails with ENOTTY
    // or EBADFD, no memory is touched then.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, std::ptr::addr_of_mut!(ifr)) };
    if r < 0 {
        return Err(SysError::last("ioctl(TUNGETIFF)", 0));
    }
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    // SAFETY: TUNGETIFF set `ifru_flags`, the union member every tun ioctl uses.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as u16;
    Ok((String::from_utf8_lossy(&name).into_owned(), flags))
}

/// An ioctl whose argument is an integer passed by value.
fn ioctl_value(
    fd: BorrowedFd<'_>,
    req: libc::Ioctl,
    arg: libc::c_ulong,
    op: &'static str,
) -> Result<()> {
    // SAFETY: for TUNSETPERSIST, TUNSETOWNER and TUNSETGROUP the kernel uses the argument as
    // a number and dereferences nothing.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(())
}

/// An ioctl that reads or writes one `int` through its pointer argument.
fn ioctl_int(
    fd: BorrowedFd<'_>,
    req: libc::Ioctl,
    val: &mut libc::c_int,
    op: &'static str,
) -> Result<()> {
    // SAFETY: TUN{GET,SET}VNETHDRSZ and TUN{GET,SET}SNDBUF copy exactly one `int` from or
    // to the pointer, which points at a live `c_int`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(val)) };
    if r < 0 {
        return Err(SysError::last(op, 0));
    }
    Ok(())
}

/// `TUNSETPERSIST`: keep the interface when its last fd closes (or not).
pub fn set_persist(fd: BorrowedFd<'_>, persist: bool) -> Result<()> {
    ioctl_value(
        fd,
        libc::TUNSETPERSIST,
        libc::c_ulong::from(persist),
        "ioctl(TUNSETPERSIST)",
    )
}

/// `TUNSETOWNER`: the uid allowed to attach to the (persistent) interface.
pub fn set_owner(fd: BorrowedFd<'_>, uid: u32) -> Result<()> {
    ioctl_value(
        fd,
        libc::TUNSETOWNER,
        libc::c_ulong::from(uid),
        "ioctl(TUNSETOWNER)",
    )
}

/// `TUNSETGROUP`: the gid allowed to attach to the (persistent) interface.
pub fn set_group(fd: BorrowedFd<'_>, gid: u32) -> Result<()> {
    ioctl_value(
        fd,
        libc::TUNSETGROUP,
        libc::c_ulong::from(gid),
        "ioctl(TUNSETGROUP)",
    )
}

/// `TUNGETVNETHDRSZ`: the size of the virtio-net header that prefixes each frame when
/// `IFF_VNET_HDR` is set.
pub fn get_vnet_hdr_sz(fd: BorrowedFd<'_>) -> Result<i32> {
    let mut v: libc::c_int = 0;
    ioctl_int(fd, libc::TUNGETVNETHDRSZ, &mut v, "ioctl(TUNGETVNETHDRSZ)")?;
    Ok(v)
}

/// `TUNSETVNETHDRSZ` (the kernel refuses sizes below 10).
pub fn set_vnet_hdr_sz(fd: BorrowedFd<'_>, size: i32) -> Result<()> {
    let mut v: libc::c_int = size;
    ioctl_int(fd, libc::TUNSETVNETHDRSZ, &mut v, "ioctl(TUNSETVNETHDRSZ)")
}

/// `TUNGETSNDBUF`: the queue's send buffer in bytes.
pub fn get_sndbuf(fd: BorrowedFd<'_>) -> Result<i32> {
    let mut v: libc::c_int = 0;
    ioctl_int(fd, libc::TUNGETSNDBUF, &mut v, "ioctl(TUNGETSNDBUF)")?;
    Ok(v)
}

/// `TUNSETSNDBUF` (the kernel refuses values ≤ 0).
pub fn set_sndbuf(fd: BorrowedFd<'_>, bytes: i32) -> Result<()> {
    let mut v: libc::c_int = bytes;
    ioctl_int(fd, libc::TUNSETSNDBUF, &mut v, "ioctl(TUNSETSNDBUF)")
}
