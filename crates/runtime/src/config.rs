//! Runtime configuration: `/etc/vessel/config.toml` (or `$VESSEL_CONFIG`).
//!
//! Every key is optional; `vessel env` prints the effective values.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vessel_hypervisor::builtin::jail::DEFAULT_JAIL_ROOT;
use vessel_hypervisor::builtin::{BuiltinConfig, JailerConfig};
use vessel_hypervisor::qemu::{Machine, QemuConfig};
use vessel_hypervisor::{Accelerator, AgentChannel};

use crate::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/vessel/config.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where sandboxes keep sockets and state. Default `/run/vessel`.
    pub state_root: PathBuf,
    /// Hypervisor backend: `auto` (QEMU; the built-in VMM is opt-in until it
    /// has run the full suite on hardware KVM), `qemu` or `builtin`.
    pub hypervisor: String,
    /// Guest kernel (PVH `vmlinux`). Default `/usr/local/share/vessel/vmlinux`.
    pub guest_kernel: PathBuf,
    /// Guest initramfs with vessel-agent as /init.
    pub guest_initramfs: PathBuf,
    /// Agent channel: `vsock` (needs vhost-device-vsock for QEMU) or `serial`.
    pub channel: String,
    /// vCPUs of a sandbox VM when the spec sets no CPU limit. Default 1.
    pub default_vcpus: u32,
    /// Memory of a sandbox VM in MiB when the spec sets no memory limit. Default 256.
    pub default_memory_mib: u32,
    /// Added to a container's `linux.resources.memory.limit` to size its VM
    /// (guest kernel, agent, page cache). Default 128.
    pub memory_overhead_mib: u32,
    /// Upper bound for vCPUs derived from a container's CPU quota. Default 8.
    pub max_vcpus: u32,
    /// Seconds to wait for the agent after the VM started. Default 30 (TCG is slow).
    pub boot_timeout_secs: u64,
    /// Seconds a VM gets to stop before it is killed. Default 5.
    pub stop_grace_secs: u64,
    /// Extra guest kernel command-line words.
    pub kernel_args: Vec<String>,
    pub qemu: QemuSection,
    pub builtin: BuiltinSection,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BuiltinSection {
    /// vessel-vmm binary. Default `/usr/local/bin/vessel-vmm`.
    pub vmm_path: PathBuf,
    /// Run vessel-vmm under vessel-jailer: own mount namespace with only the VMM's
    /// files (pivot_root into /srv/vessel/jail/<id>/root), cgroup vessel/<id>, no new
    /// privileges, `jail_uid`/`jail_gid` instead of root. Default false.
    pub jailer: bool,
    /// vessel-jailer binary. Default `/usr/local/bin/vessel-jailer`.
    pub jailer_path: PathBuf,
    /// User the jailed VMM runs as (not 0). Default 65534 (nobody).
    pub jail_uid: u32,
    /// Group the jailed VMM runs as (not 0). Default 65534 (nogroup).
    pub jail_gid: u32,
}

impl Default for BuiltinSection {
    fn default() -> Self {
        BuiltinSection {
            vmm_path: "/usr/local/bin/vessel-vmm".into(),
            jailer: false,
            jailer_path: "/usr/local/bin/vessel-jailer".into(),
            jail_uid: 65534,
            jail_gid: 65534,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    /// QEMU binary. Default `/usr/bin/qemu-system-x86_64`.
    pub path: PathBuf,
    /// Machine type: `q35` or `microvm`. Default `q35`.
    pub machine: String,
    /// Accelerator: `auto` (KVM with hardware KVM, else TCG), `kvm` or `tcg`.
    pub accelerator: String,
    /// vhost-device-vsock binary. Default `/usr/local/bin/vhost-device-vsock`.
    pub vhost_vsock_path: PathBuf,
    /// virtiofsd binary. Default `/usr/local/bin/virtiofsd`.
    pub virtiofsd_path: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_root: "/run/vessel".into(),
            hypervisor: "auto".into(),
            guest_kernel: "/usr/local/share/vessel/vmlinux".into(),
            guest_initramfs: "/usr/local/share/vessel/initramfs.cpio.gz".into(),
            channel: "vsock".into(),
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 128,
            max_vcpus: 8,
            boot_timeout_secs: 30,
            stop_grace_secs: 5,
            kernel_args: Vec::new(),
            qemu: QemuSection::default(),
            builtin: BuiltinSection::default(),
        }
    }
}

impl Default for QemuSection {
    fn default() -> Self {
        QemuSection {
            path: "/usr/bin/qemu-system-x86_64".into(),
            machine: "q35".into(),
            accelerator: "auto".into(),
            vhost_vsock_path: "/usr/local/bin/vhost-device-vsock".into(),
            virtiofsd_path: "/usr/local/bin/virtiofsd".into(),
        }
    }
}

impl Config {
    /// Loads `path`; a missing file at the default path means all defaults.
    pub fn load(path: Option<&Path>) -> Result<(Config, PathBuf)> {
        let explicit = path.is_some() || std::env::var_os("VESSEL_CONFIG").is_some();
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("VESSEL_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let err = |reason: String| Error::Config {
            path: path.display().to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok((Config::default(), path))
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate().map_err(err)?;
        Ok((cfg, path))
    }

    fn validate(&self) -> std::result::Result<(), String> {
        self.agent_channel()?;
        self.qemu_machine()?;
        self.qemu_accelerator()?;
        if !matches!(self.hypervisor.as_str(), "auto" | "qemu") {
            return Err(format!(
                "hypervisor = {:?}: supported are \"auto\" and \"qemu\"",
                self.hypervisor
            ));
        }
        if self.default_vcpus == 0 || self.default_memory_mib < 64 {
            return Err("default_vcpus must be >= 1 and default_memory_mib >= 64".into());
        }
        if self.builtin.jailer && (self.builtin.jail_uid == 0 || self.builtin.jail_gid == 0) {
            return Err("builtin.jail_uid and builtin.jail_gid must not be 0 (root)".into());
        }
        Ok(())
    }

    pub fn agent_channel(&self) -> std::result::Result<AgentChannel, String> {
        match self.channel.as_str() {
            "vsock" => Ok(AgentChannel::Vsock),
            "serial" => Ok(AgentChannel::Serial),
            other => Err(format!(
                "channel = {other:?}: expected \"vsock\" or \"serial\""
            )),
        }
    }

    fn qemu_machine(&self) -> std::result::Result<Machine, String> {
        match self.qemu.machine.as_str() {
            "q35" => Ok(Machine::Q35),
            "microvm" => Ok(Machine::Microvm),
            other => Err(format!(
                "qemu.machine = {other:?}: expected \"q35\" or \"microvm\""
            )),
        }
    }

    fn qemu_accelerator(&self) -> std::result::Result<Option<Accelerator>, String> {
        match self.qemu.accelerator.as_str() {
            "auto" => Ok(None),
            "kvm" => Ok(Some(Accelerator::Kvm)),
            "tcg" => Ok(Some(Accelerator::Tcg)),
            other => Err(format!(
                "qemu.accelerator = {other:?}: expected auto, kvm or tcg"
            )),
        }
    }

    pub fn builtin_config(&self) -> BuiltinConfig {
        BuiltinConfig {
            vmm: self.builtin.vmm_path.clone(),
            virtiofsd: self.qemu.virtiofsd_path.clone(),
            require_hardware_kvm: true,
            jailer: self.builtin.jailer.then(|| JailerConfig {
                path: self.builtin.jailer_path.clone(),
                uid: self.builtin.jail_uid,
                gid: self.builtin.jail_gid,
                jail_root: DEFAULT_JAIL_ROOT.into(),
                cgroup_mem_mib: None,
                cgroup_cpus: None,
            }),
        }
    }

    pub fn qemu_config(&self) -> QemuConfig {
        QemuConfig {
            qemu: self.qemu.path.clone(),
            vhost_vsock: self.qemu.vhost_vsock_path.clone(),
            virtiofsd: self.qemu.virtiofsd_path.clone(),
            // validate() ran on load; defaults are valid.
            machine: self.qemu_machine().unwrap_or(Machine::Q35),
            accelerator: self.qemu_accelerator().unwrap_or(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml::to_string(&Config::default()).unwrap()).unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().0, Config::default());
        std::fs::write(&p, "channel = \"serial\"\n[qemu]\nmachine = \"microvm\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap().0;
        assert_eq!(c.agent_channel().unwrap(), AgentChannel::Serial);
        assert_eq!(c.qemu_config().machine, Machine::Microvm);
        std::fs::write(&p, "chanel = \"serial\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("chanel"), "{e}");
        std::fs::write(&p, "channel = \"pigeon\"\n").unwrap();
        assert!(Config::load(Some(&p))
            .unwrap_err()
            .to_string()
            .contains("pigeon"));
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
    }

    #[test]
    fn jailer_is_off_by_default_and_maps_to_the_builtin_config() {
        assert_eq!(Config::default().builtin_config().jailer, None);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[builtin]\njailer = true\njail_uid = 900\njail_gid = 901\n",
        )
        .unwrap();
        let j = Config::load(Some(&p))
            .unwrap()
            .0
            .builtin_config()
            .jailer
            .unwrap();
        assert_eq!(j.path, Path::new("/usr/local/bin/vessel-jailer"));
        assert_eq!((j.uid, j.gid), (900, 901));
        assert_eq!(j.jail_root, Path::new("/srv/vessel/jail"));
        std::fs::write(&p, "[builtin]\njailer = true\njail_uid = 0\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("jail_uid"), "{e}");
    }
}
