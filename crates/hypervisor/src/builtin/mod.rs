//! Built-in backend: `vessel-vmm`, our rust-vmm based VMM (crates/vmm).
//!
//! Needs hardware KVM to run Linux user space (and so the agent). On a host
//! whose KVM is kvm_pvm the guest kernel boots but user space cannot run, so
//! [`Builtin::new`] refuses unless told otherwise (tests of process handling).

pub(crate) mod api;
pub mod jail;

pub use jail::JailerConfig;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::process::{Child, Command};

use crate::host::{detect_kvm, KvmKind};
use crate::process::{spawn, wait_for_path};
use crate::process_vm::{Control, ProcessVm};
use crate::{
    Accelerator, AgentChannel, AgentEndpoint, Capabilities, Error, Hypervisor, Nic, Result,
    SnapshotInfo, Vm, VmConfig,
};

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

    fn args(cfg: &VmConfig, api_sock: &std::path::Path) -> Vec<String> {
        let mut a = vec![
            "--kernel".to_string(),
            cfg.kernel.display().to_string(),
            "--initramfs".into(),
            cfg.initramfs.display().to_string(),
            // `reboot=k`: the agent's reboot resets through the i8042, which ends vessel-vmm.
            "--cmdline".into(),
            crate::guest_cmdline(cfg, &["reboot=k"]),
            "--mem-mib".into(),
            cfg.memory_mib.to_string(),
            "--vcpus".into(),
            cfg.vcpus.to_string(),
            "--serial-log".into(),
            cfg.console_log.display().to_string(),
            "--api-sock".into(),
            api_sock.display().to_string(),
            "--vsock-uds".into(),
            cfg.vsock_uds.display().to_string(),
            "--vsock-cid".into(),
            "3".into(),
            "--rng".into(),
        ];
        // Each tap by the fd vessel-vmm inherits (see Builtin::spawn_vmm); the VMM probes
        // the tap's vnet header and offloads itself.
        for nic in &cfg.nics {
            match nic {
                Nic::VirtioTap(tap) => {
                    let mut spec = format!("fd={},mac={}", tap.raw_fd(), tap.mac);
                    if let Some(mtu) = tap.mtu.and_then(|m| u16::try_from(m).ok()) {
                        spec.push_str(&format!(",mtu={mtu}"));
                    }
                    a.extend(["--net".into(), spec]);
                }
            }
        }
        for (i, share) in cfg.shared_dirs.iter().enumerate() {
            a.push("--fs".into());
            a.push(format!(
                "{},tag={}",
                crate::virtiofs::socket(&cfg.run_dir, i).display(),
                share.tag
            ));
        }
        a
    }
}

#[async_trait]
impl Hypervisor for Builtin {
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
        let api_sock = cfg.run_dir.join(API_SOCKET);
        let child = match self.spawn_vmm(cfg, &Self::args(cfg, &api_sock)) {
            Ok(c) => c,
            Err(e) => {
                crate::process::terminate_all(&mut helpers).await;
                return Err(e);
            }
        };
        Ok(self.watch(cfg, child, helpers))
    }

    async fn restore(&self, dir: &Path, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        if !cfg.nics.is_empty() {
            return Err(Error::Unsupported {
                backend: "builtin",
                operation:
                    "restoring a snapshot with network devices (their taps belong to one sandbox)",
            });
        }
        let info = SnapshotInfo::load(dir)?;
        info.check_matches(self.name(), cfg)?;
        if !dir.join("state.json").is_file() {
            return Err(Error::InvalidConfig(format!(
                "{} has no vessel-vmm state.json",
                dir.display()
            )));
        }
        let api_sock = cfg.run_dir.join(API_SOCKET);
        let log = cfg.run_dir.join(VMM_LOG);
        let args: Vec<String> = [
            "--restore",
            &dir.display().to_string(),
            "--serial-log",
            &cfg.console_log.display().to_string(),
            "--vsock-uds",
            &cfg.vsock_uds.display().to_string(),
            "--api-sock",
            &api_sock.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(j) = &self.config.jailer {
            jail::grant_snapshot_read(dir, j.gid)?;
        }
        let mut child = self.spawn_vmm(cfg, &args)?;
        // The API socket exists before the restore starts and answers once the
        // restored VM runs; a failed restore ends the process.
        let restored = async {
            wait_for_path(&api_sock, &mut child, "vessel-vmm", &log, RESTORE_TIMEOUT).await?;
            let start = std::time::Instant::now();
            loop {
                let answered = tokio::select! {
                    r = api::request(&api_sock, "metrics") => r,
                    status = child.wait() => return Err(Error::EarlyExit {
                        what: "vessel-vmm (restoring)",
                        status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                        detail: crate::process::log_tail(&log, 20),
                    }),
                };
                match answered {
                    Ok(()) => return Ok(()),
                    // Not answering yet, or the VMM exited and left its socket
                    // behind (the next round reports the exit).
                    Err(_) if start.elapsed() < RESTORE_TIMEOUT => {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .await;
        if let Err(e) = restored {
            crate::process::terminate(&mut child, std::time::Duration::ZERO).await;
            return Err(e);
        }
        Ok(self.watch(cfg, child, Vec::new()))
    }
}

impl Builtin {
    /// Starts vessel-vmm with `args` (host paths), under the jailer when one
    /// is configured, logging to the run directory.
    fn spawn_vmm(&self, cfg: &VmConfig, args: &[String]) -> Result<Child> {
        let log = cfg.run_dir.join(VMM_LOG);
        let (what, mut cmd) = match &self.config.jailer {
            None => {
                let mut cmd = Command::new(&self.config.vmm);
                cmd.args(args);
                ("vessel-vmm", cmd)
            }
            Some(j) => (
                "vessel-jailer",
                jail::command(j, &self.config.vmm, cfg, args)?,
            ),
        };
        let fds = crate::nic::tap_fds(&cfg.nics);
        if !fds.is_empty() {
            // SAFETY: runs in the forked child before exec; inherit_fds only calls
            // fcntl(2) (async-signal-safe) on the tap fds, which the caller keeps open
            // (cfg.nics) until spawn returns. The jailer passes them on (--keep-fd).
            unsafe {
                cmd.pre_exec(move || crate::nic::inherit_fds(&fds));
            }
        }
        spawn(what, cmd, &log)
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

/// How long a restore may take before the VM answers its API.
const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// vessel-vmm snapshots VMs without virtio-fs and network devices.
fn snapshottable(cfg: &VmConfig) -> crate::process_vm::Snapshottable {
    if !cfg.shared_dirs.is_empty() {
        Err("snapshot of a VM with virtio-fs shares (vessel-vmm cannot save vhost-user-fs state)")
    } else if !cfg.nics.is_empty() {
        Err("snapshot of a VM with network devices (their taps belong to one sandbox)")
    } else {
        Ok(SnapshotInfo::of("builtin", Accelerator::Kvm, cfg))
    }
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
            shared_dirs: vec![SharedDir {
                tag: "rootfs".into(),
                host_path: "/b".into(),
                read_only: false,
            }],
            nics: Vec::new(),
        }
    }

    #[test]
    fn command_line() {
        let cfg = vm_config();
        let a = Builtin::args(&cfg, std::path::Path::new("/r/a/vmm-api.sock")).join(" ");
        assert!(
            a.contains("--kernel /k/vmlinux --initramfs /k/i.cpio.gz"),
            "{a}"
        );
        assert!(
            a.contains("reboot=k") && a.contains("vessel.channel=vsock"),
            "{a}"
        );
        assert!(a.contains("--mem-mib 256 --vcpus 2"), "{a}");
        assert!(
            a.contains("--vsock-uds /r/a/vsock.sock --vsock-cid 3"),
            "{a}"
        );
        assert!(a.contains("--fs /r/a/fs0.sock,tag=rootfs"), "{a}");
        assert!(a.contains("--api-sock /r/a/vmm-api.sock"), "{a}");
        assert!(!a.contains("--net"), "{a}");
    }

    #[test]
    fn taps_go_by_inherited_fd_and_block_snapshots() {
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
        let a = Builtin::args(&cfg, std::path::Path::new("/r/a/vmm-api.sock")).join(" ");
        assert!(
            a.contains(&format!("--net fd={raw},mac=02:00:00:00:00:0a,mtu=1400")),
            "{a}"
        );
        let e = snapshottable(&cfg).unwrap_err();
        assert!(e.contains("network devices"), "{e}");
    }
}
