//! Network namespaces by path: open one, and run code inside it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use super::NetError;

/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens `path` and checks that it is a network namespace.
pub fn open(path: &Path) -> Result<OwnedFd, NetError> {
    let err = |source| NetError::Netns {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags_cloexec()
        .open(path)
        .map_err(err)?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's
    // namespace type; on a file that is not a namespace it fails with ENOTTY.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 || kind != libc::CLONE_NEWNET {
        return Err(NetError::NotNetns(path.to_path_buf()));
    }
    Ok(file.into())
}

trait CloexecExt {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecExt for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

/// Runs `f` on a fresh thread that has joined the network namespace `ns`
/// (the calling thread's namespace never changes; the thread ends with `f`).
/// Sockets and taps that `f` creates belong to `ns`.
pub fn run_in<T: Send>(
    ns: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(NetError::Setns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(NetError::ThreadPanicked))
    })
}
