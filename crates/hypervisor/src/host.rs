//! What the host offers for virtualization.

use std::fmt;
use std::path::Path;

/// The kind of `/dev/kvm` this host has: vessel-vmm-api's one probe.
pub use vessel_vmm_api::HostKvm as KvmKind;

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Detects the KVM kind from `/dev/kvm` and the loaded modules under `sys_module`
/// (normally `/sys/module`).
pub fn detect_kvm_at(dev_kvm: &Path, sys_module: &Path) -> (KvmKind, String) {
    vessel_vmm_api::kvm::detect_at(dev_kvm, sys_module)
}

/// Detects this host's KVM kind, with a one-line reason.
pub fn detect_kvm() -> (KvmKind, String) {
    vessel_vmm_api::kvm::detect()
}

/// The accelerator to use for full Linux guests on a host with `kvm`.
pub fn pick_accelerator(kvm: KvmKind) -> Accelerator {
    match kvm {
        KvmKind::Hardware => Accelerator::Kvm,
        KvmKind::Pvm | KvmKind::None => Accelerator::Tcg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe itself is tested where it lives (vessel_vmm_api::kvm).
    #[test]
    fn hardware_kvm_runs_kvm_and_anything_else_tcg() {
        assert_eq!(pick_accelerator(KvmKind::Pvm), Accelerator::Tcg);
        assert_eq!(pick_accelerator(KvmKind::None), Accelerator::Tcg);
        assert_eq!(pick_accelerator(KvmKind::Hardware), Accelerator::Kvm);
    }
}
