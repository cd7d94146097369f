//! Opening a tap device with a virtio-net header.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use super::VNET_HDR_LEN;

/// Errors opening the tap.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TapError {
    /// Cannot open /dev/net/tun: {0}
    OpenTun(std::io::Error),
    /// Tap name {0:?} is empty or longer than 15 bytes
    Name(String),
    /// Cannot attach to tap {0} (TUNSETIFF; needs CAP_NET_ADMIN or a tap owned by this user): {1}
    SetIff(String, std::io::Error),
    /// Cannot configure tap {0}: {1}
    Configure(String, std::io::Error),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (or creates, with privileges) tap `name`, non-blocking, with a 12-byte vnet header
/// and no offloads.
pub fn open_tap(name: &str) -> Result<File, TapError> {
    if name.is_empty() || name.len() > 15 {
        return Err(TapError::Name(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out (40 bytes); the
    // fd is a tun device we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(TapError::SetIff(
            name.into(),
            std::io::Error::last_os_error(),
        ));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(TapError::Configure(
            name.into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; 0 turns all offloads off.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(TapError::Configure(
            name.into(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}
