//! A VM that is a host process (the hypervisor) plus helper processes.
//!
//! A background task owns the processes: it waits for the hypervisor (or for a helper
//! to die, which ends the VM: it cannot work without its back ends), then stops the
//! helpers and publishes the exit status. Backends differ only in how
//! they pause and resume ([`Control`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};

use crate::process::{log_tail, terminate};
use crate::snapshot::{self, SnapshotInfo};
use crate::{Accelerator, AgentEndpoint, Error, Result, Vm, VmExit};

/// How to pause and resume the VM.
#[derive(Debug, Clone)]
pub enum Control {
    /// QEMU's QMP socket, and the guest RAM memfd of a VM that keeps its RAM
    /// out of the migration stream (see `crate::qemu::snapshot`).
    Qmp {
        qmp: PathBuf,
        ram: Option<Arc<File>>,
    },
    /// vessel-vmm's control API socket.
    VmmApi(PathBuf),
    /// A jailed vessel-vmm: it can write only in its run directory.
    JailedVmmApi { api: PathBuf, run_dir: PathBuf },
}

/// Whether a VM can be snapshotted: its description, or why not.
pub type Snapshottable = std::result::Result<SnapshotInfo, &'static str>;

pub struct ProcessVm {
    accelerator: Accelerator,
    snapshot: Mutex<Snapshottable>,
    endpoint: Mutex<AgentEndpoint>,
    control: Control,
    pid: u32,
    pids: Mutex<Vec<u32>>,
    run_dir: PathBuf,
    /// Logs of the hypervisor and its helpers (`*.log` in the run directory but the console).
    logs: Mutex<Vec<PathBuf>>,
    exit: watch::Receiver<Option<VmExit>>,
    kill: Mutex<Option<oneshot::Sender<Duration>>>,
    /// Helpers started after the VM (deferred devices) for the watching task.
    add_helper: mpsc::UnboundedSender<Child>,
    /// The devices held back at start (QEMU's deferred vhost-user devices).
    deferred: tokio::sync::Mutex<Option<crate::qemu::hotplug::Pending>>,
}

/// What the watching task was woken by.
enum Event {
    Ended(std::io::Result<std::process::ExitStatus>, bool),
    Added(Child),
}

/// `*.log` files in `run_dir` but the console's.
fn logs_in(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|x| x == "log")
                        && p.file_name() != Some("console.log".as_ref())
                })
                .collect()
        })
        .unwrap_or_default()
}

impl ProcessVm {
    /// Takes ownership of the running `hypervisor` and `helpers`.
    pub fn watch(
        mut hypervisor: Child,
        mut helpers: Vec<Child>,
        accelerator: Accelerator,
        endpoint: AgentEndpoint,
        control: Control,
        snapshot: Snapshottable,
        run_dir: &Path,
    ) -> Self {
        let pid = hypervisor.id().unwrap_or(0);
        let mut pids = vec![pid];
        pids.extend(helpers.iter().filter_map(|h| h.id()));
        let (tx, rx) = watch::channel(None);
        let (kill_tx, mut kill_rx) = oneshot::channel::<Duration>();
        let (add_tx, mut add_rx) = mpsc::unbounded_channel::<Child>();
        tokio::spawn(async move {
            // `stopped`: a stop was asked for, and the helpers get a grace to exit; when
            // the VM died (or a helper did), the others serve nobody and are killed at
            // once, so that the exit is published (and the containers reported exited)
            // without waiting for them.
            let (status, stopped) = loop {
                let event = {
                    let helper_exit = crate::process::first_exit(&mut helpers);
                    tokio::select! {
                        s = hypervisor.wait() => Event::Ended(s, false),
                        // Err: the ProcessVm was dropped without stop(): kill at once.
                        grace = &mut kill_rx => Event::Ended(Ok(terminate(&mut hypervisor, grace.unwrap_or(Duration::ZERO)).await), true),
                        // A VM without its virtio-fs or vsock back end hangs on its next request
                        // to it (a container's file access, the agent channel): end it now, so
                        // that its callers are told and its containers exit.
                        (helper, how) = helper_exit => {
                            let how = how.map_or_else(|e| e.to_string(), |s| s.to_string());
                            log::warn!(
                                "helper pid {helper} of hypervisor pid {pid} exited ({how}); \
                                 the VM cannot go on without it: stopping the VM"
                            );
                            Event::Ended(Ok(terminate(&mut hypervisor, Duration::ZERO).await), false)
                        }
                        Some(child) = add_rx.recv() => Event::Added(child),
                    }
                };
                match event {
                    Event::Ended(status, stopped) => break (status, stopped),
                    Event::Added(child) => helpers.push(child),
                }
            };
            // Helpers handed over while the VM ended.
            add_rx.close();
            while let Ok(child) = add_rx.try_recv() {
                helpers.push(child);
            }
            if stopped {
                crate::process::terminate_all(&mut helpers).await;
            } else {
                crate::process::kill_all(&mut helpers).await;
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
            log::debug!("hypervisor pid {pid} ended with {exit}");
            let _ = tx.send(Some(exit));
        });
        ProcessVm {
            accelerator,
            snapshot: Mutex::new(snapshot),
            endpoint: Mutex::new(endpoint),
            control,
            pid,
            pids: Mutex::new(pids),
            run_dir: run_dir.to_path_buf(),
            logs: Mutex::new(logs_in(run_dir)),
            exit: rx,
            kill: Mutex::new(Some(kill_tx)),
            add_helper: add_tx,
            deferred: tokio::sync::Mutex::new(None),
        }
    }

    /// Devices to add on [`Vm::attach_deferred`].
    pub fn with_deferred(mut self, pending: Option<crate::qemu::hotplug::Pending>) -> Self {
        self.deferred = tokio::sync::Mutex::new(pending);
        self
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Vm for ProcessVm {
    fn agent_endpoint(&self) -> AgentEndpoint {
        lock(&self.endpoint).clone()
    }

    fn accelerator(&self) -> Accelerator {
        self.accelerator
    }

    fn pids(&self) -> Vec<u32> {
        lock(&self.pids).clone()
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
        for log in lock(&self.logs).iter() {
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
        match &self.control {
            Control::Qmp { qmp, .. } => crate::qemu::qmp::execute(qmp, "stop").await.map(|_| ()),
            Control::VmmApi(sock) | Control::JailedVmmApi { api: sock, .. } => {
                crate::builtin::api::request(sock, vessel_vmm_api::Request::Pause {}).await
            }
        }
    }

    async fn resume(&self) -> Result<()> {
        match &self.control {
            Control::Qmp { qmp, .. } => crate::qemu::qmp::execute(qmp, "cont").await.map(|_| ()),
            Control::VmmApi(sock) | Control::JailedVmmApi { api: sock, .. } => {
                crate::builtin::api::request(sock, vessel_vmm_api::Request::Resume {}).await
            }
        }
    }

    async fn attach_deferred(&self) -> Result<()> {
        let mut deferred = self.deferred.lock().await;
        let Some(pending) = deferred.take() else {
            return Ok(());
        };
        *lock(&self.snapshot) = Err(
            "snapshot of a VM whose vhost-user devices were plugged in (QEMU cannot migrate them)",
        );
        let attached = crate::qemu::hotplug::attach(&pending).await?;
        for child in attached.helpers {
            if let Some(pid) = child.id() {
                lock(&self.pids).push(pid);
            }
            if let Err(mpsc::error::SendError(mut child)) = self.add_helper.send(child) {
                // The VM has ended: its watcher is gone.
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(Error::EarlyExit {
                    what: "hypervisor (while its devices were plugged in)",
                    status: self
                        .try_exit()
                        .map_or_else(|| "unknown status".into(), |e| e.to_string()),
                    detail: self.diagnostics(),
                });
            }
        }
        *lock(&self.logs) = logs_in(&self.run_dir);
        if let Some(endpoint) = attached.endpoint {
            *lock(&self.endpoint) = endpoint;
        }
        Ok(())
    }

    async fn snapshot(&self, dir: &Path) -> Result<()> {
        let snapshottable = lock(&self.snapshot).clone();
        let (info, backend) = match (&snapshottable, &self.control) {
            (Err(why), Control::Qmp { .. }) => return Err(unsupported("qemu", why)),
            (Err(why), _) => return Err(unsupported("builtin", why)),
            (Ok(info), _) => (info, info.backend.clone()),
        };
        snapshot::create_dir(dir)?;
        let res = async {
            self.pause().await?;
            match &self.control {
                Control::Qmp { qmp, ram } => {
                    crate::qemu::snapshot::save(qmp, dir, ram.as_deref()).await?
                }
                Control::VmmApi(sock) => crate::builtin::api::snapshot(sock, dir).await?,
                Control::JailedVmmApi { api, run_dir } => {
                    use crate::builtin::jail;
                    let staging =
                        std::path::Path::new(jail::RUN_DIR_IN_JAIL).join(jail::SNAPSHOT_STAGING);
                    let saved = crate::builtin::api::snapshot(api, &staging).await;
                    let collected = saved.and_then(|()| jail::collect_snapshot(run_dir, dir));
                    if collected.is_err() {
                        let _ = std::fs::remove_dir_all(run_dir.join(jail::SNAPSHOT_STAGING));
                    }
                    collected?
                }
            }
            info.store(dir)
        }
        .await;
        match &res {
            Ok(()) => log::info!(
                "{backend} VM pid {}: snapshot written to {}",
                self.pid,
                dir.display()
            ),
            Err(_) => snapshot::discard(dir),
        }
        res
    }

    async fn stop(&self, grace: Duration) -> Result<VmExit> {
        let kill = self.kill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(kill) = kill {
            log::debug!("stopping hypervisor pid {} (grace {grace:?})", self.pid);
            let _ = kill.send(grace);
        }
        Ok(self.wait().await)
    }
}

fn unsupported(backend: &'static str, why: &'static str) -> Error {
    Error::Unsupported {
        backend,
        operation: why,
    }
}
