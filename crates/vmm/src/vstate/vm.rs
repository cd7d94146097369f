//! The KVM VM: memory slots, in-kernel irqchip and PIT, and VM-wide state for snapshots.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDRESS;

/// Errors from VM-level KVM calls.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmError {
    /// Cannot open /dev/kvm: {0}. Is KVM available and are you allowed to use it?
    OpenKvm(kvm_ioctls::Error),
    /// KVM API version {0} is not supported (need 12)
    ApiVersion(i32),
    /// KVM call {0} failed: {1}
    Kvm(&'static str, kvm_ioctls::Error),
}

/// VM-wide KVM state saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A KVM VM with guest memory registered.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Creates the VM, its irqchip and PIT, and registers `mem` as memory slots.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| {
                    VmError::Kvm("get_host_address", kvm_ioctls::Error::new(libc::EFAULT))
                })?;
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps
            // for the life of the VM, and slots do not overlap (regions are disjoint).
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
        Ok(Vm { kvm, fd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// CPUID entries KVM supports on this host.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))
    }

    /// Saves irqchip, PIT and clock state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map_err(|e| VmError::Kvm("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        let pit = self
            .fd
            .get_pit2()
            .map_err(|e| VmError::Kvm("KVM_GET_PIT2", e))?;
        let mut clock = self
            .fd
            .get_clock()
            .map_err(|e| VmError::Kvm("KVM_GET_CLOCK", e))?;
        // Only the clock value is meaningful on another host/boot.
        clock.flags = 0;
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Restores state saved by [`Vm::save_state`].
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Kvm("KVM_SET_PIT2", e))?;
        self.fd
            .set_clock(&state.clock)
            .map_err(|e| VmError::Kvm("KVM_SET_CLOCK", e))?;
        Ok(())
    }
}
