//! What the host offers for virtualization.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// The kind of `/dev/kvm` this host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware-assisted KVM (kvm_intel / kvm_amd).
    Hardware,
    /// kvm_pvm: software virtualization. Tiny guests run; Linux user space does not.
    Pvm,
    /// No usable /dev/kvm.
    None,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Pvm => "pvm",
            KvmKind::None => "none",
        })
    }
}

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
    if !dev_kvm.exists() {
        return (
            KvmKind::None,
            format!("{} does not exist", dev_kvm.display()),
        );
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open(dev_kvm) {
        return (
            KvmKind::None,
            format!("cannot open {}: {e}", dev_kvm.display()),
        );
    }
    if sys_module.join("kvm_pvm").exists() {
        return (
            KvmKind::Pvm,
            "kvm_pvm is loaded: software virtualization, guest Linux user space cannot run"
                .to_string(),
        );
    }
    for m in ["kvm_intel", "kvm_amd"] {
        if sys_module.join(m).exists() {
            return (KvmKind::Hardware, format!("{m} is loaded"));
        }
    }
    (
        KvmKind::None,
        "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded; not treated as hardware KVM"
            .to_string(),
    )
}

/// Detects this host's KVM kind, with a one-line reason.
pub fn detect_kvm() -> (KvmKind, String) {
    detect_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
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

    #[test]
    fn classifies_modules() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let modules = dir.path().join("module");
        std::fs::create_dir_all(&modules).unwrap();
        assert_eq!(detect_kvm_at(&dev, &modules).0, KvmKind::None);
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(detect_kvm_at(&dev, &modules).0, KvmKind::None);
        std::fs::create_dir(modules.join("kvm_intel")).unwrap();
        assert_eq!(detect_kvm_at(&dev, &modules).0, KvmKind::Hardware);
        std::fs::create_dir(modules.join("kvm_pvm")).unwrap();
        assert_eq!(detect_kvm_at(&dev, &modules).0, KvmKind::Pvm);
        assert_eq!(pick_accelerator(KvmKind::Pvm), Accelerator::Tcg);
        assert_eq!(pick_accelerator(KvmKind::Hardware), Accelerator::Kvm);
    }
}
