//! Per-container lock: commands on one container serialize, different
//! containers proceed in parallel.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{ContainerError, Result};

pub const LOCK_FILE: &str = "lock";

/// An exclusive `flock` on `<dir>/lock`, released on drop.
pub struct ContainerLock {
    _file: File,
}

impl ContainerLock {
    /// Blocks until the lock is ours.
    pub fn acquire(dir: &Path, id: &str) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = match std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContainerError::NotFound(id.to_string()))
            }
            Err(e) => return Err(ContainerError::io(&path, e)),
        };
        loop {
            // SAFETY: flock on an fd we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ContainerError::io(&path, e));
            }
        }
        // A concurrent delete may have removed the directory while we waited.
        if !dir.join(super::state::STATE_FILE).exists() && !dir.exists() {
            return Err(ContainerError::NotFound(id.to_string()));
        }
        Ok(ContainerLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
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
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "second lock taken while held");
        drop(held);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        assert!(matches!(
            ContainerLock::acquire(&dir.path().join("gone"), "g"),
            Err(ContainerError::NotFound(_))
        ));
    }
}
