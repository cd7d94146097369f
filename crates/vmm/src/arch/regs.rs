//! Initial vCPU registers for the two entry protocols we boot: PVH (32-bit protected mode,
//! paging off) and the Linux 64-bit boot protocol (long mode, identity-mapped first GiB).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RegsError {
    /// Cannot write the boot GDT/IDT or page tables into guest memory at {0:#x}: {1}
    Write(u64, vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from its parts.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment described by GDT entry `entry` at `index`.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

fn gdt_table(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
        EntryMode::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
    }
}

fn write<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    val: T,
) -> Result<(), RegsError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| RegsError::Write(addr, e))
}

/// Special registers for the boot vCPU; writes the GDT, IDT and (64-bit) page tables.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = gdt_table(mode);
    for (i, e) in gdt.iter().enumerate() {
        write(mem, BOOT_GDT_START + (i as u64) * 8, *e)?;
    }
    write(mem, BOOT_IDT_START, 0u64)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            // Identity-map the first GiB with 2 MiB pages.
            write(mem, PML4_START, PDPTE_START | 0x03)?;
            write(mem, PDPTE_START, PDE_START | 0x03)?;
            for i in 0..512u64 {
                write(mem, PDE_START + i * 8, (i << 21) | 0x83)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(mode: EntryMode, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Linux64 => regs.rsi = boot_info,
    }
    regs
}

/// FPU state at reset (the values the SDM gives for INIT).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// Routes LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would.
pub fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    let mode = |v: u32, m: u32| (v & !0x700) | (m << 8);
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trips_through_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.l, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db, code32.type_), (0, 1, 0xb));
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        set_lint(&mut lapic);
        assert_eq!(
            (lapic_reg(&lapic.regs, APIC_LVT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((lapic_reg(&lapic.regs, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
