//! QEMU backend: KVM on hosts with hardware KVM, TCG otherwise.
//!
//! Per VM: one `qemu-system-x86_64` process, plus `vhost-device-vsock` (the
//! vsock device in user space, since vhost-vsock may be missing) and one
//! `virtiofsd` per shared directory. All of them are children of the caller,
//! die with it (PR_SET_PDEATHSIG), and are stopped when QEMU exits.

mod cmdline;
pub(crate) mod hotplug;
pub(crate) mod qmp;
pub(crate) mod snapshot;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::process::{Child, Command};

pub use cmdline::Machine;
use cmdline::Paths;

use crate::host::Accelerator;
use crate::process::{above_stdio, spawn, spawn_keeping, wait_for_path};
use crate::process_vm::{Control, ProcessVm};
use crate::virtiofs::HELPER_START_TIMEOUT;
use crate::{
    AgentChannel, AgentEndpoint, Capabilities, Error, HostOverhead, Hypervisor, Result,
    SnapshotInfo, Vm, VmConfig, HOST_PIDS,
};

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
    /// The accelerator (the caller resolves `auto` with [`crate::host::detect_kvm`]).
    pub accelerator: Accelerator,
}

pub struct Qemu {
    config: QemuConfig,
    accelerator: Accelerator,
}

impl Qemu {
    /// Checks that the QEMU binary exists.
    pub fn new(config: QemuConfig) -> Result<Self> {
        if !config.qemu.is_file() {
            return Err(Error::NotFound {
                what: "QEMU",
                path: config.qemu.clone(),
                hint: "install qemu-system-x86 or set qemu_path in /etc/vessel/config.toml",
            });
        }
        let accelerator = config.accelerator;
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
    fn snapshot_blocker(&self, config: &VmConfig) -> Option<&'static str> {
        snapshot::blocker(config, self.config.machine)
    }

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
            snapshot: true,
        }
    }

    fn host_overhead(&self) -> Option<HostOverhead> {
        Some(HostOverhead {
            memory_mib: match self.accelerator {
                // Measured under TCG (docs/threat-model.md, "Host limits"): the
                // sandbox's processes were charged 88-129 MiB beyond the 256 MiB of
                // guest RAM the guest dirtied, most of it QEMU's translation cache
                // (capped at cmdline::TCG_TB_SIZE_MIB).
                Accelerator::Tcg => 192,
                // No translation cache; not measured here (no hardware KVM).
                Accelerator::Kvm => 128,
            },
            pids: HOST_PIDS,
        })
    }

    async fn launch(&self, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        crate::check_vm_config(cfg)?;
        let paths = Paths::new(&cfg.run_dir);
        let ram = self.guest_ram(cfg)?;
        let mut helpers = Vec::new();
        let started = match ram {
            // The devices come with Vm::attach_deferred, their back ends then.
            Some(_) => Ok(()),
            None => self.start_helpers(cfg, &paths, &mut helpers).await,
        };
        let started = started.and_then(|()| self.start_qemu_with(cfg, &paths, ram.as_ref(), &[]));
        let child = match started {
            Ok(child) => child,
            Err(e) => {
                crate::process::terminate_all(&mut helpers).await;
                return Err(e);
            }
        };
        Ok(self.watch(cfg, &paths, child, helpers, ram))
    }

    async fn restore(&self, dir: &Path, cfg: &VmConfig) -> Result<Box<dyn Vm>> {
        let info = SnapshotInfo::load(dir)?;
        info.check_matches(self.name(), cfg)?;
        if info.accelerator != self.accelerator {
            return Err(Error::InvalidConfig(format!(
                "the snapshot was taken with QEMU/{}; this host runs QEMU/{}",
                info.accelerator, self.accelerator
            )));
        }
        crate::check_vm_config(cfg)?;
        if let Some(why) = snapshot::blocker(cfg, self.config.machine) {
            return Err(Error::Unsupported {
                backend: "qemu",
                operation: why,
            });
        }
        let stream = snapshot::open_stream(dir)?;
        let ram = self.guest_ram(cfg)?;
        if let Some(ram) = &ram {
            fill_ram(dir, ram, cfg).await?;
        }
        let paths = Paths::new(&cfg.run_dir);
        let log = cfg.run_dir.join("qemu.log");
        let mut child = self.start_qemu_with(cfg, &paths, ram.as_ref(), &["-incoming", "defer"])?;
        let loaded = async {
            wait_for_path(&paths.qmp, &mut child, "QEMU", &log, HELPER_START_TIMEOUT).await?;
            snapshot::load(&paths.qmp, &stream, &mut child, &log, ram.is_some()).await
        }
        .await;
        if let Err(e) = loaded {
            crate::process::terminate(&mut child, std::time::Duration::ZERO).await;
            return Err(e);
        }
        log::debug!("qemu: restored {} into {}", dir.display(), cfg.id);
        Ok(self.watch(cfg, &paths, child, Vec::new(), ram))
    }
}

/// Fills the memfd `ram` with the guest RAM saved in `dir` (its data extents:
/// the file is sparse). `cp` does the copy, in the sandbox's cgroup, so that
/// the clone's memory is charged to the sandbox, not to this process.
async fn fill_ram(dir: &Path, ram: &File, cfg: &VmConfig) -> Result<()> {
    let src = dir.join(snapshot::MEMORY);
    let want = u64::from(cfg.memory_mib) << 20;
    let size = std::fs::symlink_metadata(&src)
        .map_err(|source| Error::Io {
            what: format!("read snapshot memory {}", src.display()),
            source,
        })
        .and_then(|m| {
            if m.is_file() && m.len() == want {
                Ok(m.len())
            } else {
                Err(Error::InvalidConfig(format!(
                    "snapshot memory {} is not a regular file of {want} bytes",
                    src.display()
                )))
            }
        })?;
    let keep = ram
        .try_clone()
        .and_then(crate::process::above_stdio)
        .map_err(|source| Error::Io {
            what: "dup guest RAM memfd".into(),
            source,
        })?;
    let mut cmd = Command::new(CP);
    cmd.arg("--sparse=always")
        .arg("--")
        .arg(&src)
        .arg(format!("/proc/self/fd/{}", keep.as_raw_fd()));
    let log = cfg.run_dir.join("memory-copy.log");
    let mut child = crate::process::spawn_keeping("cp (guest memory)", cmd, &log, cfg, Some(keep))?;
    let status = child.wait().await.map_err(|source| Error::Io {
        what: "wait for cp (guest memory)".into(),
        source,
    })?;
    let filled = ram.metadata().map(|m| m.len()).unwrap_or(0);
    if !status.success() || filled != size {
        return Err(Error::EarlyExit {
            what: "cp (guest memory)",
            status: status.to_string(),
            detail: format!(
                "guest RAM holds {filled} of {size} bytes; {}",
                crate::process::exit_log_tail(&log, 5)
            ),
        });
    }
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// The copy program for guest memory (coreutils: `--sparse=always` seeks over
/// the holes of the source and leaves them in the memfd).
const CP: &str = "/bin/cp";

/// Starts vhost-device-vsock (the guest's vsock device in user space) on
/// `paths.vhost_vsock`, forwarding to the hybrid vsock socket `cfg.vsock_uds`.
pub(crate) async fn start_vhost_vsock(
    bin: &Path,
    cfg: &VmConfig,
    paths: &Paths,
    helpers: &mut Vec<Child>,
) -> Result<()> {
    Qemu::require(
        bin,
        "vhost-device-vsock",
        "run 'make deps' (cargo install vhost-device-vsock) or use channel = \"serial\"",
    )?;
    let log = cfg.run_dir.join("vhost-device-vsock.log");
    let mut cmd = Command::new(bin);
    cmd.arg("--guest-cid").arg("3");
    cmd.arg("--socket").arg(&paths.vhost_vsock);
    cmd.arg("--uds-path").arg(&cfg.vsock_uds);
    let mut child = spawn("vhost-device-vsock", cmd, &log, cfg)?;
    let ready = wait_for_path(
        &paths.vhost_vsock,
        &mut child,
        "vhost-device-vsock",
        &log,
        HELPER_START_TIMEOUT,
    )
    .await;
    helpers.push(child);
    ready
}

impl Qemu {
    /// The guest RAM memfd of a VM that defers its devices (`None`: QEMU
    /// allocates the RAM itself).
    fn guest_ram(&self, cfg: &VmConfig) -> Result<Option<File>> {
        if !cmdline::defers_devices(cfg, self.config.machine) {
            return Ok(None);
        }
        let io = |source| Error::Io {
            what: "create the guest RAM memfd".into(),
            source,
        };
        // SAFETY: memfd_create with a NUL-terminated name; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vessel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let file = above_stdio(unsafe { File::from_raw_fd(fd) }).map_err(io)?;
        file.set_len(u64::from(cfg.memory_mib) << 20).map_err(io)?;
        Ok(Some(file))
    }

    fn watch(
        &self,
        cfg: &VmConfig,
        paths: &Paths,
        child: Child,
        helpers: Vec<Child>,
        ram: Option<File>,
    ) -> Box<dyn Vm> {
        let deferred = ram.is_some();
        let endpoint = match (cfg.channel, deferred) {
            (AgentChannel::Vsock, false) => AgentEndpoint::HybridVsock {
                uds: cfg.vsock_uds.clone(),
            },
            _ => AgentEndpoint::Serial {
                path: paths.agent_serial.clone(),
            },
        };
        let snapshot = match snapshot::blocker(cfg, self.config.machine) {
            Some(why) => Err(why),
            None => {
                let mut info = SnapshotInfo::of(self.name(), self.accelerator, cfg);
                info.deferred_devices = deferred;
                if deferred {
                    // Plugged in after the snapshot: a clone's are its own.
                    info.nics.clear();
                }
                Ok(info)
            }
        };
        let pending = deferred.then(|| hotplug::Pending {
            cfg: cfg.clone(),
            vhost_vsock: self.config.vhost_vsock.clone(),
            virtiofsd: self.config.virtiofsd.clone(),
        });
        Box::new(
            ProcessVm::watch(
                child,
                helpers,
                self.accelerator,
                endpoint,
                Control::Qmp {
                    qmp: paths.qmp.clone(),
                    ram: ram.map(Arc::new),
                },
                snapshot,
                &cfg.run_dir,
            )
            .with_deferred(pending),
        )
    }

    async fn start_helpers(
        &self,
        cfg: &VmConfig,
        paths: &Paths,
        helpers: &mut Vec<Child>,
    ) -> Result<()> {
        if cfg.channel == AgentChannel::Vsock {
            start_vhost_vsock(&self.config.vhost_vsock, cfg, paths, helpers).await?;
        }
        crate::virtiofs::start(&self.config.virtiofsd, cfg, helpers).await?;
        Ok(())
    }

    /// Starts QEMU; `ram` (a VM that defers its devices) is inherited at its
    /// own fd number.
    fn start_qemu_with(
        &self,
        cfg: &VmConfig,
        paths: &Paths,
        ram: Option<&File>,
        extra: &[&str],
    ) -> Result<Child> {
        // QEMU cannot cap a file chardev: the console goes into a pipe that
        // QEMU inherits at its own fd number (as the tap fds are: no clash)
        // and a thread of this process writes to a bounded log.
        let console = vessel_logcap::pipe_to(&cfg.console_log, cfg.log_limits)
            .and_then(above_stdio)
            .map_err(|source| Error::Io {
                what: format!("create {}", cfg.console_log.display()),
                source,
            })?;
        let mut args = cmdline::args(
            cfg,
            self.accelerator,
            self.config.machine,
            paths,
            console.as_raw_fd(),
            crate::host::tsc_khz(),
            ram.map(|r| r.as_raw_fd()),
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        log::debug!("qemu: {} {}", self.config.qemu.display(), args.join(" "));
        let mut cmd = Command::new(&self.config.qemu);
        cmd.args(&args);
        let mut fds = crate::nic::tap_fds(&cfg.nics);
        fds.extend(ram.map(|r| r.as_raw_fd()));
        if !fds.is_empty() {
            // SAFETY: runs in the forked child before exec; inherit_fds only
            // calls fcntl(2) (async-signal-safe) on the tap and RAM fds, which the
            // caller keeps open (cfg.nics) until spawn returns.
            unsafe {
                cmd.pre_exec(move || crate::nic::inherit_fds(&fds));
            }
        }
        if let Some(ns) = &cfg.netns {
            let ns = ns.as_raw_fd();
            // SAFETY: runs in the forked child before exec; enter_netns only
            // calls setns(2) (async-signal-safe) on the namespace fd, which
            // the caller keeps open (cfg.netns) until spawn returns.
            unsafe {
                cmd.pre_exec(move || crate::process::enter_netns(ns));
            }
        }
        spawn_keeping(
            "QEMU",
            cmd,
            &cfg.run_dir.join("qemu.log"),
            cfg,
            Some(console),
        )
    }
}
