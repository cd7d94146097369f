//! Which hypervisor backend runs sandboxes, and the one factory that builds it.
//!
//! The CLI (every command and `vessel check`) and the shim build their backend
//! here, so they all follow the same rule (documented in [`crate::config`]).

use std::fmt;

use vessel_hypervisor::builtin::Builtin;
use vessel_hypervisor::host::{detect_kvm, pick_accelerator, KvmKind};
use vessel_hypervisor::qemu::Qemu;
use vessel_hypervisor::{Accelerator, Hypervisor};

use crate::config::{AcceleratorChoice, HypervisorKind};
use crate::{Config, Error, Result};

/// A backend that can run sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Qemu,
    Builtin,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Builtin => "builtin",
        })
    }
}

/// The backend a configuration resolves to on this host, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub kind: BackendKind,
    pub accelerator: Accelerator,
    /// One line: what was configured and what the host offers.
    pub reason: String,
}

impl fmt::Display for Backend {
    /// `qemu (tcg) — auto: /dev/kvm is kvm_pvm (software KVM), which cannot run Linux guests`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) — {}", self.kind, self.accelerator, self.reason)
    }
}

impl Backend {
    /// Resolves `config` against this host's KVM.
    pub fn resolve(config: &Config) -> Result<Backend> {
        let (kvm, why) = detect_kvm();
        Self::resolve_for(config, kvm, &why)
    }

    /// Resolves `config` for a host whose KVM is `kvm` (`why`: the detection's
    /// one-line reason). Pure: unit-tested for every host kind.
    pub fn resolve_for(config: &Config, kvm: KvmKind, why: &str) -> Result<Backend> {
        let host = match kvm {
            KvmKind::Hardware => format!("/dev/kvm is hardware KVM ({why})"),
            KvmKind::Pvm => {
                "/dev/kvm is kvm_pvm (software KVM), which cannot run Linux guests".to_string()
            }
            KvmKind::None => format!("no hardware KVM ({why})"),
        };
        let qemu = |reason: String| {
            let accelerator = match config.qemu.accelerator {
                AcceleratorChoice::Auto => pick_accelerator(kvm),
                AcceleratorChoice::Kvm => Accelerator::Kvm,
                AcceleratorChoice::Tcg => Accelerator::Tcg,
            };
            Backend {
                kind: BackendKind::Qemu,
                accelerator,
                reason,
            }
        };
        match config.hypervisor {
            HypervisorKind::Builtin if kvm == KvmKind::Hardware => Ok(Backend {
                kind: BackendKind::Builtin,
                accelerator: Accelerator::Kvm,
                reason: format!("configured: {host}"),
            }),
            HypervisorKind::Builtin => Err(Error::BackendUnavailable {
                backend: HypervisorKind::Builtin,
                reason: format!(
                    "the built-in VMM needs hardware KVM (kvm_intel or kvm_amd) to run the guest's \
                     user space and the agent, and {host}; set hypervisor = \"qemu\" or \"auto\" \
                     (QEMU with TCG software emulation)"
                ),
            }),
            HypervisorKind::Qemu => Ok(qemu(format!("configured: {host}"))),
            HypervisorKind::Auto if kvm == KvmKind::Hardware => Ok(Backend {
                kind: BackendKind::Builtin,
                accelerator: Accelerator::Kvm,
                reason: format!("auto: {host}"),
            }),
            HypervisorKind::Auto => Ok(qemu(format!("auto: {host}"))),
        }
    }
}

/// The hypervisor backend the configuration resolves to on this host (see
/// [`Backend::resolve`]): the one factory of the CLI and the shim. Fails before
/// anything is started when the backend cannot run sandboxes here.
/// Software emulation chosen by `auto` is logged as a warning: sandboxes work
/// but start and run far slower.
pub fn hypervisor(config: &Config) -> Result<Box<dyn Hypervisor>> {
    let backend = Backend::resolve(config)?;
    if backend.accelerator == Accelerator::Tcg && config.qemu.accelerator == AcceleratorChoice::Auto
    {
        log::warn!(
            "hypervisor: {backend}: sandboxes run under QEMU's TCG software emulation, \
             many times slower than with hardware KVM"
        );
    }
    build(config, &backend)
}

/// Fails, without starting anything, when the configured backend cannot run
/// sandboxes here (wrong KVM, missing binary): what `create` checks before it
/// creates any state.
pub fn preflight(config: &Config) -> Result<Backend> {
    let backend = Backend::resolve(config)?;
    build(config, &backend)?;
    Ok(backend)
}

/// Builds the resolved `backend`.
pub fn build(config: &Config, backend: &Backend) -> Result<Box<dyn Hypervisor>> {
    Ok(match backend.kind {
        BackendKind::Builtin => Box::new(Builtin::new(config.builtin_config())?),
        BackendKind::Qemu => Box::new(Qemu::new(config.qemu_config(backend.accelerator))?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hypervisor: HypervisorKind, accelerator: AcceleratorChoice) -> Config {
        let mut c = Config {
            hypervisor,
            ..Config::default()
        };
        c.qemu.accelerator = accelerator;
        c
    }

    #[test]
    fn auto_picks_builtin_on_hardware_kvm_else_qemu_kvm_if_forced_else_tcg() {
        use AcceleratorChoice as A;
        use HypervisorKind::Auto;
        let b = Backend::resolve_for(
            &config(Auto, A::Auto),
            KvmKind::Hardware,
            "kvm_amd is loaded",
        )
        .unwrap();
        assert_eq!(
            (b.kind, b.accelerator),
            (BackendKind::Builtin, Accelerator::Kvm)
        );
        assert!(b.reason.contains("kvm_amd"), "{b}");
        let b = Backend::resolve_for(&config(Auto, A::Auto), KvmKind::Pvm, "pvm").unwrap();
        assert_eq!(
            (b.kind, b.accelerator),
            (BackendKind::Qemu, Accelerator::Tcg)
        );
        assert_eq!(
            b.to_string(),
            "qemu (tcg) — auto: /dev/kvm is kvm_pvm (software KVM), which cannot run Linux guests"
        );
        let b = Backend::resolve_for(&config(Auto, A::Kvm), KvmKind::None, "no /dev/kvm").unwrap();
        assert_eq!(
            (b.kind, b.accelerator),
            (BackendKind::Qemu, Accelerator::Kvm)
        );
        let b = Backend::resolve_for(&config(Auto, A::Auto), KvmKind::None, "no /dev/kvm").unwrap();
        assert_eq!(
            (b.kind, b.accelerator),
            (BackendKind::Qemu, Accelerator::Tcg)
        );
        assert!(b.reason.contains("no /dev/kvm"), "{b}");
    }

    #[test]
    fn qemu_follows_its_accelerator_setting() {
        use AcceleratorChoice as A;
        use HypervisorKind::Qemu;
        for (choice, kvm, want) in [
            (A::Auto, KvmKind::Hardware, Accelerator::Kvm),
            (A::Auto, KvmKind::Pvm, Accelerator::Tcg),
            (A::Tcg, KvmKind::Hardware, Accelerator::Tcg),
            (A::Kvm, KvmKind::None, Accelerator::Kvm),
        ] {
            let b = Backend::resolve_for(&config(Qemu, choice), kvm, "x").unwrap();
            assert_eq!((b.kind, b.accelerator), (BackendKind::Qemu, want), "{b}");
            assert!(b.reason.starts_with("configured: "), "{b}");
        }
    }

    #[test]
    fn builtin_runs_only_on_hardware_kvm_and_says_why_not() {
        use HypervisorKind::Builtin;
        let b = Backend::resolve_for(
            &config(Builtin, AcceleratorChoice::Auto),
            KvmKind::Hardware,
            "kvm_intel is loaded",
        )
        .unwrap();
        assert_eq!(
            (b.kind, b.accelerator),
            (BackendKind::Builtin, Accelerator::Kvm)
        );
        for kvm in [KvmKind::Pvm, KvmKind::None] {
            let e = Backend::resolve_for(&config(Builtin, AcceleratorChoice::Auto), kvm, "x")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("hardware KVM") && e.contains("hypervisor = \"qemu\""),
                "{e}"
            );
        }
    }
}
