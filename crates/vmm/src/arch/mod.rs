//! x86_64 boot: guest physical layout, CPUID, MSRs, registers, mptable, kernel loading.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
