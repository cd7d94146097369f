//! The shim v2 task API mapped onto the runtime's pod model
//! ([`vessel_runtime::pod::Pod`]): requests in, pod operations, replies and
//! events out. No sandbox logic lives here.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context as PubContext;
use containerd_shim::{Task, TtrpcContext};
use oci_spec::runtime::Spec;
use tokio::sync::{mpsc, Mutex};
use ttrpc::{Code, Result as TtrpcResult};
use vessel_hypervisor::Hypervisor;
use vessel_runtime::container::Status;
use vessel_runtime::pod::{
    CreateRequest, Exit, MakeStaging, Pod, PodEvent, PodSlot, Stdio, StdioPaths, LOST_EXIT_STATUS,
};
use vessel_runtime::Config;

use crate::error::{err, internal, pod_error};
use crate::rootfs;

/// How containerd's typeurl names an OCI `linux.resources` (JSON) in an Any.
const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// containerd names the init process by an empty exec id.
fn exec_of(exec_id: &str) -> Option<&str> {
    Some(exec_id).filter(|e| !e.is_empty())
}

fn task_status(s: Status) -> api::Status {
    match s {
        Status::Creating | Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

fn exit_fields(exit: Option<Exit>) -> (u32, MessageField<Timestamp>) {
    match exit {
        Some(e) => (e.status, MessageField::some(timestamp(e.at))),
        None => (0, MessageField::none()),
    }
}

/// What the service builds a pod's VM with: [`Backend::real`] in the shim,
/// fakes (vessel_testutil::fake) in the service's tests.
pub struct Backend {
    pub hypervisor: Box<MakeHypervisor>,
    pub staging: MakeStaging,
}

/// See [`Backend::hypervisor`].
pub type MakeHypervisor =
    dyn Fn(&Config) -> vessel_runtime::Result<Box<dyn Hypervisor>> + Send + Sync;

impl Backend {
    /// The configured hypervisor; pods staged under the state root.
    pub fn real() -> Self {
        Backend {
            hypervisor: Box::new(vessel_runtime::sandbox::hypervisor),
            staging: vessel_runtime::pod::state_root_staging(),
        }
    }
}

struct State {
    slot: PodSlot,
    /// Containers whose rootfs this shim mounted at `<bundle>/rootfs`.
    mounted_rootfs: HashSet<String>,
}

impl State {
    fn pod(&self) -> TtrpcResult<&Pod> {
        self.slot
            .get()
            .ok_or_else(|| err(Code::NOT_FOUND, "no container in this shim"))
    }
}

struct Inner {
    /// Loaded once when the shim server starts.
    config: Config,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<PodEvent>,
    hypervisor: Box<MakeHypervisor>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        config: Config,
        namespace: &str,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
        backend: Backend,
    ) -> Self {
        let (events, mut rx) = mpsc::unbounded_channel();
        let state = State {
            slot: PodSlot::with_staging(backend.staging),
            mounted_rootfs: HashSet::new(),
        };
        let inner = Arc::new(Inner {
            config,
            namespace: namespace.to_string(),
            publisher,
            exit,
            state: Mutex::new(state),
            events,
            hypervisor: backend.hypervisor,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                inner.publish_pod_event(ev).await;
            }
        });
        TaskService { inner }
    }
}

impl Inner {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(PubContext::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("publish {topic}: {e}");
        }
    }

    async fn publish_pod_event(&self, ev: PodEvent) {
        match ev {
            PodEvent::Exit {
                container_id,
                exec_id,
                pid,
                exit,
            } => {
                let ev = TaskExit {
                    id: exec_id.unwrap_or_else(|| container_id.clone()),
                    container_id,
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(timestamp(exit.at)),
                    ..Default::default()
                };
                self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
            PodEvent::Oom { container_id } => {
                let ev = TaskOOM {
                    container_id,
                    ..Default::default()
                };
                self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
            // Into the shim's log, which containerd copies into its own.
            PodEvent::GuestLog { sandbox, line } => {
                vessel_runtime::guest_events::log_guest_line(&sandbox, &line)
            }
            PodEvent::Security { sandbox, event } => {
                vessel_runtime::guest_events::log_security_event(&sandbox, &event)
            }
            // Its processes' exits were published already.
            PodEvent::VmExited => {}
        }
    }

    /// Pauses or resumes container `id` (status guards in the pod).
    async fn freeze(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let state = self.state.lock().await;
        let pod = state.pod()?;
        let res = if pause {
            pod.pause(id).await
        } else {
            pod.resume(id).await
        };
        res.map_err(|e| pod_error(id, e))?;
        drop(state);
        let container_id = id.to_string();
        let (topic, ev): (_, Box<dyn MessageDyn>) = if pause {
            let ev = TaskPaused {
                container_id,
                ..Default::default()
            };
            (topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
        } else {
            let ev = TaskResumed {
                container_id,
                ..Default::default()
            };
            (topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
        };
        self.publish(topic, ev).await;
        Ok(api::Empty::new())
    }

    /// Creates container `req.id` (the first one boots the pod's VM: the
    /// CRI sandbox or a standalone `ctr run` container).
    async fn create(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let (id, bundle) = (req.id.as_str(), PathBuf::from(&req.bundle));
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("bundle {}: {e}", req.bundle),
            )
        })?;
        let root = spec.root().as_ref().map(|r| r.path().clone());
        let spec = serde_json::to_value(&spec).map_err(internal)?;
        let mut state = self.state.lock().await;
        if state
            .slot
            .get()
            .is_some_and(|p| p.process(id, None).is_ok())
        {
            return Err(err(Code::ALREADY_EXISTS, format!("container {id} exists")));
        }
        let mounted = !req.rootfs.is_empty();
        let rootfs = if mounted {
            rootfs::mount(&bundle, &req.rootfs).map_err(|e| {
                rootfs::unmount(&bundle);
                internal(e)
            })?
        } else {
            // A bundle with a ready rootfs (ctr run --rootfs, plain OCI bundles).
            bundle.join(root.unwrap_or_else(|| "rootfs".into()))
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let (bundle_dir, rootfs) = (bundle.as_path(), rootfs.as_path());
        let create = CreateRequest {
            id,
            bundle: bundle_dir,
            rootfs,
            spec,
            stdio: Stdio::Fifos(stdio),
        };
        let make_hv = || (self.hypervisor)(&self.config);
        let res = state
            .slot
            .create(&self.config, make_hv, &self.events, create)
            .await;
        match res {
            Ok(_) if mounted => state.mounted_rootfs.insert(id.to_string()),
            Err(_) if mounted => {
                rootfs::unmount(&bundle);
                false
            }
            _ => false,
        };
        res.map_err(|e| pod_error(id, e))
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if !vessel_protocol::id::valid_id(&req.id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid container id {:?}", req.id),
            ));
        }
        let pid = self.inner.create(&req).await?;
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid,
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let state = self.inner.state.lock().await;
        let exec = exec_of(&req.exec_id);
        let pid = state
            .pod()?
            .start(&req.id, exec)
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        drop(state);
        let (topic, ev): (_, Box<dyn MessageDyn>) = match exec {
            None => (
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            ),
            Some(e) => (
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: e.to_string(),
                    pid,
                    ..Default::default()
                }),
            ),
        };
        self.inner.publish(topic, ev).await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut state = self.inner.state.lock().await;
        let exec = exec_of(&req.exec_id);
        let p = state
            .slot
            .delete(&req.id, exec)
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        let (exit_status, at) = exit_fields(p.exit);
        let exited_at = if at.is_some() {
            at
        } else {
            MessageField::some(timestamp(SystemTime::now()))
        };
        let resp = api::DeleteResponse {
            pid: p.pid,
            exit_status,
            exited_at: exited_at.clone(),
            ..Default::default()
        };
        if exec.is_some() {
            return Ok(resp);
        }
        if state.mounted_rootfs.remove(&req.id) {
            rootfs::unmount(&p.bundle);
        }
        drop(state);
        let ev = TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid: p.pid,
            exit_status,
            exited_at,
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(resp)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::Process>(&json)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let state = self.inner.state.lock().await;
        state
            .pod()?
            .add_exec(&req.id, &req.exec_id, json, Stdio::Fifos(stdio))
            .map_err(|e| pod_error(&req.id, e))?;
        drop(state);
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.inner
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        let state = self.inner.state.lock().await;
        state
            .pod()?
            .resize(
                &req.id,
                exec_of(&req.exec_id),
                clamp(req.height),
                clamp(req.width),
            )
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.inner.state.lock().await;
        let p = state
            .pod()?
            .process(&req.id, exec_of(&req.exec_id))
            .map_err(|e| pod_error(&req.id, e))?;
        let (exit_status, exited_at) = exit_fields(p.exit);
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: p.bundle.display().to_string(),
            pid: p.pid,
            status: task_status(p.status).into(),
            stdin: p.stdio.stdin,
            stdout: p.stdio.stdout,
            stderr: p.stdio.stderr,
            terminal: p.stdio.terminal,
            exit_status,
            exited_at,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let state = self.inner.state.lock().await;
        let pids = state
            .pod()?
            .processes(&req.id)
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        let processes = pids
            .iter()
            .map(|&pid| containerd_shim::protos::api::ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        state
            .pod()?
            .kill(&req.id, exec_of(&req.exec_id), req.signal, req.all)
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let state = self.inner.state.lock().await;
            state
                .pod()?
                .exit_watch(&req.id, exec_of(&req.exec_id))
                .map_err(|e| pod_error(&req.id, e))?
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(Code::NOT_FOUND, format!("{} was deleted", req.id)))?
            .unwrap_or(Exit {
                status: LOST_EXIT_STATUS,
                at: SystemTime::now(),
            });
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let state = self.inner.state.lock().await;
        let s = state
            .pod()?
            .stats(&req.id)
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        let metrics = crate::stats::to_cgroup2_metrics(&s);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(internal)?;
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let state = self.inner.state.lock().await;
        let p = state
            .pod()?
            .process(&req.id, None)
            .map_err(|e| pod_error(&req.id, e))?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: p.pid,
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        if state.slot.get().is_none() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        let pod = state.pod()?;
        let exec = exec_of(&req.exec_id);
        if req.stdin {
            pod.close_stdin(&req.id, exec)
                .await
                .map_err(|e| pod_error(&req.id, e))?;
        } else {
            pod.process(&req.id, exec)
                .map_err(|e| pod_error(&req.id, e))?;
        }
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.inner.freeze(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.inner.freeze(&req.id, false).await
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources = req.resources.as_ref().ok_or_else(|| {
            err(
                Code::INVALID_ARGUMENT,
                format!("update of {}: no resources", req.id),
            )
        })?;
        if resources.type_url != LINUX_RESOURCES_TYPE_URL {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!(
                    "update of {}: resources of type {:?}, expected {LINUX_RESOURCES_TYPE_URL}",
                    req.id, resources.type_url
                ),
            ));
        }
        let state = self.inner.state.lock().await;
        state
            .pod()?
            .update(&req.id, resources.value.clone())
            .await
            .map_err(|e| pod_error(&req.id, e))?;
        log::info!(
            "update of {}: limits applied in the guest; the VM itself is not resized",
            req.id
        );
        Ok(api::Empty::new())
    }
}
