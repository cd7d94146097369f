//! Tap devices, created inside the sandbox's network namespace.

use std::os::fd::{AsRawFd, OwnedFd};

use super::NetError;

/// `_IOW('T', 202, int)`: attach the fd to a (new) tun/tap device.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`: offloads the reader can take.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap: the device lives as long as this fd (and the VMM's copy).
pub struct Tap {
    pub name: String,
    pub fd: OwnedFd,
    /// Opened with IFF_VNET_HDR and checksum/TSO offloads accepted.
    pub offloads: bool,
}

/// Creates tap `name` in the calling thread's network namespace. Tries a
/// virtio-net header first (checksum and TSO offloads for the guest), then
/// falls back to a plain tap.
pub fn create(name: &str) -> Result<Tap, NetError> {
    match open(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) {
        Ok(fd) => {
            // QEMU renegotiates with the guest's features; this checks that
            // the tap takes checksum and TSO offloads at all.
            let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes an unsigned long by value; the fd
            // is a tap we own.
            let ok = unsafe {
                libc::ioctl(
                    fd.as_raw_fd(),
                    TUNSETOFFLOAD as _,
                    offloads as libc::c_ulong,
                )
            } == 0;
            if !ok {
                log::info!(
                    "tap {name}: no checksum/TSO offloads: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(Tap {
                name: name.into(),
                fd,
                offloads: ok,
            })
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let fd = open(name, IFF_TAP | IFF_NO_PI).map_err(|source| NetError::Tap {
                tap: name.into(),
                source,
            })?;
            Ok(Tap {
                name: name.into(),
                fd,
                offloads: false,
            })
        }
        Err(source) => Err(NetError::Tap {
            tap: name.into(),
            source,
        }),
    }
}

fn open(name: &str, flags: libc::c_short) -> std::io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is a
    // correctly sized, initialized ifreq (name, flags, padding to 40 bytes)
    // that outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    super::netns::above_low_fds(file.into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ifreq_is_40_bytes() {
        assert_eq!(std::mem::size_of::<super::IfReq>(), 40);
    }
}
