//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the IRQ routing.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    APIC_DEFAULT_PHYS_BASE, EBDA_END, EBDA_START, IO_APIC_DEFAULT_PHYS_BASE, IRQ_MAX,
};

/// Errors while building the MP table.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MptableError {
    /// Too many vCPUs for the MP table: {0} (max 254)
    TooManyCpus(u8),
    /// The MP table ({0} bytes) does not fit in the EBDA
    TooLarge(usize),
    /// Cannot write the MP table to guest memory: {0}
    Write(vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// CPU signature stepping/model/family and feature flags (FPU, APIC) as a BIOS reports them.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer structure and configuration table as bytes, placed at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let table_addr = base + 16;

    // Configuration table entries.
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = (u16::from(num_cpus)) + 1 + 1 + (IRQ_MAX as u16 + 1) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"VESSEL  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    if base + mpf.len() as u64 > EBDA_END {
        return Err(MptableError::TooLarge(mpf.len()));
    }
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_sizes_fit() {
        for cpus in [1u8, 2, 32] {
            let t = build(EBDA_START, cpus).unwrap();
            let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
            assert_eq!(sum(&t[..16]), 0);
            assert_eq!(sum(&t[16..]), 0);
            assert_eq!(&t[16..20], b"PCMP");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(len, t.len() - 16);
        }
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, 254).is_err());
    }
}
