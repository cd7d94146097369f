//! QEMU backend: KVM on hosts with hardware KVM, TCG otherwise.
//!
//! Per VM: one `qemu-system-x86_64` process, plus `vhost-device-vsock` (the
//! vsock device in user space, since vhost-vsock may be missing) and one
//! `virtiofsd` per shared directory. All of them are children of the caller,
//! die with it (PR_SET_PDEATHSIG), and are stopped when QEMU exits.

mod cmdline;
mod qmp;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub use cmdline::Machine;
use cmdline::Paths;

use crate::host::{detect_kvm, pick_accelerator, Accelerator};
use crate::process::{log_tail, spawn, terminate, wait_for_path};
use crate::{
    AgentChannel, AgentEndpoint, Capabilities, Error, Hypervisor, Result, Vm, VmConfig, VmExit,
};

/// How long a helper may take to create its socket.
const HELPER_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Grace period for helpers after QEMU has gone.
const HELPER_STOP_GRACE: Duration = Duration::from_secs(2);

/// QEMU backend settings.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// `vhost-device-vsock` binary, needed for the vsock channel.
    pub vhost_vsock: PathBuf,
    /// `virtiofsd` binary, needed for shared directories.
    pub virtiofsd: PathBuf,
    pub machine: Machine,
    /// Forced accelerator; `None` picks KVM on hardware KVM, TCG otherwise.
    pub accelerator: Option<Accelerator>,
}

pub struct Qemu {
    config: QemuConfig,
    accelerator: Accelerator,
}

impl Qemu {
    /// Checks that the QEMU binary exists and picks the accelerator.
    pub fn new(config: QemuConfig) -> Result<Self> {
        if !config.qemu.is_file() {
            return Err(Error::NotFound {
                what: "QEMU",
                path: config.qemu.clone(),
                hint: "install qemu-system-x86 or set qemu_path in /etc/vessel/config.toml",
            });
        }
        let accelerator = config.accelerator.unwrap_or_else(|| {
            let (kvm, why) = detect_kvm();
            let accel = pick_accelerator(kvm);
            log::info!("qemu: accelerator {accel} (KVM: {kvm}: {why})");
            accel
        });
        Ok(Qemu {
            config,
            accelerator,
        })
    }

    /// `qemu-system-x86_64 --version`, first line.
    pub async fn version(qemu: &Path) -> Result<String> {
        let out = Command::new(qemu)
            .arg("--version")
            .output()
            .await
            .map_err(|source| Error::Spawn {
                what: "QEMU",
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }

    fn require(path: &Path, what: &'static str, hint: &'static str) -> Result<()> {
        if path.is_file() {
            Ok(())
        } else {
            Err(Error::NotFound {
                what,
                path: path.to_path_buf(),
                hint,
            })
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self) -> Capabilities {
        let mut channels = vec![AgentChannel::Serial];
        if self.config.vhost_vsock.is_file() {
            channels.insert(0, AgentChannel::Vsock);
        }
        Capabilities {
            accelerator: self.accelerator,
            channels,
            pause_resume: true,
            shared_dirs: self.config.virtiofsd.is_file(),
        }
    }

    async fn launch(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        for (p, what) in [
            (&cfg.kernel, "guest kernel"),
            (&cfg.initramfs, "guest initramfs"),
        ] {
            Self::require(
                p,
                what,
                "run 'make guest' or set guest_kernel/guest_initramfs in /etc/vessel/config.toml",
            )?;
        }
        if cfg.memory_mib < 64 || cfg.vcpus == 0 {
            return Err(Error::InvalidConfig(format!(
                "need at least 64 MiB and 1 vCPU (got {} MiB, {} vCPUs)",
                cfg.memory_mib, cfg.vcpus
            )));
        }
        let paths = Paths::new(&cfg.run_dir);
        let mut helpers = Vec::new();
        let res = self.start_helpers(cfg, &paths, &mut helpers).await;
        let res = match res {
            Ok(()) => self.start_qemu(cfg, &paths),
            Err(e) => Err(e),
        };
        let child = match res {
            Ok(child) => child,
            Err(e) => {
                for mut h in helpers {
                    terminate(&mut h, HELPER_STOP_GRACE).await;
                }
                return Err(e);
            }
        };
        let endpoint = match cfg.channel {
            AgentChannel::Vsock => AgentEndpoint::HybridVsock {
                uds: cfg.vsock_uds.clone(),
            },
            AgentChannel::Serial => AgentEndpoint::Serial {
                path: paths.agent_serial.clone(),
            },
        };
        Ok(Box::new(QemuVm::watch(
            child,
            helpers,
            self.accelerator,
            endpoint,
            paths.qmp,
            cfg.run_dir.join("qemu.log"),
        )))
    }
}

impl Qemu {
    async fn start_helpers(
        &self,
        cfg: &VmConfig,
        paths: &Paths,
        helpers: &mut Vec<Child>,
    ) -> Result<()> {
        if cfg.channel == AgentChannel::Vsock {
            let bin = &self.config.vhost_vsock;
            Self::require(
                bin,
                "vhost-device-vsock",
                "run 'make deps' (cargo install vhost-device-vsock) or use channel = \"serial\"",
            )?;
            let log = cfg.run_dir.join("vhost-device-vsock.log");
            let mut cmd = Command::new(bin);
            cmd.arg("--guest-cid").arg("3");
            cmd.arg("--socket").arg(&paths.vhost_vsock);
            cmd.arg("--uds-path").arg(&cfg.vsock_uds);
            let mut child = spawn("vhost-device-vsock", cmd, &log)?;
            let ready = wait_for_path(
                &paths.vhost_vsock,
                &mut child,
                "vhost-device-vsock",
                &log,
                HELPER_START_TIMEOUT,
            )
            .await;
            helpers.push(child);
            ready?;
        }
        for (i, share) in cfg.shared_dirs.iter().enumerate() {
            let bin = &self.config.virtiofsd;
            Self::require(
                bin,
                "virtiofsd",
                "run 'make deps' (cargo install virtiofsd)",
            )?;
            let sock = Paths::virtiofs(&cfg.run_dir, i);
            let log = cfg.run_dir.join(format!("virtiofsd-{i}.log"));
            let mut cmd = Command::new(bin);
            cmd.arg(format!("--socket-path={}", sock.display()));
            cmd.arg(format!("--shared-dir={}", share.host_path.display()));
            // The default sandbox (namespaces + seccomp) stays on.
            cmd.args(["--cache=auto", "--announce-submounts", "--xattr"]);
            if share.read_only {
                cmd.arg("--readonly");
            }
            let mut child = spawn("virtiofsd", cmd, &log)?;
            let ready =
                wait_for_path(&sock, &mut child, "virtiofsd", &log, HELPER_START_TIMEOUT).await;
            helpers.push(child);
            ready?;
        }
        Ok(())
    }

    fn start_qemu(&self, cfg: &VmConfig, paths: &Paths) -> Result<Child> {
        let args = cmdline::args(cfg, self.accelerator, self.config.machine, paths);
        log::debug!("qemu: {} {}", self.config.qemu.display(), args.join(" "));
        let mut cmd = Command::new(&self.config.qemu);
        cmd.args(&args);
        spawn("QEMU", cmd, &cfg.run_dir.join("qemu.log"))
    }
}

/// A VM run by QEMU. A background task owns the processes: it waits for QEMU,
/// then stops the helpers and publishes the exit status.
pub struct QemuVm {
    accelerator: Accelerator,
    endpoint: AgentEndpoint,
    qmp: PathBuf,
    qemu_pid: u32,
    pids: Vec<u32>,
    /// Logs of QEMU and its helpers.
    logs: Vec<PathBuf>,
    exit: watch::Receiver<Option<VmExit>>,
    kill: Mutex<Option<tokio::sync::oneshot::Sender<Duration>>>,
}

impl QemuVm {
    fn watch(
        mut qemu: Child,
        mut helpers: Vec<Child>,
        accelerator: Accelerator,
        endpoint: AgentEndpoint,
        qmp: PathBuf,
        qemu_log: PathBuf,
    ) -> Self {
        let qemu_pid = qemu.id().unwrap_or(0);
        let mut pids = vec![qemu_pid];
        pids.extend(helpers.iter().filter_map(|h| h.id()));
        let run_dir = qemu_log.parent().unwrap_or(Path::new(".")).to_path_buf();
        let (tx, rx) = watch::channel(None);
        let (kill_tx, kill_rx) = tokio::sync::oneshot::channel::<Duration>();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = qemu.wait() => s,
                grace = kill_rx => {
                    match grace {
                        Ok(grace) => Ok(terminate(&mut qemu, grace).await),
                        // The QemuVm was dropped without stop(): kill at once.
                        Err(_) => Ok(terminate(&mut qemu, Duration::ZERO).await),
                    }
                }
            };
            for h in &mut helpers {
                terminate(h, HELPER_STOP_GRACE).await;
            }
            let exit = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    VmExit {
                        code: s.code(),
                        signal: s.signal(),
                    }
                }
                Err(_) => VmExit {
                    code: None,
                    signal: None,
                },
            };
            if !exit.success() {
                log::debug!(
                    "qemu pid {qemu_pid} ended with {exit}: {}",
                    log_tail(&qemu_log, 5)
                );
            }
            let _ = tx.send(Some(exit));
        });
        let logs = std::fs::read_dir(&run_dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.extension().is_some_and(|x| x == "log")
                            && p.file_name() != Some("console.log".as_ref())
                    })
                    .collect()
            })
            .unwrap_or_default();
        QemuVm {
            accelerator,
            endpoint,
            qmp,
            qemu_pid,
            pids,
            logs,
            exit: rx,
            kill: Mutex::new(Some(kill_tx)),
        }
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn agent_endpoint(&self) -> AgentEndpoint {
        self.endpoint.clone()
    }

    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }

    async fn wait(&self) -> VmExit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone().unwrap_or(VmExit {
                    code: None,
                    signal: None,
                });
            }
        }
    }

    fn try_exit(&self) -> Option<VmExit> {
        self.exit.borrow().clone()
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for log in &self.logs {
            let tail = log_tail(log, 10);
            if !tail.is_empty() {
                let name = log
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                out.push_str(&format!("[{name}] {tail}\n"));
            }
        }
        out
    }

    async fn pause(&self) -> Result<()> {
        qmp::execute(&self.qmp, "stop").await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        qmp::execute(&self.qmp, "cont").await.map(|_| ())
    }

    async fn stop(&self, grace: Duration) -> Result<VmExit> {
        let kill = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(kill) = kill {
            log::debug!("stopping qemu pid {} (grace {grace:?})", self.qemu_pid);
            let _ = kill.send(grace);
        }
        Ok(self.wait().await)
    }
}
