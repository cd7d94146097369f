//! VM configuration, as given on vessel-vmm's command line or in the `configure` request.

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
            PvmQuirks::Auto => crate::kvm::host_is_pvm(),
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
    /// Tap interface name to open (needs CAP_NET_ADMIN to create it); exclusive with `fd`.
    #[serde(default)]
    pub tap: Option<String>,
    /// An open tap fd the VMM inherited (the runtime opens the tap in the sandbox's
    /// network namespace; a jailed VMM cannot); exclusive with `tap`.
    #[serde(default)]
    pub fd: Option<i32>,
    /// Guest MAC address; derived from the device index when unset.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// MTU the guest is told (VIRTIO_NET_F_MTU); unset offers none.
    #[serde(default)]
    pub mtu: Option<u16>,
}

impl NetConfig {
    /// How the tap is named in messages: its name or `fd N`.
    pub fn describe(&self) -> String {
        match (&self.tap, self.fd) {
            (Some(t), _) => t.clone(),
            (None, Some(fd)) => format!("tap fd {fd}"),
            (None, None) => "tap (none given)".into(),
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `TAP[,mac=AA:BB:CC:DD:EE:FF][,mtu=N]` or `fd=N[,mac=...][,mtu=N]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let first = parts
            .next()
            .filter(|t| !t.is_empty())
            .ok_or("empty tap name")?;
        let (tap, fd) = match first.strip_prefix("fd=") {
            Some(n) => {
                let fd: i32 = n.parse().map_err(|_| format!("bad tap fd {n:?}"))?;
                (None, Some(fd))
            }
            None => (Some(first.to_string()), None),
        };
        let mut mac = None;
        let mut mtu = None;
        for opt in parts {
            if let Some(m) = opt.strip_prefix("mtu=") {
                mtu = Some(m.parse::<u16>().map_err(|_| format!("bad MTU {m:?}"))?);
                continue;
            }
            let m = opt
                .strip_prefix("mac=")
                .ok_or_else(|| format!("unknown net option {opt:?} (use mac=... or mtu=...)"))?;
            let bytes: Vec<u8> = m
                .split(':')
                .map(|b| u8::from_str_radix(b, 16))
                .collect::<Result<_, _>>()
                .map_err(|_| format!("bad MAC address {m:?}"))?;
            mac = Some(<[u8; 6]>::try_from(bytes).map_err(|_| format!("bad MAC address {m:?}"))?);
        }
        Ok(NetConfig { tap, fd, mac, mtu })
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

/// Caps of the serial log file, which the guest writes at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialLogLimits {
    /// The file never grows past this many bytes (the newest output is kept).
    pub max_bytes: u64,
    /// Sustained bytes per second accepted (0: none); output over it is dropped.
    pub bytes_per_sec: u64,
}

impl Default for SerialLogLimits {
    fn default() -> Self {
        vessel_logcap::Limits::default().into()
    }
}

impl From<vessel_logcap::Limits> for SerialLogLimits {
    fn from(l: vessel_logcap::Limits) -> Self {
        SerialLogLimits {
            max_bytes: l.max_bytes,
            bytes_per_sec: l.bytes_per_sec,
        }
    }
}

impl From<SerialLogLimits> for vessel_logcap::Limits {
    fn from(l: SerialLogLimits) -> Self {
        vessel_logcap::Limits {
            max_bytes: l.max_bytes,
            bytes_per_sec: l.bytes_per_sec,
        }
    }
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
    /// Size and rate caps of `serial_log`.
    #[serde(default)]
    pub serial_log_limits: SerialLogLimits,
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

/// How many virtio devices fit vessel-vmm's IRQ range (IRQs 5 to 23).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Invalid configuration.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConfigError {
    /// vcpus must be between 1 and 32, got {0}
    Vcpus(u8),
    /// vsock cid must be at least 3 (0-2 are reserved), got {0}
    Cid(u32),
    /// Too many devices: {0} (at most 19 virtio devices fit the IRQ range)
    TooManyDevices(usize),
    /// network device {0}: give exactly one of a tap name and a tap fd
    NetSource(usize),
    /// network device {0}: tap fd {1} is not an inherited descriptor (use 3 or above, each once)
    NetFd(usize, i32),
    /// network device {0}: MTU {1} is outside 68-65535
    NetMtu(usize, u16),
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
        let mut fds = Vec::new();
        for (i, n) in self.net.iter().enumerate() {
            match (&n.tap, n.fd) {
                (Some(t), None) if !t.is_empty() => {}
                (None, Some(fd)) => {
                    if fd < 3 || fds.contains(&fd) {
                        return Err(ConfigError::NetFd(i, fd));
                    }
                    fds.push(fd);
                }
                _ => return Err(ConfigError::NetSource(i)),
            }
            if let Some(mtu) = n.mtu.filter(|m| *m < 68) {
                return Err(ConfigError::NetMtu(i, mtu));
            }
        }
        let devices = self.block.len()
            + self.net.len()
            + self.fs.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + usize::from(self.balloon_mib.is_some());
        if devices > MAX_VIRTIO_DEVICES {
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
        assert_eq!(n.tap.as_deref(), Some("tap0"));
        assert!("tap0,mac=zz".parse::<NetConfig>().is_err());
        let n: NetConfig = "fd=7,mac=02:00:00:00:00:0b,mtu=1400".parse().unwrap();
        assert_eq!((n.tap, n.fd, n.mtu), (None, Some(7), Some(1400)));
        assert!("fd=x".parse::<NetConfig>().is_err());
        assert!("fd=7,mtu=99999".parse::<NetConfig>().is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"k","bogus":1}"#);
        assert!(e.is_err());
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"k"}"#).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (128, 1));
        assert_eq!(
            c.serial_log_limits.max_bytes,
            vessel_logcap::DEFAULT_MAX_BYTES
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn net_devices_need_one_valid_source() {
        let mut c: VmConfig = serde_json::from_str(r#"{"kernel":"k"}"#).unwrap();
        let net = |s: &str| s.parse::<NetConfig>().unwrap();
        c.net = vec![net("fd=5"), net("tap0")];
        assert!(c.validate().is_ok());
        c.net = vec![net("fd=5"), net("fd=5")];
        assert!(matches!(c.validate(), Err(ConfigError::NetFd(1, 5))));
        c.net = vec![net("fd=1")];
        assert!(matches!(c.validate(), Err(ConfigError::NetFd(0, 1))));
        c.net = vec![NetConfig {
            tap: Some("t".into()),
            fd: Some(4),
            mac: None,
            mtu: None,
        }];
        assert!(matches!(c.validate(), Err(ConfigError::NetSource(0))));
        c.net = vec![net("fd=4,mtu=20")];
        assert!(matches!(c.validate(), Err(ConfigError::NetMtu(0, 20))));
    }
}
