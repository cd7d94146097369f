//! The tap behind a virtio-net device: opened by name (with privileges), or handed over as
//! an open fd (the runtime opens the tap in the sandbox's network namespace and the VMM,
//! jailed and unprivileged, inherits it).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// Errors opening or adopting the tap.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TapError {
    /// Cannot open /dev/net/tun
    OpenTun(#[source] std::io::Error),
    /// Tap name {0:?} is empty or longer than 15 bytes
    Name(String),
    /// Cannot attach to tap {0} (TUNSETIFF; needs CAP_NET_ADMIN or a tap owned by this user)
    SetIff(String, #[source] std::io::Error),
    /// Cannot configure tap {0}
    Configure(String, #[source] std::io::Error),
    /// fd {0} is not an open tap device (TUNGETIFF)
    NotATap(i32, #[source] std::io::Error),
    /// fd {0} is a tun device, not a tap (no Ethernet frames)
    NotTapMode(i32),
    /// fd {0} is a tap with packet information (IFF_NO_PI is not set)
    PacketInfo(i32),
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// TUNSETOFFLOAD: the reader (we) takes frames with a partial checksum.
pub const TUN_F_CSUM: u32 = 0x01;
/// TUNSETOFFLOAD: the reader takes TCPv4 segmentation-offload frames.
pub const TUN_F_TSO4: u32 = 0x02;
/// TUNSETOFFLOAD: the reader takes TCPv6 segmentation-offload frames.
pub const TUN_F_TSO6: u32 = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap (or, in tests, any fd that keeps frame boundaries).
#[derive(Debug)]
pub struct Tap {
    /// Non-blocking; one frame per read/write, with a [`VNET_HDR_LEN`] header first when
    /// `vnet_hdr`.
    pub file: File,
    /// Frames carry a virtio-net header (IFF_VNET_HDR, header size set to 12).
    pub vnet_hdr: bool,
    /// The tap accepted checksum and TSO offloads (TUNSETOFFLOAD): the device may offer
    /// the guest GUEST_CSUM and GUEST_TSO4/6.
    pub offloads: bool,
    /// A real tap, on which TUNSETOFFLOAD is called when the guest negotiates.
    is_tap: bool,
    /// For messages.
    pub name: String,
}

impl Tap {
    /// Opens (or creates, with privileges) tap `name`, non-blocking, with a 12-byte vnet
    /// header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
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
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq` lays out (40 bytes);
        // the fd is a tun device we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::SetIff(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        Self::configure(file, name.to_string(), true)
    }

    /// Adopts the inherited fd `raw`, which the VMM's caller handed over: takes ownership
    /// only once it is known to be a tap (anything else is left alone). Checks that the tap
    /// has no packet information; makes it non-blocking and close-on-exec.
    pub fn from_inherited(raw: RawFd) -> Result<Tap, TapError> {
        let name = Self::check(raw)?;
        // SAFETY: `raw` is an open tun device (TUNGETIFF answered) that the configuration
        // names as handed to this process, each fd once (VmConfig::validate), and that is
        // adopted before the VMM opens any tap of its own: nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Self::adopt(fd, name)
    }

    /// The tap's name if `raw` is a tap without packet information.
    fn check(raw: RawFd) -> Result<(String, bool), TapError> {
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an `ifreq` (40 bytes, laid out by `IfReq`) for a tun fd
        // and fails with EBADFD/ENOTTY/EINVAL for anything else; `req` outlives the call.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATap(raw, std::io::Error::last_os_error()));
        }
        if req.flags & IFF_TAP == 0 {
            return Err(TapError::NotTapMode(raw));
        }
        if req.flags & IFF_NO_PI == 0 {
            return Err(TapError::PacketInfo(raw));
        }
        let len = req.name.iter().position(|b| *b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        Ok((name, req.flags & IFF_VNET_HDR != 0))
    }

    fn adopt(fd: OwnedFd, (name, vnet_hdr): (String, bool)) -> Result<Tap, TapError> {
        let file = File::from(fd);
        set_fd_flags(file.as_raw_fd()).map_err(|e| TapError::Configure(name.clone(), e))?;
        Self::configure(file, name, vnet_hdr)
    }

    fn configure(file: File, name: String, vnet_hdr: bool) -> Result<Tap, TapError> {
        let raw = file.as_raw_fd();
        let mut tap = Tap {
            file,
            vnet_hdr,
            offloads: false,
            is_tap: true,
            name,
        };
        if vnet_hdr {
            let hdr_len = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
            if unsafe { libc::ioctl(raw, TUNSETVNETHDRSZ, &hdr_len) } < 0 {
                return Err(TapError::Configure(
                    tap.name,
                    std::io::Error::last_os_error(),
                ));
            }
            // Probe, then off until the guest says what it takes (activation).
            tap.offloads = tap
                .set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                .is_ok();
        }
        tap.set_offload(0)
            .map_err(|e| TapError::Configure(tap.name.clone(), e))?;
        Ok(tap)
    }

    /// Tells the tap which offloaded frames (TUN_F_*) it may hand us; a tap without a vnet
    /// header (or a test backend) ignores this.
    pub fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        if !self.is_tap || (!self.vnet_hdr && flags == 0) {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a tap we own.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A test backend: any packet-preserving fd (a datagram socket), set non-blocking.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn fake(file: File, vnet_hdr: bool, offloads: bool) -> Tap {
        set_fd_flags(file.as_raw_fd()).unwrap();
        Tap {
            file,
            vnet_hdr,
            offloads,
            is_tap: false,
            name: "test".into(),
        }
    }
}

/// O_NONBLOCK (a file status flag, shared with other holders of the same open file, as
/// QEMU does it too) and FD_CLOEXEC (this fd only).
fn set_fd_flags(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd_fl = libc::fcntl(fd, libc::F_GETFD);
        if fd_fl < 0 || libc::fcntl(fd, libc::F_SETFD, fd_fl | libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_40_bytes() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn an_fd_that_is_not_a_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_inherited(f.as_raw_fd()).unwrap_err();
        assert!(matches!(e, TapError::NotATap(..)), "{e}");
        vessel_testutil::assert_cause_printed_once(&e);
        // Still open: a refused fd is not taken over (and closed).
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &f, &mut buf).unwrap(), 0);
    }
}
