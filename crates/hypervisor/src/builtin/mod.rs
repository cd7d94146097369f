//! Built-in backend: `vessel-vmm`, our rust-vmm based VMM (crates/vmm).
//!
//! Needs hardware KVM to run Linux user space (and so the agent). On a host
//! whose KVM is kvm_pvm the guest kernel boots but user space cannot run, so
//! [`Builtin::new`] refuses unless told otherwise (tests of process handling).

pub mod api;
pub mod jail;

pub use jail::JailerConfig;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::host::{detect_kvm, KvmKind};
use crate::process::{spawn, wait_for_path};
use crate::process_vm::{Control, ProcessVm};
use crate::{
    Accelerator, AgentChannel, AgentEndpoint, Capabilities, Error, HostOverhead, Hypervisor, Nic,
    Result, SnapshotInfo, Vm, VmConfig,
};
use vessel_vmm_api as vmm_api;

/// Built-in backend settings.
#[derive(Debug, Clone)]
pub struct BuiltinConfig {
    /// `vessel-vmm` binary.
    pub vmm: PathBuf,
    /// `virtiofsd` binary, needed for shared directories.
    pub virtiofsd: PathBuf,
    /// Refuse hosts without hardware KVM (the default; off only in tests).
    pub require_hardware_kvm: bool,
    /// Run vessel-vmm under vessel-jailer (see [`jail`]); `None` runs it directly.
    pub jailer: Option<JailerConfig>,
}

pub struct Builtin {
    config: BuiltinConfig,
}

impl Builtin {
    pub fn new(config: BuiltinConfig) -> Result<Self> {
        if !config.vmm.is_file() {
            return Err(Error::NotFound {
                what: "vessel-vmm",
                path: config.vmm.clone(),
                hint: "run 'make install' or set builtin.vmm_path in /etc/vessel/config.toml",
            });
        }
        let (kvm, why) = detect_kvm();
        if config.require_hardware_kvm && kvm != KvmKind::Hardware {
            return Err(Error::InvalidConfig(format!(
                "the built-in VMM needs hardware KVM to run the guest's user space; this host's KVM is {kvm} ({why}). Use hypervisor = \"qemu\" (QEMU with TCG)"
            )));
        }
        Ok(Builtin { config })
    }

    /// What vessel-vmm is configured with for `cfg` (host paths).
    fn vmm_config(cfg: &VmConfig) -> Result<vmm_api::VmConfig> {
        let vcpus = u8::try_from(cfg.vcpus).map_err(|_| {
            Error::InvalidConfig(format!("{} vCPUs: vessel-vmm takes at most 32", cfg.vcpus))
        })?;
        Ok(vmm_api::VmConfig {
            kernel: cfg.kernel.clone(),
            initramfs: Some(cfg.initramfs.clone()),
            // `reboot=k`: the agent's reboot resets through the i8042, which ends vessel-vmm.
            cmdline: crate::guest_cmdline(cfg, &["reboot=k"]),
            mem_mib: u64::from(cfg.memory_mib),
            vcpus,
            serial_log: Some(cfg.console_log.clone()),
            serial_log_limits: cfg.log_limits.into(),
            vsock: Some(vmm_api::config::VsockConfig {
                uds: cfg.vsock_uds.clone(),
                cid: 3,
            }),
            block: Vec::new(),
            // Each tap by the fd vessel-vmm inherits (see Builtin::spawn_vmm); the VMM
            // probes the tap's vnet header and offloads itself.
            net: cfg
                .nics
                .iter()
                .map(|nic| match nic {
                    Nic::VirtioTap(tap) => vmm_api::config::NetConfig {
                        tap: None,
                        fd: Some(tap.raw_fd()),
                        mac: Some(tap.mac.0),
                        mtu: tap.mtu.and_then(|m| u16::try_from(m).ok()),
                    },
                })
                .collect(),
            fs: cfg
                .shared_dirs
                .iter()
                .enumerate()
                .map(|(i, share)| vmm_api::config::FsConfig {
                    socket: crate::virtiofs::socket(&cfg.run_dir, i),
                    tag: share.tag.clone(),
                })
                .collect(),
            rng: true,
            // No inflation, only free page reporting: what an idle guest frees
            // goes back to the host (docs/snapshots.md).
            balloon_mib: Some(0),
            pvm_quirks: Default::default(),
        })
    }
}

/// What vessel-vmm is asked to do once its API socket is up.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// `configure` with this configuration, then `boot`.
    Boot(Box<vmm_api::VmConfig>),
    /// `restore` the snapshot in `dir` with the VM's own serial log (and its caps),
    /// vsock socket and virtiofsd sockets, and run it.
    Restore {
        dir: PathBuf,
        serial_log: PathBuf,
        serial_log_limits: vmm_api::SerialLogLimits,
        vsock_uds: PathBuf,
        fs_sockets: Vec<PathBuf>,
        /// The clone's taps, by the fd numbers vessel-vmm inherits.
        net_fds: Vec<i32>,
    },
}

impl Start {
    /// The requests to send, in order.
    fn requests(self) -> Vec<vmm_api::Request> {
        match self {
            Start::Boot(config) => vec![
                vmm_api::Request::Configure { config: *config },
                vmm_api::Request::Boot {},
            ],
            Start::Restore {
                dir,
                serial_log,
                serial_log_limits,
                vsock_uds,
                fs_sockets,
                net_fds,
            } => vec![vmm_api::Request::Restore {
                dir,
                serial_log: Some(serial_log),
                serial_log_limits: Some(serial_log_limits),
                vsock_uds: Some(vsock_uds),
                fs_sockets,
                net_fds,
                paused: false,
            }],
        }
    }
}

#[async_trait]
impl Hypervisor for Builtin {
    fn snapshot_blocker(&self, config: &VmConfig) -> Option<&'static str> {
        snapshottable(config).err()
    }

    fn name(&self) -> &'static str {
        "builtin"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accelerator: Accelerator::Kvm,
            channels: vec![AgentChannel::Vsock],
            pause_resume: true,
            shared_dirs: self.config.virtiofsd.is_file(),
            snapshot: true,
        }
    }

    fn host_overhead(&self) -> Option<HostOverhead> {
        // vessel-vmm beside guest RAM (~15 MiB, docs/performance.md), virtiofsd,
        // the jailer and the supervisor.
        Some(HostOverhead {
            memory_mib: 96,
            pids: crate::HOST_PIDS,
        })
    }

    async fn launch(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        crate::check_vm_config(cfg)?;
        if cfg.channel != AgentChannel::Vsock {
            return Err(Error::Unsupported {
                backend: "builtin",
                operation: "virtio-serial agent channel (use vsock)",
            });
        }
        let mut helpers = Vec::new();
        if let Err(e) = crate::virtiofs::start(&self.config.virtiofsd, cfg, &mut helpers).await {
            crate::process::terminate_all(&mut helpers).await;
            return Err(e);
        }
        let start = match Self::vmm_config(cfg) {
            Ok(c) => Start::Boot(Box::new(c)),
            Err(e) => {
                crate::process::terminate_all(&mut helpers).await;
                return Err(e);
            }
        };
        let child = match self.start_vmm(cfg, start, "vessel-vmm").await {
            Ok(c) => c,
            Err(e) => {
                crate::process::terminate_all(&mut helpers).await;
                return Err(e);
            }
        };
        Ok(self.watch(cfg, child, helpers))
    }

    async fn restore(&self, dir: &Path, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        let info = SnapshotInfo::load(dir)?;
        info.check_matches(self.name(), cfg)?;
        if !dir.join("state.json").is_file() {
            return Err(Error::InvalidConfig(format!(
                "{} has no vessel-vmm state.json",
                dir.display()
            )));
        }
        if let Some(j) = &self.config.jailer {
            jail::grant_snapshot_read(dir, j.gid)?;
        }
        // The clone's own virtiofsd for each share, at its own socket; the VMM
        // reconnects the snapshot's virtio-fs devices to them.
        let mut helpers = Vec::new();
        if let Err(e) = crate::virtiofs::start(&self.config.virtiofsd, cfg, &mut helpers).await {
            crate::process::terminate_all(&mut helpers).await;
            return Err(e);
        }
        let start = Start::Restore {
            dir: dir.to_path_buf(),
            serial_log: cfg.console_log.clone(),
            serial_log_limits: cfg.log_limits.into(),
            vsock_uds: cfg.vsock_uds.clone(),
            fs_sockets: (0..cfg.shared_dirs.len())
                .map(|i| crate::virtiofs::socket(&cfg.run_dir, i))
                .collect(),
            // Inherited at their own numbers (start_vmm), as at boot.
            net_fds: crate::nic::tap_fds(&cfg.nics),
        };
        let child = match self.start_vmm(cfg, start, "vessel-vmm (restoring)").await {
            Ok(c) => c,
            Err(e) => {
                crate::process::terminate_all(&mut helpers).await;
                return Err(e);
            }
        };
        Ok(self.watch(cfg, child, helpers))
    }
}

impl Builtin {
    /// Starts vessel-vmm (under the jailer when one is configured) with only its API
    /// socket on the command line, then configures and boots it, or restores, over the API.
    /// A VMM that fails any step is stopped.
    async fn start_vmm(&self, cfg: &VmConfig, start: Start, what: &'static str) -> Result<Child> {
        let log = cfg.run_dir.join(VMM_LOG);
        let api_sock = cfg.run_dir.join(API_SOCKET);
        let (spawned, start) = match &self.config.jailer {
            None => {
                let mut cmd = Command::new(&self.config.vmm);
                cmd.arg("--api-sock").arg(&api_sock);
                (("vessel-vmm", cmd), start)
            }
            Some(j) => {
                let (cmd, start) = jail::command(j, &self.config.vmm, cfg, start)?;
                (("vessel-jailer", cmd), start)
            }
        };
        let (name, mut cmd) = spawned;
        let fds = crate::nic::tap_fds(&cfg.nics);
        if !fds.is_empty() {
            // SAFETY: runs in the forked child before exec; inherit_fds only calls
            // fcntl(2) (async-signal-safe) on the tap fds, which the caller keeps open
            // (cfg.nics) until spawn returns. The jailer passes them on (--keep-fd).
            unsafe {
                cmd.pre_exec(move || crate::nic::inherit_fds(&fds));
            }
        }
        if let Some(ns) = &cfg.netns {
            let ns = std::os::fd::AsRawFd::as_raw_fd(ns.as_ref());
            // SAFETY: as in the QEMU backend: only setns(2) on an fd the
            // caller keeps open (cfg.netns) until spawn returns.
            unsafe {
                cmd.pre_exec(move || crate::process::enter_netns(ns));
            }
        }
        let requests = start.requests();
        let mut child = spawn(name, cmd, &log, cfg)?;
        let started = async {
            wait_for_path(&api_sock, &mut child, what, &log, START_TIMEOUT).await?;
            // The socket file exists from bind(), a moment before listen(): a connect in
            // between is refused. Poll until one is accepted.
            let t0 = std::time::Instant::now();
            while let Err(e) = tokio::net::UnixStream::connect(&api_sock).await {
                if t0.elapsed() > START_TIMEOUT {
                    return Err(Error::VmmApi {
                        request: "connect",
                        source: api::ApiCallError::Connect(api_sock.clone(), e),
                    });
                }
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::EarlyExit {
                        what,
                        status: status.to_string(),
                        detail: crate::process::exit_log_tail(&log, 20),
                    });
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            for req in requests {
                tokio::select! {
                    r = api::request(&api_sock, req) => r?,
                    status = child.wait() => return Err(Error::EarlyExit {
                        what,
                        status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                        detail: crate::process::exit_log_tail(&log, 20),
                    }),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = started {
            crate::process::terminate(&mut child, std::time::Duration::ZERO).await;
            return Err(e);
        }
        Ok(child)
    }

    /// Supervises the started VMM. A jailed VMM can write only its run
    /// directory, so it is driven through [`Control::JailedVmmApi`].
    fn watch(&self, cfg: &VmConfig, vmm: Child, helpers: Vec<Child>) -> Box<dyn Vm> {
        let api = cfg.run_dir.join(API_SOCKET);
        let control = match self.config.jailer {
            None => Control::VmmApi(api),
            Some(_) => Control::JailedVmmApi {
                api,
                run_dir: cfg.run_dir.clone(),
            },
        };
        Box::new(ProcessVm::watch(
            vmm,
            helpers,
            Accelerator::Kvm,
            AgentEndpoint::HybridVsock {
                uds: cfg.vsock_uds.clone(),
            },
            control,
            snapshottable(cfg),
            &cfg.run_dir,
        ))
    }
}

/// vessel-vmm's control API socket, in the run directory.
const API_SOCKET: &str = "vmm-api.sock";
/// vessel-vmm's (or the jailer's) stdout and stderr, in the run directory.
const VMM_LOG: &str = "vmm.log";

/// How long vessel-vmm (or the jailer) may take to create its API socket.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// vessel-vmm snapshots every VM it runs. Its virtio-fs devices are saved with
/// their ring state and reconnect to the clone's own virtiofsd, which is sound
/// only while the guest has mounted none of them (no FUSE session to carry
/// over); its network devices are attached to the clone's own taps, and keep
/// the snapshot VM's MAC until the agent is told the clone's. Snapshot before
/// any container exists, as templates do.
fn snapshottable(cfg: &VmConfig) -> crate::process_vm::Snapshottable {
    Ok(SnapshotInfo::of("builtin", Accelerator::Kvm, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedDir;

    fn vm_config() -> VmConfig {
        VmConfig {
            id: "a".into(),
            run_dir: "/r/a".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/i.cpio.gz".into(),
            kernel_args: vec![],
            vcpus: 2,
            memory_mib: 256,
            channel: AgentChannel::Vsock,
            vsock_uds: "/r/a/vsock.sock".into(),
            console_log: "/r/a/console.log".into(),
            log_limits: Default::default(),
            shared_dirs: vec![SharedDir {
                tag: "rootfs".into(),
                host_path: "/b".into(),
                read_only: false,
            }],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        }
    }

    #[test]
    fn vmm_configuration() {
        let cfg = vm_config();
        let c = Builtin::vmm_config(&cfg).unwrap();
        assert_eq!(c.kernel, std::path::Path::new("/k/vmlinux"));
        assert_eq!(
            c.initramfs.as_deref(),
            Some(std::path::Path::new("/k/i.cpio.gz"))
        );
        assert!(
            c.cmdline.contains("reboot=k") && c.cmdline.contains("vessel.channel=vsock"),
            "{}",
            c.cmdline
        );
        assert_eq!((c.mem_mib, c.vcpus, c.rng), (256, 2, true));
        let v = c.vsock.as_ref().unwrap();
        assert_eq!((v.uds.to_str(), v.cid), (Some("/r/a/vsock.sock"), 3));
        assert_eq!(c.fs[0].socket, std::path::Path::new("/r/a/fs0.sock"));
        assert_eq!(c.fs[0].tag, "rootfs");
        assert!(c.net.is_empty());
        assert!(c.validate().is_ok());
        // What the VMM is sent is what it parses.
        let req = vmm_api::Request::Configure { config: c.clone() };
        let back = vmm_api::parse_request(req.to_line().trim_end().as_bytes()).unwrap();
        assert_eq!(back, req);
        let mut big = cfg.clone();
        big.vcpus = 300;
        assert!(Builtin::vmm_config(&big).is_err());
    }

    #[test]
    fn taps_go_by_inherited_fd_and_snapshots_record_their_macs() {
        let fd = std::sync::Arc::new(std::os::fd::OwnedFd::from(
            std::fs::File::open("/dev/null").unwrap(),
        ));
        let raw = std::os::fd::AsRawFd::as_raw_fd(&*fd);
        let mut cfg = vm_config();
        cfg.shared_dirs.clear();
        cfg.nics = vec![Nic::VirtioTap(crate::TapNic {
            tap_name: "tap0_vessel".into(),
            fd,
            vnet_hdr: true,
            mac: crate::MacAddr([2, 0, 0, 0, 0, 0x0a]),
            mtu: Some(1400),
        })];
        let c = Builtin::vmm_config(&cfg).unwrap();
        assert_eq!(
            c.net,
            vec![vmm_api::config::NetConfig {
                tap: None,
                fd: Some(raw),
                mac: Some([2, 0, 0, 0, 0, 0x0a]),
                mtu: Some(1400),
            }]
        );
        // Snapshots record the NICs' MACs: a clone's guest finds its devices by them.
        let info = snapshottable(&cfg).unwrap();
        assert_eq!(info.nics, vec![[2, 0, 0, 0, 0, 0x0a]]);
    }
}
