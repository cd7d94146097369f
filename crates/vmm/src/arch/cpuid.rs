//! CPUID filtering through `KVM_SET_CPUID2`: the guest sees what KVM supports, with the
//! topology of this VM, the hypervisor bit, and (on hosts that need it) features that the
//! host's KVM cannot run removed.

use kvm_bindings::CpuId;

/// A feature bit in one CPUID register.
#[derive(Debug, Clone, Copy)]
struct Feature {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u32,
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features that PVM's instruction emulator cannot execute (see MACHINE.md); the same set
/// as the `clearcpuid=` quirk on the guest command line, plus XSAVE (`noxsave`).
const PVM_HIDDEN: &[Feature] = &[
    f(1, 0, Reg::Ecx, 1),  // pclmulqdq
    f(1, 0, Reg::Ecx, 13), // cx16
    f(1, 0, Reg::Ecx, 22), // movbe
    f(1, 0, Reg::Ecx, 23), // popcnt
    f(1, 0, Reg::Ecx, 25), // aes
    f(1, 0, Reg::Ecx, 26), // xsave
    f(1, 0, Reg::Ecx, 27), // osxsave
    f(1, 0, Reg::Ecx, 28), // avx (needs xsave)
    f(1, 0, Reg::Ecx, 30), // rdrand
    f(7, 0, Reg::Ebx, 0),  // fsgsbase
    f(7, 0, Reg::Ebx, 3),  // bmi1
    f(7, 0, Reg::Ebx, 5),  // avx2
    f(7, 0, Reg::Ebx, 8),  // bmi2
    f(7, 0, Reg::Ebx, 9),  // erms
    f(7, 0, Reg::Ebx, 18), // rdseed
    f(7, 0, Reg::Ebx, 19), // adx
    f(7, 0, Reg::Ebx, 20), // smap
    f(7, 0, Reg::Ecx, 22), // rdpid
    f(7, 0, Reg::Edx, 4),  // fsrm
];

/// Leaf 1 ECX bit: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit: HTT (the logical-processor count in EBX is valid).
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `cpu_count`.
pub fn filter(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, hide_pvm_unsupported: bool) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx |= ECX_HYPERVISOR;
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors, EBX[15:8] CLFLUSH
                // line size in 8-byte units.
                entry.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            // Deterministic cache parameters: cores per package in EAX[31:26].
            4 => {
                entry.eax &= 0x03ff_ffff;
                entry.eax |= (u32::from(cpu_count).saturating_sub(1) & 0x3f) << 26;
            }
            // Extended topology: one thread per core, `cpu_count` cores, x2APIC id in EDX.
            0xb => {
                entry.edx = u32::from(cpu_id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 0x100;
                    }
                    1 => {
                        entry.eax = 8;
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = 0x201;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            // XSAVE state enumeration is meaningless once XSAVE is hidden.
            0xd if hide_pvm_unsupported => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
        if hide_pvm_unsupported {
            for feat in PVM_HIDDEN
                .iter()
                .filter(|feat| feat.leaf == entry.function && feat.subleaf == entry.index)
            {
                let reg = match feat.reg {
                    Reg::Ebx => &mut entry.ebx,
                    Reg::Ecx => &mut entry.ecx,
                    Reg::Edx => &mut entry.edx,
                };
                *reg &= !(1 << feat.bit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    #[test]
    fn sets_topology_and_hides_pvm_features() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(7, 0), entry(0xb, 1)]).unwrap();
        filter(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ecx & (1 << 13), 0, "cx16 hidden");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ebx & (1 << 20), 0, "smap hidden");
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].edx, 3);
    }

    #[test]
    fn keeps_features_without_quirks() {
        let mut cpuid = CpuId::from_entries(&[entry(1, 0), entry(7, 0)]).unwrap();
        filter(&mut cpuid, 0, 1, false);
        assert_ne!(cpuid.as_slice()[0].ecx & (1 << 13), 0);
        assert_eq!(cpuid.as_slice()[1].ebx, !0);
    }
}
