//! The jail directory on the host: `<jail_root>/<id>/{jailer.lock, root/}`.
//!
//! A jailer holds an exclusive `flock` on `jailer.lock` for as long as it lives, so a
//! second jailer for the same id can tell a live jail (lock held: refuse) from one left
//! by a jailer that was SIGKILLed (lock free: remove it and its cgroup, then start).
//! Everything under `root/` is created here in the host's mount namespace as plain
//! files, directories and device nodes; the mounts onto them happen only in the VMM's
//! own mount namespace ([`crate::child`]), so removing the directory never meets a mount.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};

use crate::spec::{host_path, Bind};

/// The lock file's name beside `root/`.
const LOCK_FILE: &str = "jailer.lock";

/// Jail directory failures.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum JailError {
    /// a jailer for id {id:?} is running (it holds {lock:?}): stop it first or choose another id
    Busy { id: String, lock: PathBuf },
    /// jail {what} {path:?}
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// device {path:?} missing on the host (needed in the jail)
    NoDevice {
        path: &'static str,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What a jail entry is, to create the right mount target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// A held jail directory. Dropping it keeps the directory (see [`JailDir::remove`]).
#[derive(Debug)]
pub struct JailDir {
    dir: PathBuf,
    /// Holds the flock while the jailer lives (the VMM closes its copy before exec);
    /// only ever dropped.
    _lock: Flock<File>,
    /// True when a previous jailer of this id left its jail behind.
    stale: bool,
}

/// A device node the jail gets at the same path as on the host (whose device numbers it
/// copies), its mode, and whether it belongs to the VMM's user (kvm, tun) or stays
/// root's (urandom, 0666).
struct Device {
    path: &'static str,
    mode: u32,
    owned_by_vmm: bool,
}

const KVM: Device = Device {
    path: "/dev/kvm",
    mode: 0o600,
    owned_by_vmm: true,
};
const URANDOM: Device = Device {
    path: "/dev/urandom",
    mode: 0o666,
    owned_by_vmm: false,
};
const TUN: Device = Device {
    path: "/dev/net/tun",
    mode: 0o600,
    owned_by_vmm: true,
};

impl JailDir {
    /// Creates (or reuses) `<jail_root>/<id>` and takes its lock. Changes nothing when the
    /// lock is held by a live jailer.
    pub fn acquire(jail_root: &Path, id: &str) -> Result<JailDir, JailError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(jail_root)
            .map_err(io("create", jail_root))?;
        let dir = jail_root.join(id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io("create", &dir)(e)),
            _ => {}
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io("open lock", &lock_path))?;
        let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(JailError::Busy {
                    id: id.into(),
                    lock: lock_path,
                })
            }
            Err((_, e)) => return Err(io("lock", &lock_path)(e.into())),
        };
        let stale = dir.join("root").exists();
        Ok(JailDir {
            dir,
            _lock: lock,
            stale,
        })
    }

    /// Whether a SIGKILLed jailer left this jail behind (its `root/` still exists).
    pub fn is_stale(&self) -> bool {
        self.stale
    }

    /// `<jail_root>/<id>/root`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Removes a stale `root/` (plain files on the host: its mounts died with the VMM's
    /// mount namespace).
    pub fn clear_stale(&mut self) -> Result<(), JailError> {
        let root = self.root();
        remove_tree(&root)?;
        self.stale = false;
        Ok(())
    }

    /// Creates `root/` with its device nodes: /dev/kvm and (with `tun`) /dev/net/tun
    /// owned by `uid:gid`, mode 0600; /dev/urandom 0666.
    pub fn create_root(&self, uid: u32, gid: u32, tun: bool) -> Result<PathBuf, JailError> {
        let root = self.root();
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(io("create", &root))?;
        let mut devices = vec![KVM, URANDOM];
        if tun {
            devices.push(TUN);
        }
        for dev in devices {
            let host = std::fs::metadata(dev.path).map_err(|source| JailError::NoDevice {
                path: dev.path,
                source,
            })?;
            use std::os::unix::fs::MetadataExt;
            let target = host_path(&root, Path::new(dev.path));
            make_parents(&root, &target)?;
            mknod(
                &target,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(dev.mode),
                host.rdev(),
            )
            .map_err(|e| io("mknod", &target)(e.into()))?;
            // mknod's mode went through the umask; set it exactly.
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(dev.mode))
                .map_err(io("chmod", &target))?;
            if dev.owned_by_vmm {
                chown(&target, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .map_err(|e| io("chown", &target)(e.into()))?;
            }
        }
        Ok(root)
    }

    /// Creates the mount target for `bind` (an empty file or directory, like its source).
    pub fn create_target(&self, bind: &Bind, kind: Kind) -> Result<PathBuf, JailError> {
        let root = self.root();
        let target = host_path(&root, &bind.jail);
        make_parents(&root, &target)?;
        match kind {
            Kind::Dir => std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&target)
                .map_err(io("create", &target))?,
            Kind::File => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&target)
                    .map_err(io("create", &target))?;
            }
        }
        Ok(target)
    }

    /// Removes the whole `<jail_root>/<id>` (the lock goes last, with this value).
    pub fn remove(self) -> Result<(), JailError> {
        remove_tree(&self.dir)
    }
}

/// Creates the directories between `root` and `target` (mode 0755, root-owned). Only
/// directories the jailer made are walked: nothing in a fresh jail is a symlink.
fn make_parents(root: &Path, target: &Path) -> Result<(), JailError> {
    let parent = target.parent().unwrap_or(root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(io("create", parent))
}

/// `rm -rf` that does not follow symlinks (std's remove_dir_all does not).
fn remove_tree(p: &Path) -> Result<(), JailError> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io("remove", p)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_refuses_a_second_holder_and_tells_stale_apart() {
        let base = tempfile::tempdir().unwrap();
        let a = JailDir::acquire(base.path(), "x").unwrap();
        assert!(!a.is_stale());
        let e = JailDir::acquire(base.path(), "x").unwrap_err();
        assert!(e.to_string().contains("is running"), "{e}");
        // A jailer that died (its lock fd closed) with root/ still there: stale.
        std::fs::create_dir(a.root()).unwrap();
        std::fs::write(a.root().join("leftover"), "").unwrap();
        drop(a);
        let mut b = JailDir::acquire(base.path(), "x").unwrap();
        assert!(b.is_stale());
        b.clear_stale().unwrap();
        assert!(!b.root().exists());
        b.remove().unwrap();
        assert!(!base.path().join("x").exists());
    }

    #[test]
    fn targets_mirror_the_source_kind() {
        let base = tempfile::tempdir().unwrap();
        let j = JailDir::acquire(base.path(), "t").unwrap();
        std::fs::create_dir(j.root()).unwrap();
        let bind = |jail: &str| Bind {
            host: "/unused".into(),
            jail: jail.into(),
        };
        let f = j
            .create_target(&bind("/boot/k/vmlinux"), Kind::File)
            .unwrap();
        assert_eq!(f, j.root().join("boot/k/vmlinux"));
        assert!(f.is_file());
        let d = j.create_target(&bind("/run"), Kind::Dir).unwrap();
        assert!(d.is_dir());
    }
}
