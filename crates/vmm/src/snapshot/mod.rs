//! Snapshot files: `state.json` (config, VM, vCPU and device state) and `memory` (guest RAM,
//! sparse). Restore maps `memory` privately, so restored VMs share unwritten pages.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::transport::mmio::MmioState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// Snapshot format version; bumped on incompatible changes.
pub const SNAPSHOT_VERSION: u32 = 1;
/// State file name inside a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// Memory file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SnapshotError {
    /// Cannot access snapshot file {0}: {1}
    Io(String, std::io::Error),
    /// Snapshot state {0} is malformed: {1}
    Parse(String, serde_json::Error),
    /// Snapshot version {0} is not supported (this VMM reads version 1)
    Version(u32),
}

/// One virtio device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// virtio device type.
    pub device_type: u32,
    /// Transport registers and queues.
    pub transport: MmioState,
    /// Device-specific state.
    pub device: serde_json::Value,
}

/// The whole non-memory state of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Format version.
    pub version: u32,
    /// The configuration the VM was booted with.
    pub config: VmConfig,
    /// Guest RAM size in bytes.
    pub mem_bytes: u64,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio devices in MMIO slot order.
    pub devices: Vec<DeviceSnapshot>,
}

/// Path of the memory file in `dir`.
pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// Writes `state.json` into `dir`.
pub fn write_state(dir: &Path, snap: &VmSnapshot) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let name = path.display().to_string();
    std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Io(dir.display().to_string(), e))?;
    let bytes = serde_json::to_vec(snap).map_err(|e| SnapshotError::Parse(name.clone(), e))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| SnapshotError::Io(name.clone(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| SnapshotError::Io(name, e))
}

/// Reads `state.json` from `dir`.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let name = path.display().to_string();
    let bytes = std::fs::read(&path).map_err(|e| SnapshotError::Io(name.clone(), e))?;
    parse_state(&bytes, &name)
}

/// Parses the contents of a `state.json` (`name` is what errors call it) and checks its
/// version.
pub fn parse_state(bytes: &[u8], name: &str) -> Result<VmSnapshot, SnapshotError> {
    let snap: VmSnapshot =
        serde_json::from_slice(bytes).map_err(|e| SnapshotError::Parse(name.into(), e))?;
    if snap.version != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version(snap.version));
    }
    Ok(snap)
}
