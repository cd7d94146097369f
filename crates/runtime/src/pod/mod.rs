//! The pod/sandbox model: one VM with its agent, its staging share, its
//! network and the containers and processes in it, with their status guards,
//! stdio relays and exits. It knows nothing of containerd or the CLI: the
//! containerd shim maps its task API onto it.
//!
//! Exits and OOM kills are reported once each, as [`PodEvent`]s on the
//! channel given to [`Pod::boot`], and so are the guest's log lines and
//! security events (checked, capped and rate-limited, see
//! [`crate::guest_events`]). When the VM dies, every live process is
//! reported exited with [`LOST_EXIT_STATUS`] at once.

mod background;
mod slot;
mod staging;
pub mod stdio;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vessel_hypervisor::{AgentEndpoint, Hypervisor, VmExit};
use vessel_protocol::agent::StatsContainerResponse;

use crate::agent::{AgentClient, AgentError, NewContainer};
use crate::container::bundle::vm_size;
use crate::container::share::{self, Staging};
use crate::container::{ContainerError, Status};
use crate::metrics::{self, MetricsServer};
use crate::sandbox::{self, SandboxSpec};
use crate::{Config, Sandbox};
use background::record_exit;
pub use slot::{MakeNetwork, PodSlot};
pub use staging::{state_root_staging, MakeStaging, PodStaging, StagingFn};
pub use stdio::{Relays, Stdio, StdioPaths};

/// Exit status reported when a process's fate is unknown (VM died, agent gone).
pub const LOST_EXIT_STATUS: u32 = 255;
/// Longest time output relays get to flush after a process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Pod::stop`] waits for its own tasks to drop the sandbox.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Annotation that groups the containers of one CRI pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// `sandbox` for the pause container, `container` for the others.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// Pod errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PodError {
    /// container {0} not found
    NotFound(String),
    /// exec {exec_id} of container {id} not found
    ExecNotFound { id: String, exec_id: String },
    /// {0} already exists
    Exists(String),
    /// invalid request: {0}
    Invalid(String),
    /// {what} is {status}: cannot {op}
    WrongState {
        what: String,
        status: Status,
        op: &'static str,
    },
    /// the pod's VM has exited ({0}); remove the pod and create it again
    VmExited(String),
    /// a pod needs channel = "vsock" (process stdio travels over vsock)
    NeedsVsock,
    /// {path}
    Io {
        path: String,
        source: std::io::Error,
    },
    /// the agent failed
    Agent(#[from] AgentError),
    /// staging failed
    Staging(#[from] ContainerError),
    /// the sandbox failed
    Sandbox(#[from] crate::Error),
    /// the pod network failed
    Network(#[from] crate::network::NetError),
}

pub type Result<T> = std::result::Result<T, PodError>;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Shell convention: code, or 128 + signal; [`LOST_EXIT_STATUS`] if unknown.
    pub status: u32,
    pub at: SystemTime,
}

/// What the pod reports to its front-end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodEvent {
    /// A started process exited (once per process).
    Exit {
        container_id: String,
        exec_id: Option<String>,
        pid: u32,
        exit: Exit,
    },
    /// The OOM killer ran in a container.
    Oom { container_id: String },
    /// A line of the agent's or the guest kernel's log of pod `sandbox`.
    GuestLog {
        sandbox: String,
        line: crate::guest_events::GuestLog,
    },
    /// A security event (escape monitoring) of pod `sandbox`.
    Security {
        sandbox: String,
        event: crate::guest_events::SecurityEvent,
    },
    /// The VM ended on its own: sent last, after the crash report its console gave
    /// (a [`PodEvent::Security`]) and every process's exit.
    VmExited,
}

/// How long one `GetEvents` long poll waits.
const EVENTS_WAIT: Duration = Duration::from_secs(10);

/// The pod's network, attached by the network code (the bundle's network
/// namespace: one tap per link, see ARCHITECTURE.md and
/// [`crate::network::NetnsNetwork`]): `attach` runs before the VM boots and
/// may add devices to it and name the namespace its VMM runs in,
/// `configure` once the agent answers (before any container is created),
/// `detach` after the VM stopped (and after a failed boot).
#[async_trait]
pub trait PodNetwork: Send + Sync {
    async fn attach(&mut self, vm: &mut SandboxSpec) -> Result<()>;
    /// The VM was restored from a template: its NICs have these device MACs
    /// (the template's), in NIC order; the guest network must find them by
    /// them and give the devices the sandbox's own MACs.
    fn restored(&mut self, _device_macs: Vec<[u8; 6]>) {}
    /// Gives the guest its side of the network.
    async fn configure(&mut self, _agent: &AgentClient) -> Result<()> {
        Ok(())
    }
    /// A container's init is about to start: wires interfaces that were
    /// added to the namespace since `attach` (as `ctr run --cni` does).
    async fn start(&mut self, _agent: &AgentClient) -> Result<()> {
        Ok(())
    }
    async fn detach(&mut self);
}

/// Which containers a pod holds, and whose namespaces they share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodKind {
    /// A CRI pod (the shim's): its sandbox container, and the containers
    /// whose `sandbox-id` annotation names it, which join its ipc, uts and
    /// pid namespaces ([`namespace_owner`]).
    Cri,
    /// A pod of one container (the CLI's). CRI annotations in its spec name
    /// a sandbox in another VM (a CRI runtime driving this runtime as runc:
    /// one VM per container), so it keeps namespaces of its own; a second
    /// container is refused.
    One,
}

/// Where a pod keeps its parts, and its network.
pub struct PodSetup {
    pub id: String,
    pub kind: PodKind,
    /// The VM's run directory is `<vm_root>/<vm_id>`.
    pub vm_root: PathBuf,
    pub vm_id: String,
    pub staging: Box<dyn PodStaging>,
    /// Where the VM's host pids are kept for [`Pod::cleanup_after_crash`].
    pub pids_file: Option<PathBuf>,
    pub network: Option<Box<dyn PodNetwork>>,
}

impl PodSetup {
    /// The shim's layout (a [`PodKind::Cri`] pod): the VM at `<state_root>/<id>`, the share at
    /// `<state_root>/shared/<id>` (created here), a pids file beside it.
    pub fn in_state_root(
        config: &Config,
        id: &str,
        network: Option<Box<dyn PodNetwork>>,
    ) -> Result<PodSetup> {
        Self::in_state_root_with(config, id, network, &staging::state_root_share)
    }

    /// As [`PodSetup::in_state_root`], with the staging `staging` makes.
    pub fn in_state_root_with(
        config: &Config,
        id: &str,
        network: Option<Box<dyn PodNetwork>>,
        staging: &StagingFn,
    ) -> Result<PodSetup> {
        sandbox::validate_id(id)?;
        Ok(PodSetup {
            id: id.to_string(),
            kind: PodKind::Cri,
            vm_root: config.state_root.clone(),
            vm_id: id.to_string(),
            staging: staging(config, id)?,
            pids_file: Some(pids_file(config, id)),
            network,
        })
    }
}

/// What a front-end sees of one process.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// The task pid (see [`Pod::task_pid`]).
    pub pid: u32,
    /// Guest pid (0 before the agent created it).
    pub guest_pid: u32,
    pub status: Status,
    pub exit: Option<Exit>,
    pub stdio: StdioPaths,
    pub bundle: PathBuf,
}

/// A container to create in the pod.
pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    /// Host path of the container's root file system (mounted by the caller).
    pub rootfs: &'a Path,
    /// The bundle's config.json; rewritten to guest paths here.
    pub spec: Value,
    pub stdio: Stdio,
}

struct Process {
    pid: u32,
    started: bool,
    paused: bool,
    stdio: Stdio,
    /// OCI `process` JSON of an exec (empty for the init process).
    process_json: Vec<u8>,
    relays: Arc<tokio::sync::Mutex<Relays>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    fn new(stdio: Stdio, process_json: Vec<u8>) -> Self {
        Process {
            pid: 0,
            started: false,
            paused: false,
            stdio,
            process_json,
            relays: Arc::default(),
            exit: watch::channel(None).0,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn status(&self) -> Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => Status::Stopped,
            (None, false, _) => Status::Created,
            (None, true, true) => Status::Paused,
            (None, true, false) => Status::Running,
        }
    }
}

struct Container {
    bundle: PathBuf,
    init: Process,
    execs: HashMap<String, Process>,
}

type Containers = HashMap<String, Container>;

/// A pod: one sandbox VM and the containers in it.
pub struct Pod {
    id: String,
    kind: PodKind,
    sandbox: Arc<Sandbox>,
    agent: AgentClient,
    share: Box<dyn PodStaging>,
    pids_file: Option<PathBuf>,
    containers: Arc<Mutex<Containers>>,
    events: mpsc::UnboundedSender<PodEvent>,
    /// The VM watcher and the OOM loop.
    tasks: Vec<JoinHandle<()>>,
    network: tokio::sync::Mutex<Option<Box<dyn PodNetwork>>>,
    /// `<run_dir>/metrics.sock` ([`crate::metrics`]).
    metrics: Option<MetricsServer>,
    /// Security events the guest reported, counted for the metrics socket.
    security: metrics::SecurityEvents,
}

/// Where a pod's staging share lives.
fn share_dir(config: &Config, pod_id: &str) -> PathBuf {
    config.state_root.join("shared").join(pod_id)
}

/// The host pids of a pod's VM, for cleanup after the front-end crashed.
fn pids_file(config: &Config, pod_id: &str) -> PathBuf {
    config
        .state_root
        .join("shared")
        .join(format!("{pod_id}.pids"))
}

/// For a CRI `container` (not the `sandbox` itself): its pod's sandbox
/// container, whose ipc, uts and pid namespaces it joins.
pub fn namespace_owner(spec: &Value) -> Option<&str> {
    let ann = &spec["annotations"];
    match ann[CONTAINER_TYPE_ANNOTATION].as_str() {
        Some("container") => ann[SANDBOX_ID_ANNOTATION].as_str(),
        _ => None,
    }
}

/// The pod a container joins, from its bundle: its CRI sandbox's id, or its
/// own id (a pod of its own). One shim serves each pod.
pub fn pod_of(id: &str, bundle: &Path) -> String {
    let spec = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .unwrap_or_default();
    match namespace_owner(&spec) {
        Some(sandbox) if vessel_protocol::id::valid_id(sandbox) => sandbox.to_string(),
        _ => id.to_string(),
    }
}

/// Whether `signal`'s default action ends a process (not 0, SIGCHLD,
/// SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGURG, SIGWINCH).
fn ends_unstarted_process(signal: u32) -> bool {
    !matches!(signal, 0 | 17 | 18 | 19 | 20 | 21 | 22 | 23 | 28)
}

fn check_exec_id(exec_id: Option<&str>) -> Result<()> {
    match exec_id {
        Some(e) if !vessel_protocol::id::valid_id(e) => {
            Err(PodError::Invalid(format!("exec id {e:?}")))
        }
        _ => Ok(()),
    }
}

impl Pod {
    /// Boots the pod's VM in the shim's layout ([`PodSetup::in_state_root`]).
    pub async fn boot(
        config: &Config,
        hv: &dyn Hypervisor,
        id: &str,
        spec: &Value,
        network: Option<Box<dyn PodNetwork>>,
        events: mpsc::UnboundedSender<PodEvent>,
    ) -> Result<Pod> {
        let setup = PodSetup::in_state_root(config, id, network)?;
        Self::boot_with(config, hv, setup, spec, events).await
    }

    /// Boots the pod's VM, sized from the first container's `spec`, with its
    /// staging share and network attached. On error nothing is left (the
    /// share is removed too).
    pub async fn boot_with(
        config: &Config,
        hv: &dyn Hypervisor,
        setup: PodSetup,
        spec: &Value,
        events: mpsc::UnboundedSender<PodEvent>,
    ) -> Result<Pod> {
        let PodSetup {
            id,
            kind,
            vm_root,
            vm_id,
            staging: share,
            pids_file,
            mut network,
        } = setup;
        let size = vm_size(spec, config);
        let vm = SandboxSpec {
            id: vm_id,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            shared_dirs: vec![share.shared_dir()],
            nics: Vec::new(),
            netns: None,
            deferred_devices: false,
        };
        // The VM's run directory is under `vm_root`; templates stay where the
        // configuration puts them, shared by every sandbox of this runtime.
        let mut vm_config = Config {
            state_root: vm_root,
            ..config.clone()
        };
        vm_config.templates.dir = Some(config.template_dir());
        let sandbox = match Self::boot_vm(&vm_config, hv, vm, network.as_deref_mut()).await {
            Ok(sb) => sb,
            Err(e) => {
                if let Some(n) = network.as_mut() {
                    n.detach().await;
                }
                if let Err(c) = share.remove() {
                    log::error!("pod {id}: {}", crate::chain(&c));
                }
                return Err(e);
            }
        };
        let pids: Vec<String> = sandbox.vm().pids().iter().map(u32::to_string).collect();
        if let Some(f) = &pids_file {
            if let Err(e) = std::fs::write(f, pids.join("\n")) {
                log::warn!("pod {id}: {}: {e}", f.display());
            }
        }
        log::info!(
            "pod {id}: VM up ({} vCPU, {} MiB, pids {pids:?})",
            size.vcpus,
            size.memory_mib,
        );
        let mut pod = Pod {
            id,
            kind,
            agent: sandbox.agent().clone(),
            sandbox: Arc::new(sandbox),
            share,
            pids_file,
            containers: Arc::default(),
            events,
            tasks: Vec::new(),
            network: tokio::sync::Mutex::new(network),
            metrics: None,
            security: Default::default(),
        };
        pod.watch();
        pod.serve_metrics(hv.name());
        Ok(pod)
    }

    /// Attaches the network, boots the VM and configures the guest's network.
    async fn boot_vm(
        config: &Config,
        hv: &dyn Hypervisor,
        mut vm: SandboxSpec,
        network: Option<&mut (dyn PodNetwork + 'static)>,
    ) -> Result<Sandbox> {
        let mut network = network;
        if let Some(n) = network.as_deref_mut() {
            n.attach(&mut vm).await?;
        }
        let sandbox = Sandbox::start(config, hv, vm).await?;
        // This process (the CLI's supervisor, the pod's shim) serves this pod alone:
        // it is one of the sandbox's host processes, under the same limits.
        if let Err(e) = sandbox.enter_host_cgroup() {
            let _ = sandbox.stop().await;
            return Err(e.into());
        }
        if let (Some(n), Some(macs)) = (network.as_deref_mut(), sandbox.device_macs()) {
            n.restored(macs.to_vec());
        }
        let ready = if !matches!(
            sandbox.vm().agent_endpoint(),
            AgentEndpoint::HybridVsock { .. }
        ) {
            Err(PodError::NeedsVsock)
        } else if let Some(n) = network {
            n.configure(sandbox.agent()).await
        } else {
            Ok(())
        };
        if let Err(e) = ready {
            let _ = sandbox.stop().await;
            return Err(e);
        }
        Ok(sandbox)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pod's agent client, for streams a front-end relays itself
    /// ([`Stdio::Caller`]).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The host pid of the pod's VMM (a host process of the sandbox).
    pub fn host_pid(&self) -> u32 {
        self.sandbox.vm().pids().first().copied().unwrap_or(0)
    }

    /// The pid front-ends report for a process (containerd's task pid): for
    /// a container's init, the VMM's host pid, never a guest pid that host
    /// tools would take for a host process; for an exec, its guest pid.
    pub fn task_pid(&self, exec_id: Option<&str>, guest_pid: u32) -> u32 {
        match exec_id {
            None => self.host_pid(),
            Some(_) => guest_pid,
        }
    }

    /// How the VM ended, if it has.
    pub fn vm_exit(&self) -> Option<VmExit> {
        self.sandbox.vm().try_exit()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Containers> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on process `exec_id` (init if `None`) of container `id`.
    fn with_process<T>(
        &self,
        id: &str,
        exec_id: Option<&str>,
        f: impl FnOnce(&mut Process, &Path) -> Result<T>,
    ) -> Result<T> {
        let mut containers = self.lock();
        let c = containers
            .get_mut(id)
            .ok_or_else(|| PodError::NotFound(id.to_string()))?;
        let p = match exec_id {
            None => &mut c.init,
            Some(e) => c.execs.get_mut(e).ok_or_else(|| PodError::ExecNotFound {
                id: id.to_string(),
                exec_id: e.to_string(),
            })?,
        };
        f(p, &c.bundle)
    }

    /// Fails with [`PodError::WrongState`] unless `ok(status)` of the process.
    pub fn require(
        &self,
        id: &str,
        exec_id: Option<&str>,
        op: &'static str,
        ok: fn(Status) -> bool,
    ) -> Result<()> {
        self.with_process(id, exec_id, |p, _| {
            let status = p.status();
            if ok(status) {
                return Ok(());
            }
            let what = match exec_id {
                None => format!("container {id}"),
                Some(e) => format!("exec {e} of {id}"),
            };
            Err(PodError::WrongState { what, status, op })
        })
    }

    pub fn process(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessInfo> {
        self.with_process(id, exec_id, |p, bundle| {
            Ok(ProcessInfo {
                pid: self.task_pid(exec_id, p.pid),
                guest_pid: p.pid,
                status: p.status(),
                exit: p.exited(),
                stdio: p.stdio.paths(),
                bundle: bundle.to_path_buf(),
            })
        })
    }

    /// Resolves with the process's exit (see [`Pod::process`] for the rest).
    pub fn exit_watch(
        &self,
        id: &str,
        exec_id: Option<&str>,
    ) -> Result<watch::Receiver<Option<Exit>>> {
        self.with_process(id, exec_id, |p, _| Ok(p.exit.subscribe()))
    }

    /// Creates a container: stages its rootfs and bind sources in the share,
    /// creates it in the guest and attaches its stdio. Returns its task pid
    /// (see [`Pod::task_pid`]). On error nothing of it is left.
    pub async fn create(&self, req: CreateRequest<'_>) -> Result<u32> {
        let id = req.id;
        crate::container::validate_id(id).map_err(|e| PodError::Invalid(e.to_string()))?;
        if self.lock().contains_key(id) {
            return Err(PodError::Exists(format!("container {id}")));
        }
        if let Some(exit) = self.vm_exit() {
            return Err(PodError::VmExited(exit.to_string()));
        }
        let mut spec = req.spec;
        let owner = match self.kind {
            PodKind::Cri => namespace_owner(&spec).map(str::to_string),
            PodKind::One if !self.is_empty() => {
                return Err(PodError::Invalid(format!(
                    "container {id}: pod {} holds one container",
                    self.id
                )))
            }
            PodKind::One => None,
        };
        if let Some(sandbox) = &owner {
            if !self.lock().contains_key(sandbox) {
                return Err(PodError::Invalid(format!(
                    "container {id}: its pod sandbox {sandbox:?} is not a container of this pod"
                )));
            }
        }
        self.share.stage(id, req.rootfs, &mut spec)?;
        match self
            .create_staged(id, spec, owner.as_deref(), &req.stdio)
            .await
        {
            Ok((pid, relays)) => {
                let mut init = Process::new(req.stdio, Vec::new());
                init.pid = pid;
                init.relays = Arc::new(tokio::sync::Mutex::new(relays));
                let c = Container {
                    bundle: req.bundle.to_path_buf(),
                    init,
                    execs: HashMap::new(),
                };
                self.lock().insert(id.to_string(), c);
                Ok(self.task_pid(None, pid))
            }
            Err(e) => {
                if let Err(c) = self.share.unstage(id) {
                    log::error!("container {id}: {c}; its staging is left in place");
                }
                Err(e)
            }
        }
    }

    async fn create_staged(
        &self,
        id: &str,
        spec: Value,
        owner: Option<&str>,
        stdio: &Stdio,
    ) -> Result<(u32, Relays)> {
        let spec_json = serde_json::to_vec(&spec).expect("a JSON value serializes");
        let pid = self
            .agent
            .create(NewContainer {
                id,
                spec_json,
                storages: vec![Staging::storage()],
                stdio: stdio.wanted(),
                share_namespaces_with: owner,
            })
            .await?;
        match stdio::attach(&self.agent, id, None, stdio).await {
            Ok(relays) => Ok((pid, relays)),
            Err(e) => {
                let _ = self.agent.remove(id, true).await;
                Err(e)
            }
        }
    }

    /// Adds an exec process (started by [`Pod::start`]).
    pub fn add_exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: Stdio,
    ) -> Result<()> {
        check_exec_id(Some(exec_id))?;
        if !serde_json::from_slice::<Value>(&process_json).is_ok_and(|v| v.is_object()) {
            return Err(PodError::Invalid(format!(
                "exec {exec_id}: the process is not a JSON object"
            )));
        }
        let mut containers = self.lock();
        let c = containers
            .get_mut(id)
            .ok_or_else(|| PodError::NotFound(id.to_string()))?;
        if c.execs.contains_key(exec_id) {
            return Err(PodError::Exists(format!("exec {exec_id}")));
        }
        c.execs
            .insert(exec_id.to_string(), Process::new(stdio, process_json));
        Ok(())
    }

    /// Starts a created container's init (`exec_id` None) or an added exec;
    /// returns its task pid. Its exit is reported as a [`PodEvent::Exit`].
    pub async fn start(&self, id: &str, exec_id: Option<&str>) -> Result<u32> {
        self.require(id, exec_id, "start", Status::can_start)?;
        let (stdio, json, relays) = self.with_process(id, exec_id, |p, _| {
            Ok((p.stdio.clone(), p.process_json.clone(), p.relays.clone()))
        })?;
        let pid = match exec_id {
            None => {
                if let Some(n) = self.network.lock().await.as_mut() {
                    n.start(&self.agent).await?;
                }
                self.agent.start(id).await?;
                self.with_process(id, None, |p, _| Ok(p.pid))?
            }
            Some(e) => {
                let pid = self.agent.exec(id, e, json, stdio.wanted()).await?;
                *relays.lock().await = stdio::attach(&self.agent, id, Some(e), &stdio).await?;
                pid
            }
        };
        let sender = self.with_process(id, exec_id, |p, _| {
            p.pid = pid;
            p.started = true;
            Ok(p.exit.clone())
        })?;
        let task_pid = self.task_pid(exec_id, pid);
        let (agent, events) = (self.agent.clone(), self.events.clone());
        let (id, exec_id) = (id.to_string(), exec_id.map(str::to_string));
        tokio::spawn(async move {
            let status = match agent.wait(&id, exec_id.as_deref()).await {
                Ok(s) => s.status as u32,
                Err(e) => {
                    log::warn!("wait for {id}/{exec_id:?}: {e}");
                    LOST_EXIT_STATUS
                }
            };
            relays.lock().await.drain(DRAIN_TIMEOUT).await;
            record_exit(&sender, &events, &id, exec_id.as_deref(), task_pid, status);
        });
        Ok(task_pid)
    }

    /// Signals a process; one that has exited is left alone.
    pub async fn kill(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let info = self.process(id, exec_id)?;
        if info.exit.is_some() {
            return Ok(());
        }
        if info.status != Status::Created {
            return Ok(self.agent.signal(id, exec_id, signal, all).await?);
        }
        // Never started, or its start failed: no waiter will report an
        // exit, and the front-end waits for one before it deletes. A
        // signal that would end the process ends it here.
        if let Err(e) = self.agent.signal(id, exec_id, signal, all).await {
            log::debug!("signal {signal} to unstarted {id}/{exec_id:?}: {e}");
        }
        if ends_unstarted_process(signal) {
            self.with_process(id, exec_id, |p, _| {
                record_exit(&p.exit, &self.events, id, exec_id, info.pid, 128 + signal);
                Ok(())
            })?;
        }
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.require(id, None, "pause", Status::can_pause)?;
        self.agent.pause(id).await?;
        self.with_process(id, None, |p, _| {
            p.paused = true;
            Ok(())
        })
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.require(id, None, "resume", Status::can_resume)?;
        self.agent.resume(id).await?;
        self.with_process(id, None, |p, _| {
            p.paused = false;
            Ok(())
        })
    }

    /// Deletes an exec, or a container with its guest state and staging. A
    /// staging that cannot be unmounted is left in place (never removed
    /// recursively) and logged. Returns the process as it was.
    pub async fn delete(&self, id: &str, exec_id: Option<&str>) -> Result<ProcessInfo> {
        self.require(id, exec_id, "delete", Status::can_delete)?;
        let info = self.process(id, exec_id)?;
        if let Some(e) = exec_id {
            if let Some(c) = self.lock().get_mut(id) {
                c.execs.remove(e);
            }
            return Ok(info);
        }
        if let Some(exit) = self.vm_exit() {
            log::debug!("VM gone ({exit}); not asking the agent to remove {id}");
        } else if let Err(e) = self.agent.remove(id, true).await {
            log::warn!("agent RemoveContainer {id}: {e}");
        }
        if let Err(e) = self.share.unstage(id) {
            log::error!("container {id}: {e}; its staging is left in place");
        }
        self.lock().remove(id);
        Ok(info)
    }

    pub async fn close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<()> {
        let relays = self.with_process(id, exec_id, |p, _| Ok(p.relays.clone()))?;
        relays.lock().await.close_stdin();
        Ok(())
    }

    pub async fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<()> {
        self.process(id, exec_id)?;
        Ok(self.agent.resize(id, exec_id, rows, cols).await?)
    }

    /// Guest pids of the container's processes.
    pub async fn processes(&self, id: &str) -> Result<Vec<u32>> {
        self.process(id, None)?;
        Ok(self.agent.processes(id).await?)
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.process(id, None)?;
        Ok(self.agent.stats(id).await?)
    }

    /// Applies OCI `linux.resources` JSON inside the guest (the VM keeps its
    /// size: its vCPUs and memory are fixed at boot).
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        self.process(id, None)?;
        Ok(self.agent.update(id, resources_json).await?)
    }

    /// Stops the VM, removes the share and detaches the network.
    pub async fn stop(mut self) {
        // First: its connections hold the sandbox.
        if let Some(m) = self.metrics.take() {
            m.stop().await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        let mut sandbox = self.sandbox;
        let deadline = tokio::time::Instant::now() + RELEASE_TIMEOUT;
        // Waiter tasks may still hold the agent, never the sandbox.
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
        if let Some(n) = self.network.get_mut().as_mut() {
            n.detach().await;
        }
        if let Err(e) = self.share.remove() {
            log::error!("pod {}: {}; left in place", self.id, crate::chain(&e));
        }
        if let Some(f) = &self.pids_file {
            let _ = std::fs::remove_file(f);
        }
    }

    /// After the front-end died: kills the VM processes it recorded and
    /// removes the pod's share and run directory. Best effort, never fails.
    pub fn cleanup_after_crash(config: &Config, id: &str) {
        if sandbox::validate_id(id).is_err() {
            return;
        }
        let pids = pids_file(config, id);
        if let Ok(text) = std::fs::read_to_string(&pids) {
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if pid > 1 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = std::fs::remove_file(&pids);
        }
        crate::network::remove_owned_netns(&config.state_root, id);
        crate::limits::remove_stale(&config.state_root.join(id));
        if let Err(e) = share::cleanup_tree(&share_dir(config, id)) {
            log::error!("pod {id}: {e}; left in place");
        }
        let run_dir = config.state_root.join(id);
        if run_dir.join("console.log").exists() {
            let _ = std::fs::remove_dir_all(run_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ending_signals_end_an_unstarted_process() {
        assert!(ends_unstarted_process(9) && ends_unstarted_process(15));
        assert!(!ends_unstarted_process(0) && !ends_unstarted_process(28));
    }

    #[test]
    fn containers_join_the_pod_of_their_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pod_of("c1", dir.path()), "c1");
        let spec = |ty: &str, sb: &str| {
            format!(
                r#"{{"annotations":{{"{CONTAINER_TYPE_ANNOTATION}":"{ty}","{SANDBOX_ID_ANNOTATION}":"{sb}"}}}}"#
            )
        };
        std::fs::write(dir.path().join("config.json"), spec("container", "pod1")).unwrap();
        assert_eq!(pod_of("c1", dir.path()), "pod1");
        std::fs::write(dir.path().join("config.json"), spec("sandbox", "pod1")).unwrap();
        assert_eq!(pod_of("pod1", dir.path()), "pod1");
        std::fs::write(dir.path().join("config.json"), spec("container", "../x")).unwrap();
        assert_eq!(pod_of("c1", dir.path()), "c1");
    }
}
