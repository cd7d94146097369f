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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvm_bindings::{kvm_fpu, kvm_irqchip};
    use vmm_sys_util::epoll::Epoll;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::test_utils::{memory, VirtQ};
    use crate::devices::virtio::transport::mmio::{MmioTransport, QueueSnapshot, ACTIVATE_TOKEN};
    use crate::devices::virtio::{IrqTrigger, Poller, TYPE_RNG};
    use crate::vstate::vcpu::FpuState;

    /// A one-vCPU snapshot with an rng device the driver had running, its queue in `mem`.
    fn snapshot(mem: &vm_memory::GuestMemoryMmap) -> VmSnapshot {
        let queue = VirtQ::new(mem, 0x1000, 16).queue();
        VmSnapshot {
            version: SNAPSHOT_VERSION,
            config: serde_json::from_str(r#"{"kernel":"/boot/vmlinux","mem_mib":16,"vcpus":1}"#)
                .unwrap(),
            mem_bytes: 16 << 20,
            vm: VmState {
                irqchips: vec![kvm_irqchip::default(); 3],
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![VcpuState {
                cpuid: Vec::new(),
                msrs: Vec::new(),
                regs: Default::default(),
                sregs: Default::default(),
                fpu: FpuState::from(&kvm_fpu::default()),
                lapic: Default::default(),
                mp_state: Default::default(),
                events: Default::default(),
                debugregs: Default::default(),
            }],
            serial: (&vm_superio::serial::SerialState::default()).into(),
            devices: vec![DeviceSnapshot {
                device_type: TYPE_RNG,
                transport: MmioState {
                    features_select: (0, 0),
                    acked_features: 1 << 32,
                    queue_select: 0,
                    // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
                    status: 0xf,
                    interrupt_status: 0,
                    config_generation: 0,
                    queues: vec![QueueSnapshot::from(&queue)],
                },
                device: serde_json::Value::Null,
            }],
        }
    }

    #[test]
    fn a_state_file_parses_back_and_its_running_device_is_reactivated() {
        let mem = memory();
        let snap = snapshot(&mem);
        let bytes = serde_json::to_vec(&snap).unwrap();
        let back = parse_state(&bytes, "state.json").unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), bytes);

        let epoll = Arc::new(Epoll::new().unwrap());
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(
            Box::new(crate::devices::virtio::rng::Rng::new()),
            mem.clone(),
            irq,
            Poller::new(epoll, 0),
        )
        .unwrap();
        let d = &back.devices[0];
        t.restore_state(&d.transport, &d.device).unwrap();
        t.handle_event(ACTIVATE_TOKEN, vmm_sys_util::epoll::EventSet::IN);
        assert!(t.device().state().is_activated());

        let mut newer = snap.clone();
        newer.version = SNAPSHOT_VERSION + 1;
        let e = parse_state(&serde_json::to_vec(&newer).unwrap(), "s/state.json").unwrap_err();
        assert!(matches!(e, SnapshotError::Version(2)), "{e}");
        let e = parse_state(b"{\"version\":1}", "s/state.json").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Snapshot state s/state.json is malformed"),
            "{e}"
        );
    }
}
