//! Guest physical memory layout (the same conventions as Firecracker, so that guest kernels
//! built for either find things where they expect them).

/// GDT used for the boot segments.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) loaded at boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const MODLIST_START: u64 = 0x6040;
/// PVH e820 memory map.
pub const MEMMAP_START: u64 = 0x7000;
/// Linux boot protocol zero page (bzImage boot).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack pointer at boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit bzImage entry.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages, first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory reported to the guest.
pub const EBDA_END: u64 = 0xa0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; guest RAM above this is relocated to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ given to virtio devices (4 is COM1, 1 and 12 are the i8042).
pub const IRQ_BASE: u32 = 5;
/// Last IRQ the IOAPIC routes.
pub const IRQ_MAX: u32 = 23;
/// Local APIC base (for the MP table).
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base (for the MP table).
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// KVM's TSS needs three pages below 4 GiB, outside guest RAM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Guest RAM regions for `mem_size` bytes: one region below the MMIO hole, and the rest
/// above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// Address of the virtio-mmio window of device `index`.
pub fn virtio_mmio_base(index: u32) -> u64 {
    VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_hole() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
