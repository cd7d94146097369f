//! Snapshots of a whole VM (memory, vCPU and device state) on disk.
//!
//! A snapshot directory holds the backend's own files (QEMU: one migration
//! stream; vessel-vmm: `state.json` and `memory`) and [`SNAPSHOT_INFO`], written
//! last, which names the backend and the VM shape a restore must reproduce. A
//! directory without it is incomplete and is never restored.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{AgentChannel, Error, Result, VmConfig};

/// The description file of a snapshot directory.
pub const SNAPSHOT_INFO: &str = "vessel-snapshot.json";
/// Format revision of [`SnapshotInfo`].
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Largest description file accepted.
const MAX_INFO_BYTES: u64 = 64 * 1024;

/// What a restore needs to know about the snapshotted VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub format: u32,
    /// Backend that wrote it (`qemu`, `builtin`); only that backend restores it.
    pub backend: String,
    /// Accelerator the VM ran on (`kvm`, `tcg`).
    pub accelerator: crate::Accelerator,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_args: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// `vsock` or `serial`.
    pub channel: AgentChannel,
    /// The VM's virtio-fs devices (tag, read-only), in device order: a restore
    /// must give each its own share with the same tag.
    #[serde(default)]
    pub shares: Vec<(String, bool)>,
    /// The MAC of each of the VM's NICs, in order: a restore must give as many
    /// taps, and the guest sees these MACs until it is told its own.
    #[serde(default)]
    pub nics: Vec<[u8; 6]>,
    /// The VM was started with [`VmConfig::deferred_devices`] (QEMU: no
    /// vhost-user device yet, the agent on virtio-serial): a restore starts
    /// the same shape and the caller attaches the devices afterwards.
    #[serde(default)]
    pub deferred_devices: bool,
}

impl SnapshotInfo {
    /// Describes a VM started from `cfg` by `backend`.
    pub fn of(backend: &str, accelerator: crate::Accelerator, cfg: &VmConfig) -> Self {
        SnapshotInfo {
            format: SNAPSHOT_FORMAT,
            backend: backend.to_string(),
            accelerator,
            kernel: cfg.kernel.clone(),
            initramfs: cfg.initramfs.clone(),
            kernel_args: cfg.kernel_args.clone(),
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            channel: cfg.channel,
            shares: shares_of(cfg),
            nics: cfg
                .nics
                .iter()
                .map(|n| match n {
                    crate::Nic::VirtioTap(t) => t.mac.0,
                })
                .collect(),
            deferred_devices: false,
        }
    }

    /// Reads and checks `dir/vessel-snapshot.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        use std::io::Read;
        let path = dir.join(SNAPSHOT_INFO);
        let io = |source| Error::Io {
            what: format!("read snapshot description {}", path.display()),
            source,
        };
        let mut text = Vec::new();
        std::fs::File::open(&path)
            .map_err(io)?
            .take(MAX_INFO_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(io)?;
        Self::parse(&text, &path)
    }

    /// Parses and checks the contents of `path`, a `vessel-snapshot.json`.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self> {
        if text.len() as u64 > MAX_INFO_BYTES {
            return Err(Error::InvalidConfig(format!(
                "{} is larger than {MAX_INFO_BYTES} bytes",
                path.display()
            )));
        }
        let info: SnapshotInfo = serde_json::from_slice(text).map_err(|e| {
            Error::InvalidConfig(format!(
                "{} is not a snapshot description: {e}",
                path.display()
            ))
        })?;
        if info.format != SNAPSHOT_FORMAT {
            return Err(Error::InvalidConfig(format!(
                "{} has format {}, this runtime reads {SNAPSHOT_FORMAT}",
                path.display(),
                info.format
            )));
        }
        Ok(info)
    }

    /// Writes `dir/vessel-snapshot.json` atomically (the snapshot is complete
    /// once it exists).
    pub fn store(&self, dir: &Path) -> Result<()> {
        let path = dir.join(SNAPSHOT_INFO);
        let tmp = dir.join(format!(".{SNAPSHOT_INFO}.tmp"));
        let io = |source| Error::Io {
            what: format!("write {}", path.display()),
            source,
        };
        let text = serde_json::to_vec_pretty(self).expect("SnapshotInfo serializes");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Checks that `cfg` (the VM to restore into) has the snapshot's shape.
    pub fn check_matches(&self, backend: &str, cfg: &VmConfig) -> Result<()> {
        if self.backend != backend {
            return Err(Error::InvalidConfig(format!(
                "the snapshot was written by the {} backend; it cannot be restored by {backend}",
                self.backend
            )));
        }
        let want = (self.vcpus, self.memory_mib, self.channel);
        let got = (cfg.vcpus, cfg.memory_mib, cfg.channel);
        if want != got {
            return Err(Error::InvalidConfig(format!(
                "the snapshot is of a VM with {} vCPUs, {} MiB and the {} channel; asked to restore {} vCPUs, {} MiB, {} channel",
                want.0, want.1, want.2, got.0, got.1, got.2
            )));
        }
        // A deferred VM's network devices are plugged in after the restore.
        if !self.deferred_devices && self.nics.len() != cfg.nics.len() {
            return Err(Error::InvalidConfig(format!(
                "the snapshot's VM has {} network devices; asked to restore with {}",
                self.nics.len(),
                cfg.nics.len()
            )));
        }
        let got = shares_of(cfg);
        if self.shares != got {
            return Err(Error::InvalidConfig(format!(
                "the snapshot's VM has shares (tag, read-only) {:?}; asked to restore with {got:?}",
                self.shares
            )));
        }
        if self.deferred_devices != cfg.deferred_devices {
            return Err(Error::InvalidConfig(format!(
                "the snapshot's VM was started {} deferred devices; asked to restore {}",
                if self.deferred_devices {
                    "with"
                } else {
                    "without"
                },
                if cfg.deferred_devices {
                    "with them"
                } else {
                    "without"
                }
            )));
        }
        Ok(())
    }
}

fn shares_of(cfg: &VmConfig) -> Vec<(String, bool)> {
    cfg.shared_dirs
        .iter()
        .map(|s| (s.tag.clone(), s.read_only))
        .collect()
}

/// Creates the snapshot directory (mode 0700); it must not exist yet, or be empty.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    let io = |source| Error::Io {
        what: format!("create snapshot directory {}", dir.display()),
        source,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(dir).map_err(io)?;
            if entries.next().is_some() {
                return Err(Error::InvalidConfig(format!(
                    "snapshot directory {} is not empty",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

/// Removes what a failed snapshot left in `dir` (the directory was created or
/// found empty by [`create_dir`]).
pub(crate) fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        log::warn!("removing incomplete snapshot {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Accelerator;

    fn cfg(dir: &Path) -> VmConfig {
        VmConfig {
            id: "a".into(),
            run_dir: dir.into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            kernel_args: vec!["x".into()],
            vcpus: 1,
            memory_mib: 256,
            channel: AgentChannel::Serial,
            vsock_uds: dir.join("v"),
            console_log: dir.join("c"),
            log_limits: Default::default(),
            shared_dirs: vec![],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let info = SnapshotInfo::of("qemu", Accelerator::Tcg, &c);
        info.store(dir.path()).unwrap();
        let back = SnapshotInfo::load(dir.path()).unwrap();
        assert_eq!(back, info);
        back.check_matches("qemu", &c).unwrap();
        let e = back.check_matches("builtin", &c).unwrap_err().to_string();
        assert!(e.contains("written by the qemu backend"), "{e}");
        let mut bigger = c.clone();
        bigger.memory_mib = 512;
        let e = back.check_matches("qemu", &bigger).unwrap_err().to_string();
        assert!(e.contains("256 MiB") && e.contains("512 MiB"), "{e}");
    }

    #[test]
    fn rejects_bad_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let e = SnapshotInfo::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("read snapshot description"), "{e}");
        let p = dir.path().join(SNAPSHOT_INFO);
        std::fs::write(&p, b"{\"format\":1,\"oops\":2}").unwrap();
        assert!(SnapshotInfo::load(dir.path()).is_err());
        std::fs::write(&p, vec![b' '; 70 * 1024]).unwrap();
        let e = SnapshotInfo::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        let info = SnapshotInfo::of("qemu", Accelerator::Tcg, &cfg(dir.path()));
        let mut json = serde_json::to_value(&info).unwrap();
        json["channel"] = "pigeon".into();
        std::fs::write(&p, serde_json::to_vec(&json).unwrap()).unwrap();
        let e = SnapshotInfo::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("pigeon"), "{e}");
    }

    #[test]
    fn snapshot_dir_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("s");
        create_dir(&d).unwrap();
        create_dir(&d).unwrap();
        std::fs::write(d.join("f"), b"").unwrap();
        assert!(create_dir(&d).is_err());
    }
}
