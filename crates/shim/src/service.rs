//! The shim v2 task API over the pod's VM and agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
use tokio::sync::{watch, Mutex};
use ttrpc::{Code, Result as TtrpcResult};
use vessel_runtime::agent::AgentClient;
use vessel_runtime::container::bundle::vm_size;
use vessel_runtime::container::share::Staging;
use vessel_runtime::container::Status;
use vessel_runtime::Config;

use crate::error::{agent_error, err, internal};
use crate::pod::{self, Pod};
use crate::state::{Container, Exit, Process, State};
use crate::stdio::{self, StdioPaths};

/// Exit status reported when a process's fate is unknown (VM died, agent gone).
const LOST_EXIT_STATUS: u32 = 255;
/// How containerd's typeurl names an OCI `linux.resources` (JSON) in an Any.
const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// Longest time output relays get to flush after a process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

struct Inner {
    /// Loaded once when the shim server starts.
    config: Config,
    namespace: String,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    state: Mutex<State>,
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
    ) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                config,
                namespace: namespace.to_string(),
                publisher,
                exit,
                state: Mutex::new(State::default()),
            }),
        }
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

    /// Records an exit once and publishes TaskExit; later calls are no-ops.
    async fn record_exit(&self, sender: &watch::Sender<Option<Exit>>, ev: TaskExit) {
        let exit = Exit {
            status: ev.exit_status,
            at: ev.exited_at.clone().unwrap_or_default(),
        };
        if sender.send_if_modified(|e| e.is_none() && e.replace(exit).is_none()) {
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(ev))
                .await;
        }
    }

    /// Boots the pod's VM for the first container (the CRI sandbox or a
    /// standalone `ctr run` container).
    async fn boot_pod(
        self: &Arc<Self>,
        state: &mut State,
        id: &str,
        spec: &Spec,
    ) -> TtrpcResult<()> {
        let spec = serde_json::to_value(spec).map_err(internal)?;
        let size = vm_size(&spec, &self.config);
        let pod = Pod::boot(&self.config, id, size)
            .await
            .map_err(|e| err(Code::INTERNAL, format!("boot the pod VM: {e:#}")))?;
        let this = self.clone();
        let died = pod.watch_exit();
        state.pod_tasks.push(tokio::spawn(async move {
            let exit = died.await;
            this.vm_died(exit).await;
        }));
        let this = self.clone();
        let agent = pod.agent.clone();
        state
            .pod_tasks
            .push(tokio::spawn(async move { this.oom_loop(agent).await }));
        state.pod = Some(pod);
        Ok(())
    }

    /// Stops the pod's VM and its tasks.
    async fn stop_pod(&self, state: &mut State) {
        for t in state.pod_tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        if let Some(pod) = state.pod.take() {
            pod.stop().await;
        }
    }

    /// The hypervisor exited under a running pod: every live process is
    /// reported exited with an error at once. The hypervisor crate stops the
    /// VM's helpers; mounts and state go when containerd deletes the tasks.
    async fn vm_died(&self, exit: vessel_hypervisor::VmExit) {
        log::error!("the pod's VM exited unexpectedly ({exit}); reporting its processes as exited");
        let mut pending = Vec::new();
        {
            let state = self.state.lock().await;
            for (cid, c) in &state.containers {
                for (exec_id, p) in std::iter::once((String::new(), &c.init))
                    .chain(c.execs.iter().map(|(k, v)| (k.clone(), v)))
                {
                    if p.exited().is_none() {
                        let ev = TaskExit {
                            container_id: cid.clone(),
                            id: if exec_id.is_empty() {
                                cid.clone()
                            } else {
                                exec_id
                            },
                            pid: p.pid,
                            exit_status: LOST_EXIT_STATUS,
                            exited_at: MessageField::some(now()),
                            ..Default::default()
                        };
                        pending.push((p.exit.clone(), ev));
                    }
                }
            }
        }
        for (sender, ev) in pending {
            self.record_exit(&sender, ev).await;
        }
    }

    async fn oom_loop(&self, agent: AgentClient) {
        loop {
            match agent.oom_event().await {
                Ok(container_id) => {
                    log::info!("OOM kill in {container_id}");
                    let oom = TaskOOM {
                        container_id,
                        ..Default::default()
                    };
                    self.publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(oom))
                        .await;
                }
                Err(e) => {
                    log::debug!("OOM event loop ends: {e}");
                    return;
                }
            }
        }
    }

    /// Waits for a started process in the guest, flushes its output, records the exit.
    fn spawn_waiter(
        self: &Arc<Self>,
        agent: AgentClient,
        cid: String,
        exec_id: String,
        p: &Process,
    ) {
        let this = self.clone();
        let sender = p.exit.clone();
        let relays = p.relays.clone();
        let pid = p.pid;
        tokio::spawn(async move {
            let exec = Some(exec_id.as_str()).filter(|e| !e.is_empty());
            let status = match agent.wait(&cid, exec).await {
                // Untrusted: shell convention is 0..=255 (128 + signal included).
                Ok(r) if (0..=255).contains(&r.status) => r.status as u32,
                Ok(r) => {
                    log::warn!("agent reported exit status {} for {cid}", r.status);
                    LOST_EXIT_STATUS
                }
                Err(e) => {
                    log::warn!("wait for {cid}/{exec_id}: {e}");
                    LOST_EXIT_STATUS
                }
            };
            relays.lock().await.drain(DRAIN_TIMEOUT).await;
            let ev = TaskExit {
                id: if exec_id.is_empty() {
                    cid.clone()
                } else {
                    exec_id
                },
                container_id: cid,
                pid,
                exit_status: status,
                exited_at: MessageField::some(now()),
                ..Default::default()
            };
            this.record_exit(&sender, ev).await;
        });
    }
}

fn exit_fields(p: &Process) -> (u32, MessageField<Timestamp>) {
    match p.exited() {
        Some(e) => (e.status, MessageField::some(e.at)),
        None => (0, MessageField::none()),
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let inner = &self.inner;
        let id = req.id.clone();
        if !vessel_protocol::stdio::valid_id(&id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid container id {id:?}"),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("bundle {}: {e}", req.bundle),
            )
        })?;
        let mut state = inner.state.lock().await;
        if state.containers.contains_key(&id) {
            return Err(err(Code::ALREADY_EXISTS, format!("container {id} exists")));
        }
        if state.pod.is_none() {
            inner.boot_pod(&mut state, &id, &spec).await?;
        }
        if let Some(exit) = state.pod()?.vm_exit() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!(
                    "container {id}: the pod's VM has exited ({exit}); remove the pod and create it again"
                ),
            ));
        }
        let res = self.create_in(&mut state, &req, spec).await;
        if res.is_err() && state.containers.is_empty() {
            // The VM was booted for this container: nothing else needs it.
            inner.stop_pod(&mut state).await;
        }
        let pid = res?;
        drop(state);
        let ev = TaskCreate {
            container_id: id.clone(),
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
        inner
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
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let pod = state.pod()?;
        let agent = pod.agent.clone();
        let p = state.process(&req.id, &req.exec_id)?;
        if p.started {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} already started", req.id),
            ));
        }
        let pid = if req.exec_id.is_empty() {
            agent
                .start(&req.id)
                .await
                .map_err(|e| agent_error(&req.id, e))?;
            p.pid
        } else {
            let stdio = p.stdio.clone();
            let pid = agent
                .exec(
                    &req.id,
                    &req.exec_id,
                    p.process_json.clone(),
                    stdio.wanted(),
                )
                .await
                .map_err(|e| agent_error(&req.id, e))?;
            let relays = stdio::attach(&agent, &req.id, Some(&req.exec_id), &stdio)
                .await
                .map_err(internal)?;
            *p.relays.lock().await = relays;
            pid
        };
        let p = state.process_mut(&req.id, &req.exec_id)?;
        p.pid = pid;
        p.started = true;
        let p = state.process(&req.id, &req.exec_id)?;
        inner.spawn_waiter(agent, req.id.clone(), req.exec_id.clone(), p);
        drop(state);
        if req.exec_id.is_empty() {
            let ev = TaskStart {
                container_id: req.id.clone(),
                pid,
                ..Default::default()
            };
            inner
                .publish(topics::TASK_START_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let ev = TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            };
            inner
                .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
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
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let p = state.process(&req.id, &req.exec_id)?;
        if p.started && p.exited().is_none() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} is running: kill it first", req.id),
            ));
        }
        let (status, at) = exit_fields(p);
        let pid = p.pid;
        let resp = api::DeleteResponse {
            pid,
            exit_status: status,
            exited_at: if at.is_some() {
                at.clone()
            } else {
                MessageField::some(now())
            },
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            if let Some(c) = state.containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            return Ok(resp);
        }
        if let Ok(pod) = state.pod() {
            let agent = pod.agent.clone();
            if pod.vm_exit().is_some() {
                log::debug!("VM gone; not asking the agent to remove {}", req.id);
            } else if let Err(e) = agent.remove(&req.id, true).await {
                log::warn!("agent RemoveContainer {}: {e}", req.id);
            }
            // Never recursive: a staged bind mount that cannot be unmounted
            // stays, with its host data, and is reported.
            if let Err(e) = pod.share.unstage(&req.id) {
                log::error!("container {}: {e}; its staging is left in place", req.id);
            }
        }
        if let Some(c) = state.containers.get(&req.id) {
            if c.rootfs_mounted {
                pod::unmount_rootfs(std::path::Path::new(&c.bundle));
            }
        }
        state.containers.remove(&req.id);
        let pod_done = state.pod.as_ref().is_some_and(|p| p.id == req.id);
        if pod_done {
            inner.stop_pod(&mut state).await;
        }
        drop(state);
        let ev = TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid,
            exit_status: status,
            exited_at: resp.exited_at.clone(),
            ..Default::default()
        };
        inner
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(resp)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let inner = &self.inner;
        if !vessel_protocol::stdio::valid_id(&req.exec_id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let json = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::Process>(&json)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let mut state = inner.state.lock().await;
        let c = state
            .containers
            .get_mut(&req.id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {} not found", req.id)))?;
        if c.execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} exists", req.exec_id),
            ));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(stdio, json));
        drop(state);
        let ev = TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        inner
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        state.process(&req.id, &req.exec_id)?;
        let agent = state.pod()?.agent.clone();
        drop(state);
        let exec = Some(req.exec_id.as_str()).filter(|e| !e.is_empty());
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        agent
            .resize(&req.id, exec, clamp(req.height), clamp(req.width))
            .await
            .map_err(|e| agent_error(&req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.inner.state.lock().await;
        let c = state.container(&req.id)?;
        let p = state.process(&req.id, &req.exec_id)?;
        let (exit_status, exited_at) = exit_fields(p);
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: p.pid,
            status: crate::state::task_status(p.status()).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
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
        state.container(&req.id)?;
        let agent = state.pod()?.agent.clone();
        drop(state);
        let pids = agent
            .processes(&req.id)
            .await
            .map_err(|e| agent_error(&req.id, e))?;
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
        let p = state.process(&req.id, &req.exec_id)?;
        if p.exited().is_some() {
            // Already gone (also after the VM died): nothing to signal.
            return Ok(api::Empty::new());
        }
        if !p.started && req.exec_id.is_empty() {
            log::debug!(
                "kill of created container {}: signalled in the guest",
                req.id
            );
        }
        let agent = state.pod()?.agent.clone();
        drop(state);
        let exec = Some(req.exec_id.as_str()).filter(|e| !e.is_empty());
        agent
            .signal(&req.id, exec, req.signal, req.all)
            .await
            .map_err(|e| agent_error(&req.id, e))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = {
            let state = self.inner.state.lock().await;
            state.process(&req.id, &req.exec_id)?.exit.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(Code::NOT_FOUND, format!("{} was deleted", req.id)))?
            .clone()
            .unwrap_or_else(|| Exit {
                status: LOST_EXIT_STATUS,
                at: now(),
            });
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let state = self.inner.state.lock().await;
        state.container(&req.id)?;
        let agent = state.pod()?.agent.clone();
        drop(state);
        let s = agent
            .stats(&req.id)
            .await
            .map_err(|e| agent_error(&req.id, e))?;
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
        let c = state.container(&req.id)?;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: c.init.pid,
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        if state.containers.is_empty() && state.pod.is_none() {
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
        let p = state.process(&req.id, &req.exec_id)?;
        if req.stdin {
            p.relays.lock().await.close_stdin();
        }
        Ok(api::Empty::new())
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, true).await
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.freeze(&req.id, false).await
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let state = self.inner.state.lock().await;
        state.container(&req.id)?;
        let agent = state.pod()?.agent.clone();
        drop(state);
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
        agent
            .update(&req.id, resources.value.clone())
            .await
            .map_err(|e| agent_error(&req.id, e))?;
        // Limits inside the VM only: its vCPUs and memory are fixed at boot, so
        // a limit above the VM's size is accepted but cannot be granted.
        log::info!(
            "update of {}: limits applied in the guest; the VM itself is not resized",
            req.id
        );
        Ok(api::Empty::new())
    }
}

impl TaskService {
    async fn create_in(
        &self,
        state: &mut State,
        req: &api::CreateTaskRequest,
        spec: Spec,
    ) -> TtrpcResult<u32> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let pod = state.pod()?;
        let agent = pod.agent.clone();
        // Kubernetes containers join the pause container's ipc and uts (and,
        // for shareProcessNamespace, pid) namespaces; the spec names them by
        // host paths, the agent maps them to the sandbox's guest namespaces.
        let share = pod::namespace_owner(&spec).map(str::to_string);
        if let Some(sandbox) = &share {
            if !vessel_protocol::stdio::valid_id(sandbox) || !state.containers.contains_key(sandbox)
            {
                return Err(err(
                    Code::INVALID_ARGUMENT,
                    format!("container {id}: its pod sandbox {sandbox:?} is not a container of this shim"),
                ));
            }
        }
        let rootfs_mounted = !req.rootfs.is_empty();
        let rootfs = if rootfs_mounted {
            pod::mount_rootfs(&bundle, &req.rootfs).map_err(|e| {
                pod::unmount_rootfs(&bundle);
                internal(e)
            })?;
            pod::rootfs_dir(&bundle)
        } else {
            // A bundle with a ready rootfs (ctr run --rootfs, plain OCI bundles).
            let root = spec.root().as_ref().map(|r| r.path().clone());
            bundle.join(root.unwrap_or_else(|| "rootfs".into()))
        };
        let pod_share = &pod.share;
        let cleanup = || {
            if let Err(e) = pod_share.unstage(&id) {
                log::error!("container {id}: {e}; its staging is left in place");
            }
            if rootfs_mounted {
                pod::unmount_rootfs(&bundle);
            }
        };
        let mut spec = match serde_json::to_value(&spec) {
            Ok(v) => v,
            Err(e) => {
                cleanup();
                return Err(internal(e));
            }
        };
        if let Err(e) = pod_share.stage(&id, &rootfs, &mut spec) {
            cleanup();
            return Err(internal(e));
        }
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let spec_json = match serde_json::to_vec(&spec) {
            Ok(j) => j,
            Err(e) => {
                cleanup();
                return Err(internal(e));
            }
        };
        let created = agent
            .create(vessel_runtime::container::NewContainer {
                id: &id,
                spec_json,
                storages: vec![Staging::storage()],
                stdio: stdio.wanted(),
                share_namespaces_with: share.as_deref(),
            })
            .await
            .map_err(|e| agent_error(&id, e));
        let pid = match created {
            Ok(r) => r,
            Err(e) => {
                cleanup();
                return Err(e);
            }
        };
        let mut process = Process::new(stdio.clone(), Vec::new());
        process.pid = pid;
        match stdio::attach(&agent, &id, None, &stdio).await {
            Ok(r) => process.relays = Arc::new(Mutex::new(r)),
            Err(e) => {
                let _ = agent.remove(&req.id, true).await;
                cleanup();
                return Err(internal(e));
            }
        }
        state.containers.insert(
            id.clone(),
            Container {
                bundle: req.bundle.clone(),
                rootfs_mounted,
                init: process,
                execs: HashMap::new(),
            },
        );
        Ok(pid)
    }

    async fn freeze(&self, id: &str, pause: bool) -> TtrpcResult<api::Empty> {
        let inner = &self.inner;
        let mut state = inner.state.lock().await;
        let (op, allowed): (_, fn(Status) -> bool) = if pause {
            ("pause", Status::can_pause)
        } else {
            ("resume", Status::can_resume)
        };
        let status = state.process(id, "")?.status();
        if !allowed(status) {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {id} is {status}: cannot {op}"),
            ));
        }
        let agent = state.pod()?.agent.clone();
        let res = if pause {
            agent.pause(id).await
        } else {
            agent.resume(id).await
        };
        res.map_err(|e| agent_error(id, e))?;
        state.process_mut(id, "")?.paused = pause;
        drop(state);
        if pause {
            let ev = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            inner
                .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(ev))
                .await;
        } else {
            let ev = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            inner
                .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(ev))
                .await;
        }
        Ok(api::Empty::new())
    }
}
