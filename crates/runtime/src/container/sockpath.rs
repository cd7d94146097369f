//! Unix socket paths longer than `sun_path` (108 bytes).
//!
//! A container's state directory is `<root>/<id>`, and clients choose both:
//! docker passes `--root /run/docker/runtime-runc/moby` and a 64-character id,
//! so `<dir>/supervisor.sock` is 112 bytes and `bind`/`connect` fail with
//! "path must be shorter than SUN_LEN". runc keeps no socket there; we do. A
//! long path is reached through `/proc/self/fd/<fd of its directory>/<name>`,
//! which the kernel resolves like the real path (the socket inode lives in
//! the real directory) and which is short whatever the directory's length.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Longest path used as is (`sun_path` is 108 bytes with its NUL).
const MAX_DIRECT: usize = 107;

/// A path to pass to `bind`/`connect` for a socket at some path; keep it
/// alive until the call returns (it may hold the directory open).
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    _dir: Option<File>,
}

impl SocketPath {
    /// `path` itself when it fits in `sun_path`, else the `/proc/self/fd`
    /// alias through its directory (which must exist).
    pub fn new(path: &Path) -> io::Result<SocketPath> {
        if path.as_os_str().len() <= MAX_DIRECT {
            return Ok(SocketPath {
                path: path.to_path_buf(),
                _dir: None,
            });
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket path has no directory and file name",
            ));
        };
        let dir = File::open(parent)?;
        let alias = Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name);
        if alias.as_os_str().len() > MAX_DIRECT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "socket file name too long",
            ));
        }
        Ok(SocketPath {
            path: alias,
            _dir: Some(dir),
        })
    }

    pub fn as_path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn long_paths_bind_and_connect_in_the_real_directory() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("d".repeat(120));
        std::fs::create_dir(&dir).unwrap();
        let sock = dir.join("supervisor.sock");
        assert!(sock.as_os_str().len() > 108);
        // The plain path is refused: this is what the alias is for.
        assert!(UnixListener::bind(&sock).is_err());
        let l = UnixListener::bind(SocketPath::new(&sock).unwrap().as_path()).unwrap();
        assert!(sock.exists(), "the socket is in the real directory");
        let mut c = UnixStream::connect(SocketPath::new(&sock).unwrap().as_path()).unwrap();
        c.write_all(b"hi").unwrap();
        let mut got = [0; 2];
        l.accept().unwrap().0.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn short_paths_are_used_as_is() {
        let p = Path::new("/run/x/supervisor.sock");
        assert_eq!(SocketPath::new(p).unwrap().as_path(), p);
    }

    #[test]
    fn a_long_path_in_a_missing_directory_is_an_error() {
        let p = PathBuf::from(format!("/nonexistent/{}/s.sock", "x".repeat(120)));
        assert!(SocketPath::new(&p).is_err());
    }
}
