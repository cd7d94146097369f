//! Per-container lock: commands on one container serialize, different
//! containers proceed in parallel.
//!
//! The lock file is `<root>/.locks/<id>`, OUTSIDE the container directory
//! that `delete` removes, so taking the lock never re-creates a deleted
//! container. `delete` unlinks the lock file while it holds the lock; a
//! waiter then finds its locked inode no longer at the path and starts over
//! on a fresh file (the usual flock + unlink protocol), so two holders never
//! coexist and nothing is left behind.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{validate_id, ContainerError, Result};

/// Directory of the lock files under the state root (not a valid id, so
/// `list` never shows it).
pub const LOCK_DIR: &str = ".locks";

/// An exclusive `flock` on `<root>/.locks/<id>`, released on drop.
#[derive(Debug)]
pub struct ContainerLock {
    file: File,
    path: PathBuf,
}

impl ContainerLock {
    /// Blocks until the lock of `id` under `root` is ours. It does not check
    /// that the container exists (callers look under the lock), but fails
    /// with `NotFound` when `root` itself does not exist.
    pub fn acquire(root: &Path, id: &str) -> Result<Self> {
        validate_id(id)?;
        let dir = root.join(LOCK_DIR);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContainerError::NotFound(id.to_string()))
            }
            Err(e) => return Err(ContainerError::io(&dir, e)),
        }
        let path = dir.join(id);
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| ContainerError::io(&path, e))?;
            flock(&file).map_err(|e| ContainerError::io(&path, e))?;
            // Still the file at `path`? A holder may have removed it while we waited.
            let held = file.metadata().map_err(|e| ContainerError::io(&path, e))?;
            match std::fs::symlink_metadata(&path) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(ContainerLock { file, path })
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ContainerError::io(&path, e)),
            }
        }
    }

    /// Releases the lock and removes its file: the container is gone. Only
    /// the holder may do this (waiters notice and retry on a new file).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing lock {}: {e}", self.path.display());
            }
        }
        drop(self.file);
    }
}

fn flock(file: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on an fd we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn serializes() {
        let dir = tempfile::tempdir().unwrap();
        let held = ContainerLock::acquire(dir.path(), "c").unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (d2, p) = (done.clone(), dir.path().to_path_buf());
        let t = std::thread::spawn(move || {
            let _l = ContainerLock::acquire(&p, "c").unwrap();
            d2.store(true, Ordering::SeqCst);
        });
        // A blocked waiter cannot be observed without waiting a little.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "second lock taken while held");
        drop(held);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert!(matches!(
            ContainerLock::acquire(dir.path(), "../x"),
            Err(ContainerError::InvalidId(_))
        ));
        assert!(matches!(
            ContainerLock::acquire(&dir.path().join("no-root"), "c"),
            Err(ContainerError::NotFound(_))
        ));
    }

    #[test]
    fn removal_while_others_wait_keeps_mutual_exclusion() {
        let dir = tempfile::tempdir().unwrap();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (p, inside) = (dir.path().to_path_buf(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let l = ContainerLock::acquire(&p, "c").unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        if i % 2 == 0 {
                            l.remove();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        ContainerLock::acquire(dir.path(), "c").unwrap().remove();
        assert_eq!(
            std::fs::read_dir(dir.path().join(LOCK_DIR))
                .unwrap()
                .count(),
            0
        );
    }
}
