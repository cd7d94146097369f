//! File systems the host shares with the guest (rootfs, bind-mount sources).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use vessel_protocol::agent::Storage;

/// Why a storage could not be mounted.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum StorageError {
    /// storage mount point {0:?} must be an absolute path without `..`
    BadMountPoint(String),
    /// storage {tag:?} ({fstype}) has no source or fstype
    Incomplete { tag: String, fstype: String },
    /// mount {fstype} {tag:?} on {target}
    Mount {
        fstype: String,
        tag: String,
        target: String,
        #[source]
        err: nix::Error,
    },
    /// create storage mount point {0}
    CreateDir(String, #[source] std::io::Error),
}

/// Splits mount(8)-style options into flags and fs data.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options.iter().flat_map(|o| o.split(',')) {
        let flag = match opt {
            "ro" => MsFlags::MS_RDONLY,
            "rw" | "" | "defaults" => MsFlags::empty(),
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            other => {
                data.push(other);
                MsFlags::empty()
            }
        };
        flags |= flag;
    }
    (flags, data.join(","))
}

/// Mount points shared by containers, counted so that the last user unmounts.
#[derive(Default)]
pub struct Mounts {
    users: HashMap<PathBuf, usize>,
}

impl Mounts {
    /// Mounts `s` unless it is mounted already; returns its mount point.
    pub fn acquire(&mut self, s: &Storage) -> Result<PathBuf, StorageError> {
        let target = vessel_protocol::request::mount_point(&s.mount_point)
            .map_err(|_| StorageError::BadMountPoint(s.mount_point.clone()))?;
        if let Some(n) = self.users.get_mut(&target) {
            *n += 1;
            return Ok(target);
        }
        if s.source.is_empty() || s.fstype.is_empty() {
            return Err(StorageError::Incomplete {
                tag: s.source.clone(),
                fstype: s.fstype.clone(),
            });
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| StorageError::CreateDir(target.display().to_string(), e))?;
        let (flags, data) = parse_options(&s.options);
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(s.source.as_str()),
            &target,
            Some(s.fstype.as_str()),
            flags,
            data,
        )
        .map_err(|err| StorageError::Mount {
            fstype: s.fstype.clone(),
            tag: s.source.clone(),
            target: target.display().to_string(),
            err,
        })?;
        log::info!("mounted {} {} on {}", s.fstype, s.source, target.display());
        self.users.insert(target.clone(), 1);
        Ok(target)
    }

    /// Drops one user of `target`; unmounts it when none is left.
    pub fn release(&mut self, target: &Path) {
        let Some(n) = self.users.get_mut(target) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.users.remove(target);
            if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
                log::warn!("unmount {}: {e}", target.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_flags_and_data() {
        let opts = vec![
            "ro,nosuid".to_string(),
            "trans=virtio".to_string(),
            "version=9p2000.L,msize=512000".to_string(),
            "nodev".to_string(),
        ];
        let (flags, data) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        );
        assert_eq!(data, "trans=virtio,version=9p2000.L,msize=512000");
        assert_eq!(parse_options(&[]), (MsFlags::empty(), String::new()));
    }

    #[test]
    fn refuses_bad_mount_points() {
        let mut m = Mounts::default();
        for bad in ["relative", "/a/../etc", ""] {
            let s = Storage {
                source: "tag".into(),
                fstype: "virtiofs".into(),
                mount_point: bad.into(),
                ..Default::default()
            };
            assert!(matches!(m.acquire(&s), Err(StorageError::BadMountPoint(_))));
        }
    }
}
