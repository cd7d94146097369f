//! VM configuration, as given on the command line or through the `configure` API request.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Whether to work around the limits of PVM, the software KVM of some development hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PvmQuirks {
    /// On when the host's KVM is PVM (`/sys/module/kvm_pvm` exists), else off.
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off.
    Off,
}

impl PvmQuirks {
    /// Resolves `Auto` by looking at the host.
    pub fn enabled(self) -> bool {
        match self {
            PvmQuirks::On => true,
            PvmQuirks::Off => false,
            PvmQuirks::Auto => host_is_pvm(),
        }
    }
}

/// True when the host's KVM is the PVM software implementation.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// What this host's KVM can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKvm {
    /// No usable /dev/kvm.
    None,
    /// kvm_pvm: tiny guests and Linux kernel code (slowly), but no Linux user space.
    Pvm,
    /// Hardware virtualization: everything.
    Hardware,
}

impl HostKvm {
    /// Probes /dev/kvm and the KVM flavour.
    pub fn probe() -> Self {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        match (usable, host_is_pvm()) {
            (false, _) => HostKvm::None,
            (true, true) => HostKvm::Pvm,
            (true, false) => HostKvm::Hardware,
        }
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

/// Guest command-line additions PVM needs to boot an unmodified Linux kernel (MACHINE.md).
pub const PVM_CMDLINE_QUIRKS: &[&str] = &[
    "clearcpuid=cx16,popcnt,movbe,bmi1,bmi2,fsgsbase,rdrand,rdseed,rdpid,adx,aes,pclmulqdq,erms,fsrm,smap",
    "noxsave",
    "initcall_blacklist=ptp_kvm_init",
    "vessel_skip_int3_selftest",
];

/// A file-backed virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Backing file (or block device).
    pub path: PathBuf,
    /// Refuse guest writes and offer VIRTIO_BLK_F_RO.
    #[serde(default)]
    pub read_only: bool,
}

impl std::str::FromStr for BlockConfig {
    type Err = String;

    /// `PATH[,ro]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty block path")?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "ro" => read_only = true,
                "rw" => read_only = false,
                other => return Err(format!("unknown block option {other:?} (use ro or rw)")),
            }
        }
        Ok(BlockConfig {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A virtio-net device on a host tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Tap interface name (created if missing and the VMM may; usually pre-created).
    pub tap: String,
    /// Guest MAC address; derived from the device index when unset.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `TAP[,mac=AA:BB:CC:DD:EE:FF]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let tap = parts
            .next()
            .filter(|t| !t.is_empty())
            .ok_or("empty tap name")?;
        let mut mac = None;
        for opt in parts {
            let m = opt
                .strip_prefix("mac=")
                .ok_or_else(|| format!("unknown net option {opt:?} (use mac=...)"))?;
            let bytes: Vec<u8> = m
                .split(':')
                .map(|b| u8::from_str_radix(b, 16))
                .collect::<Result<_, _>>()
                .map_err(|_| format!("bad MAC address {m:?}"))?;
            mac = Some(<[u8; 6]>::try_from(bytes).map_err(|_| format!("bad MAC address {m:?}"))?);
        }
        Ok(NetConfig {
            tap: tap.to_string(),
            mac,
        })
    }
}

/// A virtio-fs device served by a vhost-user backend (virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The backend's vhost-user socket (virtiofsd `--socket-path`).
    pub socket: PathBuf,
    /// Tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// `SOCKET,tag=TAG`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (socket, tag) = s
            .split_once(",tag=")
            .ok_or_else(|| format!("{s:?}: use SOCKET,tag=TAG"))?;
        Ok(FsConfig {
            socket: PathBuf::from(socket),
            tag: tag.to_string(),
        })
    }
}

/// The hybrid vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Unix socket the host connects to (`CONNECT <port>\n`); guest-initiated connections
    /// to host port P go to `<uds>_<P>`.
    pub uds: PathBuf,
    /// The guest's context id (>= 3).
    pub cid: u32,
}

/// Everything needed to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel: PVH ELF `vmlinux` or `bzImage`.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (device declarations and quirks are appended).
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Where the guest's serial console goes; stdout when unset.
    #[serde(default)]
    pub serial_log: Option<PathBuf>,
    /// Hybrid vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Block devices, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    /// Network devices (eth0, eth1, ...).
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-fs shares.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-balloon device with this initial target (MiB).
    #[serde(default)]
    pub balloon_mib: Option<u64>,
    /// PVM workarounds.
    #[serde(default)]
    pub pvm_quirks: PvmQuirks,
}

fn default_mem() -> u64 {
    128
}

fn default_vcpus() -> u8 {
    1
}

/// Invalid configuration.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConfigError {
    /// vcpus must be between 1 and 32, got {0}
    Vcpus(u8),
    /// vsock cid must be at least 3 (0-2 are reserved), got {0}
    Cid(u32),
    /// Too many devices: {0} (at most 19 virtio devices fit the IRQ range)
    TooManyDevices(usize),
}

impl VmConfig {
    /// Checks values that the type system does not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=32).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 {
                return Err(ConfigError::Cid(v.cid));
            }
        }
        let devices = self.block.len()
            + self.fs.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon_mib.is_some());
        if devices > (crate::arch::layout::IRQ_MAX - crate::arch::layout::IRQ_BASE + 1) as usize {
            return Err(ConfigError::TooManyDevices(devices));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_option_parsing() {
        let b: BlockConfig = "/a,ro".parse().unwrap();
        assert!(b.read_only);
        assert!("/a,xx".parse::<BlockConfig>().is_err());
        assert!("".parse::<BlockConfig>().is_err());
        let n: NetConfig = "tap0,mac=02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 10]));
        assert!("tap0,mac=zz".parse::<NetConfig>().is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"k","bogus":1}"#);
        assert!(e.is_err());
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"k"}"#).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (128, 1));
        assert!(c.validate().is_ok());
    }
}
