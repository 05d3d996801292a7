//! Persistent tap devices, made in the calling thread's network namespace
//! through /dev/net/tun. Persistent: the fd that made it is closed at
//! once, and the VMM (running in that namespace) opens it by name.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use crate::NetError;

/// `_IOW('T', 202, int)` and `_IOW('T', 203, int)` of <linux/if_tun.h>.
pub(crate) const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
pub(crate) const IFF_TAP: libc::c_short = 0x0002;
pub(crate) const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
pub(crate) struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request for the tap `name` (shorter than IFNAMSIZ, so the zeroed
    /// rest terminates it) with `flags`.
    pub(crate) fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    }
}

/// Creates the persistent tap `name` (no packet info), multi-queue when
/// asked: the VMM then opens one queue per vCPU. The flag is the device's
/// for its life: whoever opens it must ask for the same.
pub(crate) fn create(name: &str, multi_queue: bool) -> Result<(), NetError> {
    let error = |source| NetError::Tap {
        name: name.to_string(),
        source,
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(error(std::io::ErrorKind::InvalidInput.into()));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(error)?;
    let flags = IFF_TAP | IFF_NO_PI | if multi_queue { IFF_MULTI_QUEUE } else { 0 };
    let mut req = IfReq::new(name, flags);
    // SAFETY: `tun` is an open /dev/net/tun; TUNSETIFF reads an ifreq,
    // which `req` is (name NUL-terminated: shorter than IFNAMSIZ, zeroed).
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an int by value; `tun` is attached.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    Ok(())
}
