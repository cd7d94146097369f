//! Network namespaces by path: open one, and run code inside it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

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
    above_low_fds(file.into()).map_err(err)
}

trait CloexecExt {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecExt for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
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

/// Duplicates `fd` to a number above the standard fds and the few low fds
/// that children get by position (the readiness pipe, a console at fd 3):
/// an fd handed to a VMM by number must not be overwritten by a dup2 onto
/// one of those in the child.
pub fn above_low_fds(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    const FLOOR: RawFd = 10;
    if fd.as_raw_fd() >= FLOOR {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd owned by `fd` returns a new fd (or -1)
    // that nothing else owns.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FLOOR) };
    if high < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `high` is a fresh fd owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(high) })
}

/// Makes a new, empty network namespace (only `lo`) and keeps it alive by a
/// bind mount at `path` (a new file), as `ip netns add` does. On error
/// nothing is left at `path`.
pub fn create(path: &Path) -> Result<(), NetError> {
    let err = |source| NetError::Netns {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(err)?;
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            // The thread's own namespace: it ends with the thread, unless
            // the bind mount keeps it.
            unshare(CloneFlags::CLONE_NEWNET).map_err(NetError::Setns)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| err(e.into()))
        })
        .join()
        .unwrap_or(Err(NetError::ThreadPanicked))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Removes a namespace made by [`create`]: unmounts and unlinks `path`
/// (the namespace ends with its last user). Idempotent.
pub fn remove(path: &Path) -> Result<(), NetError> {
    let err = |source| NetError::Netns {
        path: path.to_path_buf(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(err(e.into())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}
