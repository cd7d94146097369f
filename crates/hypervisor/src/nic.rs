//! Network devices of a VM, one enum variant per device kind.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// A MAC address (the guest NIC's; the agent finds the device by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// One network device of a VM.
#[derive(Debug, Clone)]
pub enum Nic {
    /// virtio-net on a tap that the caller opened (in the sandbox's network
    /// namespace). The VMM inherits the fd; the tap disappears when the last
    /// fd to it is closed.
    VirtioTap(TapNic),
}

/// A virtio-net device backed by an open tap.
#[derive(Debug, Clone)]
pub struct TapNic {
    /// Tap device name (in its namespace), for logs.
    pub tap_name: String,
    /// The open `/dev/net/tun` file attached to the tap.
    pub fd: Arc<OwnedFd>,
    /// Opened with IFF_VNET_HDR: the VMM may negotiate checksum and TSO
    /// offloads with the guest.
    pub vnet_hdr: bool,
    /// The guest device's MAC.
    pub mac: MacAddr,
    /// Guest MTU hint (virtio-net `host_mtu`); `None` leaves the default.
    pub mtu: Option<u32>,
}

impl TapNic {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Makes the tap fds of `nics` survive exec in a child about to exec the
/// VMM. Meant for `pre_exec`: only fcntl(2), which is async-signal-safe.
pub(crate) fn inherit_fds(fds: &[RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: F_GETFD/F_SETFD on an fd number only change this (child)
        // process's fd flags; an invalid fd yields an error, no UB.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw tap fds of `nics`.
pub(crate) fn tap_fds(nics: &[Nic]) -> Vec<RawFd> {
    nics.iter()
        .map(|n| match n {
            Nic::VirtioTap(t) => t.raw_fd(),
        })
        .collect()
}
