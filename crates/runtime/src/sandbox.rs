//! A sandbox: one VM and the agent inside it.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vessel_hypervisor::{
    log_tail, AgentChannel, AgentEndpoint, Hypervisor, Nic, SharedDir, SnapshotInfo, Vm, VmConfig,
    VmExit,
};
use vessel_protocol::health::VersionResponse;

use crate::agent::{AgentClient, ReadyListener};
use crate::limits;
use crate::{Config, Error, Result};

/// What a sandbox needs besides the runtime configuration.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub shared_dirs: Vec<SharedDir>,
    /// Network devices (see [`crate::network`]); empty: loopback only.
    pub nics: Vec<Nic>,
    /// The network namespace the VMM runs in (`None`: the caller's).
    pub netns: Option<Arc<OwnedFd>>,
    /// Boot without the devices the backend cannot snapshot
    /// ([`VmConfig::deferred_devices`]), for a sandbox that may become a
    /// template; [`Sandbox::attach_deferred`] adds them.
    pub deferred_devices: bool,
}

impl SandboxSpec {
    /// A sandbox sized by the configuration defaults.
    pub fn new(id: &str, config: &Config) -> Self {
        SandboxSpec {
            id: id.to_string(),
            vcpus: config.default_vcpus,
            memory_mib: config.default_memory_mib,
            shared_dirs: Vec::new(),
            nics: Vec::new(),
            netns: None,
            deferred_devices: false,
        }
    }
}

/// Host end of the guest's hybrid vsock, in the run directory.
const VSOCK_SOCKET: &str = "vsock.sock";

/// The agent's socket (host end of the hybrid vsock) of the sandbox whose
/// run directory is `run_dir`.
pub fn agent_socket(run_dir: &Path) -> PathBuf {
    run_dir.join(VSOCK_SOCKET)
}
/// Guest serial console, in the run directory.
const CONSOLE_LOG: &str = "console.log";
/// Interval between attempts to reach the agent of a restored VM.
const RECONNECT_POLL: Duration = Duration::from_millis(10);

/// A running sandbox VM with a connected agent.
pub struct Sandbox {
    id: String,
    run_dir: PathBuf,
    vm: Box<dyn Vm>,
    agent: AgentClient,
    version: VersionResponse,
    stop_grace: Duration,
    /// Restored from a snapshot: the MACs its NICs have (the snapshot VM's).
    device_macs: Option<Vec<[u8; 6]>>,
    /// The host cgroup of its processes ([`crate::limits`]), removed on drop.
    cgroup: Option<Arc<vessel_cgroup::Cgroup>>,
    timing: BootTiming,
}

/// How long a sandbox took to come up (reported by [`crate::metrics`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BootTiming {
    /// From the VMM's launch (or restore) until the agent answered.
    pub boot: Duration,
    /// Restored from a template: how long the hypervisor took to restore the VM.
    pub restore: Option<Duration>,
}

/// Checks a sandbox id against the one id rule ([`vessel_protocol::id`]).
pub fn validate_id(id: &str) -> Result<()> {
    vessel_protocol::id::check_id(id).map_err(Error::InvalidId)
}

pub use crate::backend::hypervisor;

/// Creates `dir` (mode 0700), with the state root (0711) above it.
fn create_run_dir(root: &Path, id: &str) -> Result<PathBuf> {
    let err = |path: &Path, source| Error::StateDir {
        path: path.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .map_err(|e| err(root, e))?;
    let dir = root.join(id);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::Exists(id.to_string()))
        }
        Err(e) => Err(err(&dir, e)),
    }
}

impl Sandbox {
    /// Boots a sandbox VM and waits until its agent answers `Health.Check` and
    /// `Version`. On any error everything created so far is removed.
    pub async fn boot(config: &Config, hv: &dyn Hypervisor, spec: SandboxSpec) -> Result<Sandbox> {
        validate_id(&spec.id)?;
        let channel = config.channel;
        let run_dir = create_run_dir(&config.state_root, &spec.id)?;
        let limits = limits::limits_for(&config.limits, hv, spec.vcpus, spec.memory_mib);
        let cgroup = limits::cgroup_name(&run_dir);
        let res = match limits.map(|l| limits::create(&cgroup, l)).transpose() {
            Ok(cgroup) => Self::boot_in(config, hv, spec, channel, &run_dir, cgroup).await,
            Err(e) => Err(e),
        };
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        res
    }

    async fn boot_in(
        config: &Config,
        hv: &dyn Hypervisor,
        spec: SandboxSpec,
        channel: AgentChannel,
        run_dir: &Path,
        cgroup: Option<Arc<vessel_cgroup::Cgroup>>,
    ) -> Result<Sandbox> {
        let deferred_devices = spec.deferred_devices;
        let vm_config = VmConfig {
            id: spec.id.clone(),
            run_dir: run_dir.to_path_buf(),
            kernel: config.guest_kernel.clone(),
            initramfs: config.guest_initramfs.clone(),
            kernel_args: config.kernel_args.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            channel,
            vsock_uds: agent_socket(run_dir),
            console_log: run_dir.join(CONSOLE_LOG),
            log_limits: config.log_limits(),
            shared_dirs: spec.shared_dirs,
            nics: spec.nics,
            netns: spec.netns,
            cgroup,
            deferred_devices,
        };
        // Bind before launch: the agent connects as soon as it is up.
        let mut ready = match channel {
            AgentChannel::Vsock => Some(ReadyListener::bind(&vm_config.vsock_uds)?),
            AgentChannel::Serial => None,
        };
        let start = Instant::now();
        let vm = match hv.launch(&vm_config).await {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(cg) = &vm_config.cgroup {
                    limits::remove(cg, &vm_config.id);
                }
                return Err(e.into());
            }
        };
        let endpoint = vm.agent_endpoint();
        if !matches!(endpoint, AgentEndpoint::HybridVsock { .. }) {
            // Deferred devices: the agent is on virtio-serial until
            // attach_deferred plugs the vsock device in (which binds its own).
            ready = None;
        }
        let accelerator = vm.accelerator();
        let timeout = config.boot_timeout(accelerator);
        let connect = async {
            if let Some(ready) = &ready {
                let v = ready.wait().await?;
                log::debug!(
                    "sandbox {}: agent {v} ready after {:?}",
                    spec.id,
                    start.elapsed()
                );
            }
            let agent = AgentClient::connect(&endpoint, timeout)
                .await?
                .for_accelerator(accelerator);
            agent.check(timeout).await?;
            let version = agent.version().await?;
            Ok::<_, Error>((agent, version))
        };
        let mut sb = Self::attach(config, vm, &vm_config, connect).await?;
        sb.timing.boot = start.elapsed();
        log::info!(
            "sandbox {}: agent {} ready on {} ({}) after {:?}",
            sb.id,
            sb.version.agent_version,
            channel,
            sb.vm.accelerator(),
            start.elapsed()
        );
        Ok(sb)
    }

    /// Waits for `connect` (the agent's connection and version) while watching
    /// the VM and the boot timeout. On error the VM is stopped.
    async fn attach(
        config: &Config,
        vm: Box<dyn Vm>,
        vm_config: &VmConfig,
        connect: impl std::future::Future<Output = Result<(AgentClient, VersionResponse)>>,
    ) -> Result<Sandbox> {
        let timeout = config.boot_timeout(vm.accelerator());
        let console = || log_tail(&vm_config.console_log, 30);
        let outcome = tokio::select! {
            r = connect => r,
            exit = vm.wait() => Err(Error::VmDiedEarly { exit: exit.to_string(), hypervisor: vm.diagnostics(), console: console() }),
            _ = tokio::time::sleep(timeout) => Err(Error::BootTimeout { secs: timeout.as_secs(), console: console() }),
        };
        match outcome {
            Ok((agent, version)) => Ok(Sandbox {
                id: vm_config.id.clone(),
                run_dir: vm_config.run_dir.clone(),
                vm,
                agent,
                version,
                stop_grace: Duration::from_secs(config.stop_grace_secs),
                device_macs: None,
                cgroup: vm_config.cgroup.clone(),
                timing: BootTiming::default(),
            }),
            Err(e) => {
                let _ = vm.stop(Duration::ZERO).await;
                if let Some(cg) = &vm_config.cgroup {
                    limits::remove(cg, &vm_config.id);
                }
                Err(e)
            }
        }
    }

    /// Writes a snapshot of this sandbox's VM (memory, vCPUs, devices) into
    /// `dir`, then lets the VM run on. No agent call may be in flight: a clone
    /// restored from the snapshot would see half a request.
    pub async fn snapshot(&self, dir: &Path) -> Result<()> {
        let start = Instant::now();
        let saved = self.vm.snapshot(dir).await;
        // The VM is paused whether or not the snapshot was written.
        let resumed = self.vm.resume().await;
        saved?;
        resumed?;
        log::info!(
            "sandbox {}: snapshot written to {} in {:?}",
            self.id,
            dir.display(),
            start.elapsed()
        );
        Ok(())
    }

    /// Starts sandbox `id` from the snapshot in `snapshot` (see
    /// [`Sandbox::snapshot`]), reconnects to its agent, sets the guest clock to
    /// the host's and reseeds the guest RNG with fresh host entropy, so clones
    /// of one snapshot never share RNG state. On any error everything created
    /// so far is removed.
    pub async fn restore(
        config: &Config,
        hv: &dyn Hypervisor,
        id: &str,
        snapshot: &Path,
    ) -> Result<Sandbox> {
        Self::restore_with(config, hv, SandboxSpec::new(id, config), snapshot).await
    }

    /// [`Sandbox::restore`] with `spec`'s id, shares, network devices and
    /// namespace (its vCPUs and memory are the snapshot's). The shares must be
    /// the snapshot VM's (same tags, in order), each served by this sandbox's own
    /// virtiofsd.
    pub async fn restore_with(
        config: &Config,
        hv: &dyn Hypervisor,
        spec: SandboxSpec,
        snapshot: &Path,
    ) -> Result<Sandbox> {
        let id = spec.id.as_str();
        validate_id(id)?;
        let info = SnapshotInfo::load(snapshot)?;
        let channel = info.channel;
        let run_dir = create_run_dir(&config.state_root, id)?;
        let limits = limits::limits_for(&config.limits, hv, info.vcpus, info.memory_mib);
        let name = limits::cgroup_name(&run_dir);
        let cgroup = match limits.map(|l| limits::create(&name, l)).transpose() {
            Ok(cg) => cg,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(e);
            }
        };
        let vm_config = VmConfig {
            id: id.to_string(),
            run_dir: run_dir.clone(),
            kernel: info.kernel.clone(),
            initramfs: info.initramfs.clone(),
            kernel_args: info.kernel_args.clone(),
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            channel,
            vsock_uds: agent_socket(&run_dir),
            console_log: run_dir.join(CONSOLE_LOG),
            log_limits: config.log_limits(),
            shared_dirs: spec.shared_dirs,
            nics: spec.nics,
            netns: spec.netns,
            cgroup,
            deferred_devices: info.deferred_devices,
        };
        let res = match Self::restore_in(config, hv, snapshot, &vm_config).await {
            Ok(mut sb) => {
                // A deferred VM's network devices are plugged in with their own MACs.
                sb.device_macs = (!info.deferred_devices).then(|| info.nics.clone());
                sb.attach_deferred(config).await.map(|()| sb)
            }
            Err(e) => Err(e),
        };
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
        res
    }

    async fn restore_in(
        config: &Config,
        hv: &dyn Hypervisor,
        snapshot: &Path,
        vm_config: &VmConfig,
    ) -> Result<Sandbox> {
        let start = Instant::now();
        let vm = match hv.restore(snapshot, vm_config).await {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(cg) = &vm_config.cgroup {
                    limits::remove(cg, &vm_config.id);
                }
                return Err(e.into());
            }
        };
        let restored_after = start.elapsed();
        let endpoint = vm.agent_endpoint();
        let accelerator = vm.accelerator();
        let timeout = config.boot_timeout(accelerator);
        let connect = async {
            // The restored guest's agent is already listening, but the old
            // connection is being torn down (vsock transport reset, serial
            // port closed): retry until a fresh one answers.
            let deadline = Instant::now() + timeout;
            let agent = loop {
                let attempt = async {
                    let agent = AgentClient::connect(&endpoint, timeout)
                        .await?
                        .for_accelerator(accelerator);
                    agent.check(Duration::from_secs(2)).await?;
                    Ok::<_, Error>(agent)
                };
                match attempt.await {
                    Ok(agent) => break agent,
                    Err(e) if Instant::now() < deadline => {
                        log::debug!(
                            "sandbox {}: agent not back yet: {}",
                            vm_config.id,
                            crate::chain(&e)
                        );
                        tokio::time::sleep(RECONNECT_POLL).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let version = agent.version().await?;
            agent.sync_clock().await?;
            agent.reseed_random().await?;
            Ok::<_, Error>((agent, version))
        };
        let mut sb = Self::attach(config, vm, vm_config, connect).await?;
        sb.timing = BootTiming {
            boot: start.elapsed(),
            restore: Some(restored_after),
        };
        log::info!(
            "sandbox {}: restored from {} ({}); VM running after {restored_after:?}, agent resynced after {:?}",
            sb.id,
            snapshot.display(),
            sb.vm.accelerator(),
            start.elapsed()
        );
        Ok(sb)
    }

    /// Plugs in the devices the VM was started without
    /// ([`SandboxSpec::deferred_devices`]; a no-op if there are none): the
    /// shares, and the vsock device, after which the agent is reached on vsock
    /// (it announces itself there, as after a cold boot). On error the
    /// sandbox is stopped and removed.
    pub async fn attach_deferred(&mut self, config: &Config) -> Result<()> {
        let before = self.vm.agent_endpoint();
        let started = Instant::now();
        let res = async {
            let ready = match &before {
                AgentEndpoint::Serial { .. } => {
                    Some(ReadyListener::bind(&agent_socket(&self.run_dir))?)
                }
                AgentEndpoint::HybridVsock { .. } => None,
            };
            self.vm.attach_deferred().await?;
            let after = self.vm.agent_endpoint();
            if after == before {
                return Ok(None);
            }
            let timeout = config.boot_timeout(self.vm.accelerator());
            let connect = async {
                if let Some(ready) = &ready {
                    ready.wait().await?;
                }
                let agent = AgentClient::connect(&after, timeout)
                    .await?
                    .for_accelerator(self.vm.accelerator());
                agent.check(timeout).await?;
                Ok::<_, Error>(agent)
            };
            let console = || log_tail(&self.console_log(), 30);
            tokio::select! {
                r = connect => r.map(Some),
                exit = self.vm.wait() => Err(Error::VmDiedEarly { exit: exit.to_string(), hypervisor: self.vm.diagnostics(), console: console() }),
                _ = tokio::time::sleep(timeout) => Err(Error::BootTimeout { secs: timeout.as_secs(), console: console() }),
            }
        }
        .await;
        match res {
            Ok(Some(agent)) => {
                self.agent = agent;
                log::info!(
                    "sandbox {}: devices plugged in, agent on vsock after {:?}",
                    self.id,
                    started.elapsed()
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                let _ = self.vm.stop(Duration::ZERO).await;
                let _ = std::fs::remove_dir_all(&self.run_dir);
                Err(e)
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn vm(&self) -> &dyn Vm {
        self.vm.as_ref()
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// For a sandbox restored from a snapshot, the MACs its NICs have (the
    /// snapshot VM's, in NIC order); `None` for a cold boot.
    pub fn device_macs(&self) -> Option<&[[u8; 6]]> {
        self.device_macs.as_deref()
    }

    /// The agent's `Version` reply from boot.
    pub fn version(&self) -> &VersionResponse {
        &self.version
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The guest console log (bounded; written by the VM, so never trusted).
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join(CONSOLE_LOG)
    }

    pub fn timing(&self) -> BootTiming {
        self.timing
    }

    /// The host processes of the sandbox: its host cgroup's members (the VMM, its
    /// helpers, the supervisor or shim that entered it), else the VM's processes.
    pub fn host_pids(&self) -> Vec<u32> {
        match &self.cgroup {
            Some(cg) => cg.procs().into_iter().map(|p| p as u32).collect(),
            None => self.vm.pids(),
        }
    }

    /// Moves the calling process into the sandbox's host cgroup, for a process that
    /// exists for this sandbox alone (the CLI's supervisor, the shim of a pod). It
    /// moves back when the sandbox is stopped.
    pub fn enter_host_cgroup(&self) -> Result<()> {
        match &self.cgroup {
            Some(cg) => cg.enter_self().map_err(|source| Error::Cgroup {
                name: limits::cgroup_name(&self.run_dir),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Stops the VM (grace period from the configuration) and removes the
    /// sandbox's run directory, then (on drop) its host cgroup.
    pub async fn stop(self) -> Result<VmExit> {
        let exit = self.vm.stop(self.stop_grace).await?;
        std::fs::remove_dir_all(&self.run_dir).map_err(|source| Error::StateDir {
            path: self.run_dir.display().to_string(),
            source,
        })?;
        Ok(exit)
    }
}

impl Drop for Sandbox {
    /// Removes the host cgroup: after [`Sandbox::stop`] it is empty; otherwise
    /// what is left in it is killed.
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            limits::remove(&cg, &self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_one_rule() {
        for (id, ok) in vessel_protocol::id::test_cases() {
            assert_eq!(validate_id(&id).is_ok(), ok, "{id:?}");
        }
    }

    #[test]
    fn run_dir_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        create_run_dir(&root, "a").unwrap();
        assert!(matches!(create_run_dir(&root, "a"), Err(Error::Exists(_))));
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(matches!(
            create_run_dir(&file, "a"),
            Err(Error::StateDir { .. })
        ));
    }
}
