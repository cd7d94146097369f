//! Kernel uevents (`NETLINK_KOBJECT_UEVENT`): woken when a device is added or
//! bound, e.g. a hot-plugged vsock or virtio-fs device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// Largest uevent message read (the kernel's UEVENT_BUFFER_SIZE is 2048).
const MAX_MESSAGE: usize = 8192;

/// A socket subscribed to the kernel's uevent multicast group.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    pub fn open() -> std::io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; returns a new fd or -1.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: socket just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = 1; // the kernel's uevents
                            // SAFETY: bind with a pointer to a live sockaddr_nl and its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The OwnedFd moves into the AsyncFd, which owns it for its whole life
        // (the I/O-safety concern behind the deprecation does not arise).
        #[allow(deprecated)]
        let fd = AsyncFd::new(fd)?;
        Ok(Listener { fd })
    }

    /// Waits for the next uevent (or batch of them) and discards it.
    pub async fn next(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut ready = self.fd.readable().await?;
            // SAFETY: recv into a buffer of `buf.len()` bytes we own.
            let n = unsafe {
                libc::recv(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => ready.clear_ready(),
                std::io::ErrorKind::Interrupted => {}
                // ENOBUFS: events were dropped, which is still news.
                _ if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}
