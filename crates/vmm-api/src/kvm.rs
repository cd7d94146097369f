//! The one probe of what this host's KVM can run, used by vessel-vmm (`--check`), the
//! backends and `vessel check`.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What this host's KVM can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKvm {
    /// No usable /dev/kvm (or neither kvm_intel nor kvm_amd behind it).
    None,
    /// kvm_pvm: tiny guests and Linux kernel code (slowly), but no Linux user space.
    Pvm,
    /// Hardware virtualization (kvm_intel / kvm_amd): everything.
    Hardware,
}

impl fmt::Display for HostKvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKvm::Hardware => "hardware",
            HostKvm::Pvm => "pvm",
            HostKvm::None => "none",
        })
    }
}

impl HostKvm {
    /// Probes /dev/kvm and the loaded KVM modules.
    pub fn probe() -> Self {
        detect().0
    }

    /// Whether a Linux guest's user space (the agent) can run.
    pub fn runs_linux_userspace(self) -> bool {
        self == HostKvm::Hardware
    }

    /// One-line explanation for `vessel check`.
    pub fn explain(self) -> &'static str {
        match self {
            HostKvm::None => {
                "no usable /dev/kvm: the built-in VMM cannot run here; use QEMU with TCG"
            }
            HostKvm::Pvm => {
                "this host's KVM is kvm_pvm (software): it runs the guest kernel only through \
                 an emulator and cannot run Linux user space, so the agent cannot start; use \
                 QEMU with TCG (hypervisor = \"qemu\")"
            }
            HostKvm::Hardware => "hardware KVM: the built-in VMM can run sandboxes",
        }
    }
}

/// True when the host's KVM is the PVM software implementation.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// This host's KVM kind, with a one-line reason.
pub fn detect() -> (HostKvm, String) {
    detect_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

/// The KVM kind from `dev_kvm` and the loaded modules under `sys_module` (normally
/// `/sys/module`), with a one-line reason.
pub fn detect_at(dev_kvm: &Path, sys_module: &Path) -> (HostKvm, String) {
    if !dev_kvm.exists() {
        return (
            HostKvm::None,
            format!("{} does not exist", dev_kvm.display()),
        );
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev_kvm) {
        return (
            HostKvm::None,
            format!("cannot open {}: {e}", dev_kvm.display()),
        );
    }
    if sys_module.join("kvm_pvm").exists() {
        return (
            HostKvm::Pvm,
            "kvm_pvm is loaded: software virtualization, guest Linux user space cannot run"
                .to_string(),
        );
    }
    for m in ["kvm_intel", "kvm_amd"] {
        if sys_module.join(m).exists() {
            return (HostKvm::Hardware, format!("{m} is loaded"));
        }
    }
    (
        HostKvm::None,
        "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded; not treated as hardware KVM"
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_modules() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let modules = dir.path().join("module");
        std::fs::create_dir_all(&modules).unwrap();
        assert_eq!(detect_at(&dev, &modules).0, HostKvm::None);
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(detect_at(&dev, &modules).0, HostKvm::None);
        std::fs::create_dir(modules.join("kvm_intel")).unwrap();
        assert_eq!(detect_at(&dev, &modules).0, HostKvm::Hardware);
        std::fs::create_dir(modules.join("kvm_pvm")).unwrap();
        assert_eq!(detect_at(&dev, &modules).0, HostKvm::Pvm);
        assert_eq!(HostKvm::Pvm.to_string(), "pvm");
        assert!(!HostKvm::Pvm.runs_linux_userspace());
    }
}
