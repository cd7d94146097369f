//! Runtime configuration: `/etc/vessel/config.toml` (or `$VESSEL_CONFIG`).
//!
//! Every key is optional; `vessel env` prints the effective values. The file is
//! parsed once: the backend, channel, machine and accelerator are enums, so a
//! misspelt value is a parse error that names its key.
//!
//! ## Which hypervisor runs the sandboxes (`hypervisor`)
//!
//! - `builtin`: the built-in VMM (vessel-vmm). It needs hardware KVM (kvm_intel or
//!   kvm_amd); elsewhere every command that would start a VM fails before it
//!   creates anything.
//! - `qemu`: QEMU, with `qemu.accelerator` (`auto`: KVM on hardware KVM, else TCG).
//! - `auto` (default): the built-in VMM on hardware KVM; else QEMU with KVM if
//!   `qemu.accelerator = "kvm"` is forced; else QEMU with TCG (software emulation,
//!   logged as a warning). PVM (kvm_pvm, software KVM) is not hardware KVM: it cannot
//!   run Linux user space. `vessel check` prints the choice and the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vessel_hypervisor::builtin::jail::DEFAULT_JAIL_ROOT;
use vessel_hypervisor::builtin::{BuiltinConfig, JailerConfig};
use vessel_hypervisor::qemu::{Machine, QemuConfig};
use vessel_hypervisor::{Accelerator, AgentChannel};
use vessel_protocol::policy::Policy;

use crate::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/vessel/config.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where sandboxes keep sockets and state. Default `/run/vessel`.
    pub state_root: PathBuf,
    /// Hypervisor backend: `auto` (default), `qemu` or `builtin`; see the module
    /// documentation for how `auto` chooses.
    pub hypervisor: HypervisorKind,
    /// Guest kernel (PVH `vmlinux`). Default `/usr/local/share/vessel/vmlinux`.
    pub guest_kernel: PathBuf,
    /// Guest initramfs with vessel-agent as /init.
    pub guest_initramfs: PathBuf,
    /// Agent channel: `vsock` (needs vhost-device-vsock for QEMU) or `serial`.
    pub channel: AgentChannel,
    /// vCPUs of a sandbox VM when the spec sets no CPU limit. Default 1.
    pub default_vcpus: u32,
    /// Memory of a sandbox VM in MiB when the spec sets no memory limit. Default 256.
    pub default_memory_mib: u32,
    /// Added to a container's `linux.resources.memory.limit` to size its VM
    /// (guest kernel, agent, page cache). Default 128.
    pub memory_overhead_mib: u32,
    /// Upper bound for vCPUs derived from a container's CPU quota. Default 8.
    pub max_vcpus: u32,
    /// Seconds to wait for the agent after the VM started. Default: 30 on KVM, 120 under
    /// TCG (see [`Config::boot_timeout`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_timeout_secs: Option<u64>,
    /// Seconds a VM gets to stop before it is killed. Default 5.
    pub stop_grace_secs: u64,
    /// Extra guest kernel command-line words.
    pub kernel_args: Vec<String>,
    pub qemu: QemuSection,
    pub builtin: BuiltinSection,
    pub logs: LogsSection,
    pub templates: TemplatesSection,
    pub limits: LimitsSection,
    pub agent: AgentSection,
    /// The agent policy every sandbox gets: `agent.policy`'s file, read and
    /// checked by [`Config::load`], else the built-in default.
    #[serde(skip)]
    pub agent_policy: Policy,
}

/// The guest agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// A TOML file with the agent policy of every sandbox (which agent RPCs and
    /// request fields the guest serves; schema: [`vessel_protocol::policy`],
    /// docs/agent-policy.md). Default: none, the built-in policy (everything the
    /// runtime needs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PathBuf>,
}

/// Sandboxes started from a snapshot of their shape (see
/// [`crate::template`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TemplatesSection {
    /// Use templates where the backend can snapshot the sandbox's VM (the
    /// built-in VMM, no network devices). Default true.
    pub enabled: bool,
    /// Where templates are kept (mode 0700). Default `<state_root>/templates`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

impl Default for TemplatesSection {
    fn default() -> Self {
        TemplatesSection {
            enabled: true,
            dir: None,
        }
    }
}

/// Host limits of a sandbox: every host process of it (VMM or jailer,
/// virtiofsd, vhost-device-vsock, the supervisor or shim) runs in cgroup
/// `vessel/<vm id>` with these limits. See docs/threat-model.md, "Host limits".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Whether sandboxes get the cgroup. Default true.
    pub enabled: bool,
    /// Memory limit beyond the VM's memory, in MiB. Default: the backend's
    /// overhead (QEMU with TCG 192, QEMU with KVM 128, built-in 96).
    pub memory_overhead_mib: Option<u64>,
    /// CPU limit beyond the VM's vCPUs, in CPUs (I/O threads, virtiofsd,
    /// vsock backend). 0: no CPU limit. Default 1.
    pub extra_cpus: f64,
    /// Most processes and threads of the sandbox on the host. Default: the
    /// backend's (512).
    pub pids: Option<u64>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            enabled: true,
            memory_overhead_mib: None,
            extra_cpus: 1.0,
            pids: None,
        }
    }
}

/// Caps of every log a guest can make grow: its serial console and the
/// output of the hypervisor and of its helpers (virtiofsd,
/// vhost-device-vsock), each file on its own. See docs/threat-model.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsSection {
    /// Size cap of each log file in bytes (at least 4096); past it the file
    /// restarts with its newest half. Default 1048576 (1 MiB).
    pub max_bytes: u64,
    /// Rate cap of each log in bytes per second; output over it is dropped
    /// and the drop noted in the log. 0: no rate cap. Default 262144.
    pub bytes_per_sec: u64,
}

impl Default for LogsSection {
    fn default() -> Self {
        LogsSection {
            max_bytes: vessel_logcap::DEFAULT_MAX_BYTES,
            bytes_per_sec: vessel_logcap::DEFAULT_BYTES_PER_SEC,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BuiltinSection {
    /// vessel-vmm binary. Default `/usr/local/bin/vessel-vmm`.
    pub vmm_path: PathBuf,
    /// Run vessel-vmm under vessel-jailer: own mount namespace with only the VMM's
    /// files (pivot_root into /srv/vessel/jail/<id>/root), cgroup vessel/<id>, no new
    /// privileges, `jail_uid`/`jail_gid` instead of root. Default true.
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
            jailer: true,
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
    pub machine: Machine,
    /// Accelerator: `auto` (KVM with hardware KVM, else TCG), `kvm` or `tcg`.
    pub accelerator: AcceleratorChoice,
    /// vhost-device-vsock binary. Default `/usr/local/bin/vhost-device-vsock`.
    pub vhost_vsock_path: PathBuf,
    /// virtiofsd binary. Default `/usr/local/bin/virtiofsd`.
    pub virtiofsd_path: PathBuf,
}

/// The `hypervisor` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// The built-in VMM on hardware KVM, else QEMU (KVM if forced, else TCG).
    Auto,
    /// QEMU with `qemu.accelerator`.
    Qemu,
    /// The built-in VMM (vessel-vmm); needs hardware KVM.
    Builtin,
}

/// The `qemu.accelerator` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM on hardware KVM, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// Reads and checks an agent policy file (TOML).
pub fn load_policy(path: &Path) -> std::result::Result<Policy, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let policy: Policy = toml::from_str(&text).map_err(|e| e.to_string())?;
    policy.validate().map_err(|e| e.to_string())?;
    Ok(policy)
}

/// Parses a config value as the file would (`vessel check --hypervisor builtin`).
fn parse_value<T: serde::de::DeserializeOwned>(s: &str) -> std::result::Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
        .map_err(|e| e.to_string())
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_value(s)
    }
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypervisorKind::Auto => "auto",
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Builtin => "builtin",
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_root: "/run/vessel".into(),
            hypervisor: HypervisorKind::Auto,
            guest_kernel: "/usr/local/share/vessel/vmlinux".into(),
            guest_initramfs: "/usr/local/share/vessel/initramfs.cpio.gz".into(),
            channel: AgentChannel::Vsock,
            default_vcpus: 1,
            default_memory_mib: 256,
            memory_overhead_mib: 128,
            max_vcpus: 8,
            boot_timeout_secs: None,
            stop_grace_secs: 5,
            kernel_args: Vec::new(),
            qemu: QemuSection::default(),
            builtin: BuiltinSection::default(),
            logs: LogsSection::default(),
            templates: TemplatesSection::default(),
            limits: LimitsSection::default(),
            agent: AgentSection::default(),
            agent_policy: Policy::default(),
        }
    }
}

impl Default for QemuSection {
    fn default() -> Self {
        QemuSection {
            path: "/usr/bin/qemu-system-x86_64".into(),
            machine: Machine::Q35,
            accelerator: AcceleratorChoice::Auto,
            vhost_vsock_path: "/usr/local/bin/vhost-device-vsock".into(),
            virtiofsd_path: "/usr/local/bin/virtiofsd".into(),
        }
    }
}

/// Default boot timeout on KVM: a guest boots in well under a second.
pub const KVM_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default boot timeout under TCG: an emulated boot takes 1.5-3 s alone on an idle
/// host, and its time grows with every other VM booting on the same cores (20 pods
/// at once on 2 cores, or a host under load, took over 30 s each).
pub const TCG_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

impl Config {
    /// How long a sandbox on `accelerator` waits for its agent: `boot_timeout_secs`,
    /// else [`KVM_BOOT_TIMEOUT`] or [`TCG_BOOT_TIMEOUT`].
    pub fn boot_timeout(&self, accelerator: vessel_hypervisor::Accelerator) -> Duration {
        match (self.boot_timeout_secs, accelerator) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, vessel_hypervisor::Accelerator::Kvm) => KVM_BOOT_TIMEOUT,
            (None, vessel_hypervisor::Accelerator::Tcg) => TCG_BOOT_TIMEOUT,
        }
    }

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
        let mut cfg = Config::parse(&text).map_err(err)?;
        if let Some(file) = &cfg.agent.policy {
            cfg.agent_policy = load_policy(file)
                .map_err(|e| err(format!("agent.policy {}: {e}", file.display())))?;
        }
        Ok((cfg, path))
    }

    /// Parses and validates the text of a config.toml.
    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.default_vcpus == 0 || self.default_memory_mib < 64 {
            return Err("default_vcpus must be >= 1 and default_memory_mib >= 64".into());
        }
        if self.logs.max_bytes < vessel_logcap::MIN_MAX_BYTES {
            return Err(format!(
                "logs.max_bytes = {}: must be at least {}",
                self.logs.max_bytes,
                vessel_logcap::MIN_MAX_BYTES
            ));
        }
        let l = &self.limits;
        if !(l.extra_cpus.is_finite() && l.extra_cpus >= 0.0) || l.pids == Some(0) {
            return Err("limits.extra_cpus must be >= 0 and limits.pids >= 1".into());
        }
        if self.builtin.jailer && (self.builtin.jail_uid == 0 || self.builtin.jail_gid == 0) {
            return Err("builtin.jail_uid and builtin.jail_gid must not be 0 (root)".into());
        }
        Ok(())
    }

    /// Where templates are kept: `templates.dir`, else `<state_root>/templates`.
    pub fn template_dir(&self) -> PathBuf {
        self.templates
            .dir
            .clone()
            .unwrap_or_else(|| self.state_root.join("templates"))
    }

    /// The caps of every log a guest can make grow.
    pub fn log_limits(&self) -> vessel_logcap::Limits {
        vessel_logcap::Limits {
            max_bytes: self.logs.max_bytes,
            bytes_per_sec: self.logs.bytes_per_sec,
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

    /// The QEMU backend's settings, with the accelerator the backend choice
    /// resolved (see [`crate::backend`]).
    pub fn qemu_config(&self, accelerator: Accelerator) -> QemuConfig {
        QemuConfig {
            qemu: self.qemu.path.clone(),
            vhost_vsock: self.qemu.vhost_vsock_path.clone(),
            virtiofsd: self.qemu.virtiofsd_path.clone(),
            machine: self.qemu.machine,
            accelerator,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timeout_defaults_per_accelerator_and_the_key_overrides_both() {
        use vessel_hypervisor::Accelerator::{Kvm, Tcg};
        let c = Config::default();
        assert_eq!(c.boot_timeout(Kvm), Duration::from_secs(30));
        assert_eq!(c.boot_timeout(Tcg), Duration::from_secs(120));
        let c: Config = toml::from_str("boot_timeout_secs = 45").unwrap();
        assert_eq!(c.boot_timeout(Kvm), Duration::from_secs(45));
        assert_eq!(c.boot_timeout(Tcg), Duration::from_secs(45));
    }

    #[test]
    fn defaults_round_trip_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, toml::to_string(&Config::default()).unwrap()).unwrap();
        assert_eq!(Config::load(Some(&p)).unwrap().0, Config::default());
        std::fs::write(&p, "channel = \"serial\"\n[qemu]\nmachine = \"microvm\"\n").unwrap();
        let c = Config::load(Some(&p)).unwrap().0;
        assert_eq!(c.channel, AgentChannel::Serial);
        assert_eq!(c.qemu_config(Accelerator::Tcg).machine, Machine::Microvm);
        std::fs::write(&p, "chanel = \"serial\"\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("chanel"), "{e}");
        assert!(Config::load(Some(&dir.path().join("missing.toml"))).is_err());
        std::fs::write(&p, "[logs]\nmax_bytes = 65536\nbytes_per_sec = 0\n").unwrap();
        let l = Config::load(Some(&p)).unwrap().0.log_limits();
        assert_eq!((l.max_bytes, l.bytes_per_sec), (65536, 0));
        std::fs::write(&p, "[logs]\nmax_bytes = 10\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("logs.max_bytes"), "{e}");
    }

    #[test]
    fn agent_policy_is_read_and_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let policy = dir.path().join("policy.toml");
        std::fs::write(&p, format!("[agent]\npolicy = {:?}\n", policy)).unwrap();
        std::fs::write(&policy, "version = 1\nexec = false\n").unwrap();
        let c = Config::load(Some(&p)).unwrap().0;
        assert!(!c.agent_policy.exec);
        assert_eq!(Config::default().agent_policy, Policy::default());
        for (text, needle) in [
            ("version = 1\nexecs = false\n", "unknown field `execs`"),
            ("version = 7\n", "version 7 is not supported"),
        ] {
            std::fs::write(&policy, text).unwrap();
            let e = Config::load(Some(&p)).unwrap_err().to_string();
            assert!(e.contains("agent.policy") && e.contains(needle), "{e}");
        }
        std::fs::remove_file(&policy).unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(
            e.contains("agent.policy") && e.contains("policy.toml"),
            "{e}"
        );
    }

    #[test]
    fn an_invalid_enum_value_is_a_parse_error_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for (text, key, value) in [
            ("channel = \"pigeon\"\n", "channel", "pigeon"),
            (
                "hypervisor = \"firecracker\"\n",
                "hypervisor",
                "firecracker",
            ),
            ("[qemu]\nmachine = \"pc\"\n", "machine", "pc"),
            ("[qemu]\naccelerator = \"hvf\"\n", "accelerator", "hvf"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = Config::load(Some(&p)).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(value), "{text}: {e}");
        }
        std::fs::write(
            &p,
            "hypervisor = \"builtin\"\n[qemu]\naccelerator = \"kvm\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap().0;
        assert_eq!(c.hypervisor, HypervisorKind::Builtin);
        assert_eq!(c.qemu.accelerator, AcceleratorChoice::Kvm);
        assert_eq!("qemu".parse::<HypervisorKind>(), Ok(HypervisorKind::Qemu));
        assert!("kvm"
            .parse::<HypervisorKind>()
            .unwrap_err()
            .contains("builtin"));
        assert_eq!(HypervisorKind::Builtin.to_string(), "builtin");
    }

    #[test]
    fn jailer_is_on_by_default_and_maps_to_the_builtin_config() {
        let j = Config::default().builtin_config().jailer.unwrap();
        assert_eq!((j.uid, j.gid), (65534, 65534));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[builtin]\njailer = false\n").unwrap();
        assert_eq!(
            Config::load(Some(&p)).unwrap().0.builtin_config().jailer,
            None
        );
        std::fs::write(&p, "[builtin]\njail_uid = 900\njail_gid = 901\n").unwrap();
        let j = Config::load(Some(&p))
            .unwrap()
            .0
            .builtin_config()
            .jailer
            .unwrap();
        assert_eq!(j.path, Path::new("/usr/local/bin/vessel-jailer"));
        assert_eq!((j.uid, j.gid), (900, 901));
        assert_eq!(j.jail_root, Path::new("/srv/vessel/jail"));
        std::fs::write(&p, "[builtin]\njail_uid = 0\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("jail_uid"), "{e}");
    }
}
