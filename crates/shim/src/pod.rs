//! A pod: one sandbox VM, its agent connection and its staging share.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use containerd_shim::protos::api::Mount as TaskMount;
use nix::mount::{umount2, MntFlags};
use vessel_hypervisor::{AgentEndpoint, VmExit};
use vessel_runtime::agent::AgentClient;
use vessel_runtime::container::bundle::VmSize;
use vessel_runtime::container::share::{self, PodShare};
use vessel_runtime::sandbox::{self, SandboxSpec};
use vessel_runtime::{Config, Sandbox};

pub struct Pod {
    pub id: String,
    sandbox: Arc<Sandbox>,
    pub agent: AgentClient,
    /// Host directory shared with the guest, one subdirectory per container.
    pub share: PodShare,
    pids_file: PathBuf,
}

/// Where a pod's staging directory lives.
fn staging_dir(config: &Config, pod_id: &str) -> PathBuf {
    config.state_root.join("shared").join(pod_id)
}

fn pids_file(config: &Config, pod_id: &str) -> PathBuf {
    config
        .state_root
        .join("shared")
        .join(format!("{pod_id}.pids"))
}

impl Pod {
    /// Boots the pod's VM with its staging directory shared.
    pub async fn boot(config: &Config, id: &str, size: VmSize) -> Result<Pod> {
        sandbox::validate_id(id)?;
        let share = PodShare::create(&staging_dir(config, id))?;
        match Self::boot_in(config, id, size, &share).await {
            Ok(sandbox_and_agent) => {
                let (sandbox, agent) = sandbox_and_agent;
                Ok(Pod {
                    id: id.to_string(),
                    sandbox: Arc::new(sandbox),
                    agent,
                    share,
                    pids_file: pids_file(config, id),
                })
            }
            Err(e) => {
                if let Err(c) = share.remove() {
                    log::error!("pod {id}: {c}");
                }
                let _ = std::fs::remove_file(pids_file(config, id));
                Err(e)
            }
        }
    }

    async fn boot_in(
        config: &Config,
        id: &str,
        size: VmSize,
        share: &PodShare,
    ) -> Result<(Sandbox, AgentClient)> {
        let hv = sandbox::hypervisor(config)?;
        let spec = SandboxSpec {
            id: id.to_string(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            shared_dirs: vec![share.shared_dir()],
        };
        let sandbox = Sandbox::boot(config, hv.as_ref(), spec).await?;
        let pids_file = pids_file(config, id);
        let pids: Vec<String> = sandbox.vm().pids().iter().map(u32::to_string).collect();
        let _ = std::fs::write(&pids_file, pids.join("\n"));
        let AgentEndpoint::HybridVsock { .. } = sandbox.vm().agent_endpoint() else {
            let _ = sandbox.stop().await;
            bail!("the shim needs channel = \"vsock\" (process stdio travels over vsock)");
        };
        let agent = sandbox.agent().clone();
        log::info!(
            "pod {id}: VM up ({} vCPU, {} MiB, pids {:?})",
            size.vcpus,
            size.memory_mib,
            sandbox.vm().pids()
        );
        Ok((sandbox, agent))
    }

    /// Resolves when the hypervisor process has exited.
    pub fn watch_exit(&self) -> impl std::future::Future<Output = VmExit> + Send + 'static {
        let sandbox = self.sandbox.clone();
        async move { sandbox.vm().wait().await }
    }

    /// How the hypervisor process ended, if it has.
    pub fn vm_exit(&self) -> Option<VmExit> {
        self.sandbox.vm().try_exit()
    }

    /// Stops the VM and removes the staging tree. `watchers` must have been
    /// aborted (they hold the sandbox).
    pub async fn stop(self) {
        let mut sandbox = self.sandbox;
        // Aborted watcher tasks drop their reference shortly after abort().
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let sandbox = loop {
            match Arc::try_unwrap(sandbox) {
                Ok(s) => break Some(s),
                Err(s) if tokio::time::Instant::now() < deadline => {
                    sandbox = s;
                    tokio::task::yield_now().await;
                }
                Err(s) => {
                    log::warn!("pod {}: VM still referenced; stopping it in place", self.id);
                    let _ = s.vm().stop(Duration::from_secs(1)).await;
                    break None;
                }
            }
        };
        if let Some(s) = sandbox {
            match s.stop().await {
                Ok(exit) => log::info!("pod {}: VM stopped ({exit})", self.id),
                Err(e) => log::warn!("pod {}: stopping the VM: {e}", self.id),
            }
        }
        if let Err(e) = self.share.remove() {
            log::error!("pod {}: {e}; left in place", self.id);
        }
        let _ = std::fs::remove_file(&self.pids_file);
    }
}

/// The sandbox container whose ipc, uts and pid namespaces a container joins:
/// for a CRI `container` (not the `sandbox` itself), its pod's sandbox id.
pub fn namespace_owner(spec: &oci_spec::runtime::Spec) -> Option<&str> {
    let ann = spec.annotations().as_ref()?;
    match ann
        .get(crate::CONTAINER_TYPE_ANNOTATION)
        .map(String::as_str)
    {
        Some("container") => ann.get(crate::SANDBOX_ID_ANNOTATION).map(String::as_str),
        _ => None,
    }
}

/// `delete` after the shim server died: kill the VM processes it recorded and
/// remove the pod's mounts and state. Best effort, never fails.
pub fn cleanup_after_crash(id: &str, bundle: &Path) {
    let Ok((config, _)) = Config::load(None) else {
        return;
    };
    if sandbox::validate_id(id).is_err() {
        return;
    }
    if let Ok(text) = std::fs::read_to_string(pids_file(&config, id)) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if pid > 1 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_file(pids_file(&config, id));
    }
    if let Err(e) = share::cleanup_tree(&staging_dir(&config, id)) {
        log::error!("pod {id}: {e}; left in place");
    }
    let run_dir = config.state_root.join(id);
    if run_dir.join("console.log").exists() {
        let _ = std::fs::remove_dir_all(run_dir);
    }
    let _ = bundle;
}

/// Where a container's root file system is mounted: `<bundle>/rootfs`, as
/// runc's shim does (containerd removes the bundle after `delete`).
pub fn rootfs_dir(bundle: &Path) -> PathBuf {
    bundle.join("rootfs")
}

/// Mounts containerd's rootfs mounts (an overlay of the snapshot) at
/// [`rootfs_dir`].
pub fn mount_rootfs(bundle: &Path, mounts: &[TaskMount]) -> Result<()> {
    let target = rootfs_dir(bundle);
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            &target,
        )
        .with_context(|| format!("mount {} rootfs at {}", m.type_, target.display()))?;
    }
    Ok(())
}

/// Undoes [`mount_rootfs`]; removes nothing.
pub fn unmount_rootfs(bundle: &Path) {
    let target = rootfs_dir(bundle);
    if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
        if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
            log::error!("unmount {}: {e}", target.display());
        }
    }
}
