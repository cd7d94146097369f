//! The Agent ttrpc service: parses requests, calls [`Containers`], maps errors
//! to ttrpc status codes.

use std::sync::Arc;

use async_trait::async_trait;
use libcontainer::container::ContainerStatus;
use tokio::sync::{mpsc, Mutex};
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;
use vessel_protocol::agent::{
    state_container_response::Status, ContainerRequest, CreateContainerRequest,
    CreateContainerResponse, Empty, ExecProcessRequest, ExecProcessResponse, GetEventsRequest,
    GetEventsResponse, GetOOMEventRequest, GuestMetricsRequest, GuestMetricsResponse,
    ListProcessesResponse, OOMEvent, ProbeRequest, ProbeResponse, ProcessRequest,
    RemoveContainerRequest, ReseedRandomRequest, ResizeTtyRequest, SetNetworkRequest,
    SetPolicyRequest, SetTimeRequest, SignalProcessRequest, StateContainerResponse,
    StatsContainerResponse, UpdateContainerRequest, WaitProcessResponse,
};
use vessel_protocol::agent_ttrpc::Agent;
use vessel_protocol::error::chain;
use vessel_protocol::policy::{Denied, Policy, Rpc};
use vessel_protocol::request;

use crate::container::{cgroup, set_winsize, ContainerError, Containers};

pub struct AgentService {
    containers: Arc<Containers>,
    oom: Mutex<mpsc::Receiver<String>>,
    policy: std::sync::Mutex<PolicyState>,
}

/// The agent policy in force, and whether `SetPolicy` may still replace it.
#[derive(Default)]
struct PolicyState {
    policy: Arc<Policy>,
    /// A policy was set, or a container was created: `SetPolicy` is denied.
    settled: bool,
}

impl AgentService {
    pub fn new(containers: Arc<Containers>, oom: mpsc::Receiver<String>) -> Self {
        AgentService {
            containers,
            oom: Mutex::new(oom),
            policy: std::sync::Mutex::new(PolicyState::default()),
        }
    }

    fn policy_state(&self) -> std::sync::MutexGuard<'_, PolicyState> {
        self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy_state().policy.clone()
    }

    /// Whether the policy serves `rpc` (no field rules).
    fn allow(&self, rpc: Rpc) -> ttrpc::Result<()> {
        self.policy().check_rpc(rpc).map_err(denied)
    }
}

impl PolicyState {
    /// Sets the policy: once, before the first container.
    fn set(&mut self, json: &[u8]) -> ttrpc::Result<()> {
        let policy = Policy::from_json(json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, chain(&e).to_string()))?;
        if self.settled {
            return Err(denied(Denied(
                "SetPolicy (a policy is set once, before the first container; this \
                 sandbox's is set)"
                    .into(),
            )));
        }
        log::info!(
            "agent policy set: {}",
            String::from_utf8_lossy(&policy.to_json())
        );
        self.policy = Arc::new(policy);
        self.settled = true;
        Ok(())
    }

    /// The policy a CreateContainer is checked against; from now on SetPolicy
    /// is denied.
    fn settle(&mut self) -> Arc<Policy> {
        self.settled = true;
        self.policy.clone()
    }
}

/// A request the policy denies, as the host sees it.
fn denied(d: Denied) -> ttrpc::Error {
    let msg = d.to_string();
    log::warn!("{msg}");
    status(Code::PERMISSION_DENIED, msg)
}

fn status(code: Code, msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// A request that fails [`vessel_protocol::request`]'s checks.
fn invalid(e: vessel_protocol::request::RequestError) -> ttrpc::Error {
    log::info!("request refused: {e}");
    status(Code::INVALID_ARGUMENT, e.to_string())
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        use ContainerError::*;
        let code = match &e {
            InvalidId(_) | NoSandbox(_) | Spec(_) | ProcessJson(_) | BadSignal(_) => {
                Code::INVALID_ARGUMENT
            }
            Exists(_) | ExecExists(..) => Code::ALREADY_EXISTS,
            NotFound(_) | ProcessNotFound(..) => Code::NOT_FOUND,
            State(..) | NoTerminal(..) => Code::FAILED_PRECONDITION,
            Resources(_, crate::container::resources::ResourcesError::Write { .. }) => {
                Code::INTERNAL
            }
            Resources(..) => Code::INVALID_ARGUMENT,
            Storage(_) | Failed(_) | Io(..) => Code::INTERNAL,
            Denied(_) => Code::PERMISSION_DENIED,
        };
        let msg = chain(&e).to_string();
        log::info!("request failed: {msg}");
        status(code, msg)
    }
}

nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

#[async_trait]
impl Agent for AgentService {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        log::info!(
            "create container {} (sharing namespaces with {:?})",
            req.container_id,
            req.share_namespaces_with
        );
        // The first container settles the policy: no SetPolicy after it.
        let policy = self.policy_state().settle();
        policy
            .check_create(
                &req.spec_json,
                req.storages.iter().map(|s| s.fstype.as_str()),
                self.containers.count(),
            )
            .map_err(denied)?;
        request::create(&req).map_err(invalid)?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let sandbox = Some(req.share_namespaces_with.as_str()).filter(|s| !s.is_empty());
        let pid = self
            .containers
            .create(
                &req.container_id,
                &req.spec_json,
                &req.storages,
                &stdio,
                sandbox,
                &policy,
            )
            .await?;
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::StartContainer)?;
        log::info!("start container {}", req.container_id);
        self.containers.start(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        log::info!("exec {} in container {}", req.exec_id, req.container_id);
        self.policy()
            .check_exec(&req.process_json)
            .map_err(denied)?;
        request::exec(&req).map_err(invalid)?;
        let stdio = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json, &stdio)
            .await?;
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::SignalProcess)?;
        log::info!(
            "signal {} to {}/{:?} (all: {})",
            req.signal,
            req.container_id,
            req.exec_id,
            req.all
        );
        request::signal(&req).map_err(invalid)?;
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.allow(Rpc::WaitProcess)?;
        let process = self
            .containers
            .process(&req.container_id, Some(&req.exec_id))?;
        let st = process.wait().await?;
        Ok(WaitProcessResponse {
            exit_status: st.code,
            signal: st.signal.unwrap_or(0) as u32,
            core_dumped: st.core_dumped,
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::RemoveContainer)?;
        log::info!(
            "remove container {} (force: {})",
            req.container_id,
            req.force
        );
        self.containers.remove(&req.container_id, req.force).await?;
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        self.allow(Rpc::ListProcesses)?;
        self.containers.process(&req.container_id, None)?;
        Ok(ListProcessesResponse {
            pids: cgroup::pids(&req.container_id),
            ..Default::default()
        })
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::PauseContainer)?;
        self.containers.pause(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::ResumeContainer)?;
        self.containers.resume(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        self.allow(Rpc::CloseStdin)?;
        let process = self
            .containers
            .process(&req.container_id, Some(&req.exec_id))?;
        process.io.close_stdin();
        Ok(Empty::new())
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        self.allow(Rpc::ResizeTty)?;
        let process = self
            .containers
            .process(&req.container_id, Some(&req.exec_id))?;
        let master = process.io.tty_master().ok_or_else(|| {
            ContainerError::NoTerminal(req.exec_id.clone(), req.container_id.clone())
        })?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        set_winsize(master, clamp(req.rows), clamp(req.cols))
            .map_err(|e| status(Code::INTERNAL, format!("resize tty: {e}")))?;
        Ok(Empty::new())
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::UpdateContainer)?;
        log::info!("update container {}", req.container_id);
        self.containers
            .update(&req.container_id, &req.resources_json)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.allow(Rpc::StatsContainer)?;
        self.containers.process(&req.container_id, None)?;
        Ok(cgroup::stats(&req.container_id))
    }

    async fn state_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StateContainerResponse> {
        self.allow(Rpc::StateContainer)?;
        let (st, pid) = self.containers.state(&req.container_id).await?;
        let status = match st {
            ContainerStatus::Creating | ContainerStatus::Created => Status::CREATED,
            ContainerStatus::Running => Status::RUNNING,
            ContainerStatus::Paused => Status::PAUSED,
            ContainerStatus::Stopped => Status::STOPPED,
        };
        Ok(StateContainerResponse {
            status: status.into(),
            pid: if st == ContainerStatus::Stopped {
                0
            } else {
                pid as u32
            },
            ..Default::default()
        })
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        self.allow(Rpc::GetOomEvent)?;
        let id = self.oom.lock().await.recv().await;
        let id = id.ok_or_else(|| status(Code::UNAVAILABLE, "OOM watcher stopped".into()))?;
        Ok(OOMEvent {
            container_id: id,
            ..Default::default()
        })
    }

    async fn get_events(
        &self,
        _: &TtrpcContext,
        req: GetEventsRequest,
    ) -> ttrpc::Result<GetEventsResponse> {
        self.allow(Rpc::GetEvents)?;
        let wait = std::time::Duration::from_millis(req.wait_ms.into());
        Ok(crate::journal::get().fetch(wait).await)
    }

    async fn set_time(&self, _: &TtrpcContext, req: SetTimeRequest) -> ttrpc::Result<Empty> {
        self.allow(Rpc::SetTime)?;
        request::set_time(&req).map_err(invalid)?;
        let ts = nix::sys::time::TimeSpec::new(req.seconds, req.nanos as i64);
        nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| status(Code::INTERNAL, format!("set clock: {e}")))?;
        Ok(Empty::new())
    }

    async fn reseed_random(
        &self,
        _: &TtrpcContext,
        req: ReseedRandomRequest,
    ) -> ttrpc::Result<Empty> {
        self.allow(Rpc::ReseedRandom)?;
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let seed = request::seed(&req);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .map_err(|e| status(Code::INTERNAL, format!("open /dev/urandom: {e}")))?;
        f.write_all(seed)
            .map_err(|e| status(Code::INTERNAL, format!("write /dev/urandom: {e}")))?;
        // SAFETY: RNDRESEEDCRNG takes no argument; it needs CAP_SYS_ADMIN and
        // fails cleanly without it.
        if let Err(e) = unsafe { rnd_reseed_crng(f.as_raw_fd()) } {
            log::warn!("RNDRESEEDCRNG: {e}");
        }
        Ok(Empty::new())
    }

    async fn set_network(&self, _: &TtrpcContext, req: SetNetworkRequest) -> ttrpc::Result<Empty> {
        self.allow(Rpc::SetNetwork)?;
        let net = vessel_protocol::net::Network::from_request(&req)
            .map_err(|e| status(Code::INVALID_ARGUMENT, chain(&e).to_string()))?;
        // Standalone (development) agents run in the host's namespace.
        if std::process::id() != 1 {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "SetNetwork configures a VM's network; this agent is not PID 1 of a VM".into(),
            ));
        }
        let handle =
            crate::network::connect().map_err(|e| status(Code::INTERNAL, chain(&e).to_string()))?;
        crate::network::apply(&handle, &net).await.map_err(|e| {
            let msg = chain(&e).to_string();
            log::warn!("SetNetwork failed: {msg}");
            status(Code::INTERNAL, msg)
        })?;
        log::info!(
            "network: {} interfaces, {} routes, {} neighbours",
            net.interfaces.len(),
            net.routes.len(),
            net.neighbours.len()
        );
        Ok(Empty::new())
    }

    async fn set_policy(&self, _: &TtrpcContext, req: SetPolicyRequest) -> ttrpc::Result<Empty> {
        self.policy_state().set(&req.policy_json)?;
        Ok(Empty::new())
    }

    async fn guest_metrics(
        &self,
        _: &TtrpcContext,
        _: GuestMetricsRequest,
    ) -> ttrpc::Result<GuestMetricsResponse> {
        self.allow(Rpc::GuestMetrics)?;
        Ok(crate::metrics::collect())
    }

    async fn probe(&self, _: &TtrpcContext, _: ProbeRequest) -> ttrpc::Result<ProbeResponse> {
        use std::io::Read;
        self.allow(Rpc::Probe)?;
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
            .map_err(|e| status(Code::INTERNAL, format!("read clock: {e}")))?;
        let mut sample = vec![0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut sample))
            .map_err(|e| status(Code::INTERNAL, format!("read /dev/urandom: {e}")))?;
        Ok(ProbeResponse {
            realtime_seconds: now.tv_sec(),
            realtime_nanos: now.tv_nsec() as u32,
            random_sample: sample,
            boot_id: crate::health::read_trimmed("/proc/sys/kernel/random/boot_id"),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{resources::ResourcesError, spec::SpecError, storage::StorageError};
    use vessel_testutil::assert_cause_printed_once;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    fn json() -> serde_json::Error {
        serde_json::from_str::<serde_json::Value>("{").unwrap_err()
    }

    fn code_and_message(e: ttrpc::Error) -> (Code, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn policy_is_set_once_before_the_first_container() {
        let exec_off = br#"{"version": 1, "exec": false}"#;
        // Set once; the second attempt is denied and changes nothing.
        let mut st = PolicyState::default();
        assert_eq!(*st.policy, Policy::default());
        st.set(exec_off).unwrap();
        assert!(!st.policy.exec);
        let (code, msg) = code_and_message(st.set(br#"{"version": 1}"#).unwrap_err());
        assert_eq!(code, Code::PERMISSION_DENIED);
        assert!(
            msg.starts_with("SetPolicy (a policy is set once")
                && msg.ends_with("denied by the sandbox's agent policy"),
            "{msg}"
        );
        assert!(!st.policy.exec);
        // A container settles the default policy.
        let mut st = PolicyState::default();
        assert_eq!(*st.settle(), Policy::default());
        let (code, _) = code_and_message(st.set(exec_off).unwrap_err());
        assert_eq!(code, Code::PERMISSION_DENIED);
        // A bad policy is a bad request, and leaves SetPolicy open.
        let mut st = PolicyState::default();
        let (code, msg) = code_and_message(st.set(br#"{"version": 1, "exc": 1}"#).unwrap_err());
        assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
        st.set(exec_off).unwrap();
    }

    #[test]
    fn a_denied_request_is_permission_denied_naming_it() {
        let p: Policy = Policy::from_json(br#"{"version": 1, "exec": false}"#).unwrap();
        let e = p.check_exec(br#"{"args": ["/bin/sh"]}"#).map_err(denied);
        let (code, msg) = code_and_message(e.unwrap_err());
        assert_eq!(code, Code::PERMISSION_DENIED);
        assert_eq!(msg, "ExecProcess denied by the sandbox's agent policy");
    }

    /// Every agent error that wraps a source prints it once, and so does the
    /// reply the host gets.
    #[test]
    fn errors_print_their_cause_once() {
        let storage = || StorageError::Mount {
            fstype: "virtiofs".into(),
            tag: "vessel".into(),
            target: "/run/vessel/shared".into(),
            err: nix::Error::EBUSY,
        };
        let write = || ResourcesError::Write {
            path: "/sys/fs/cgroup/c1/memory.max".into(),
            value: "1".into(),
            source: io(),
        };
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(ContainerError::Spec(SpecError::Json(json()))),
            Box::new(ContainerError::ProcessJson(json())),
            Box::new(ContainerError::Storage(storage())),
            Box::new(ContainerError::Storage(StorageError::CreateDir(
                "/m".into(),
                io(),
            ))),
            Box::new(ContainerError::Resources("c1".into(), write())),
            Box::new(ContainerError::Resources(
                "c1".into(),
                ResourcesError::Json(json()),
            )),
            Box::new(ContainerError::Io("open /x".into(), io())),
            Box::new(crate::network::NetError::Socket(io())),
        ];
        for e in &errors {
            assert_cause_printed_once(e.as_ref());
        }
        let reply = ttrpc::Error::from(ContainerError::Resources("c1".into(), write()));
        match reply {
            ttrpc::Error::RpcStatus(s) => assert_eq!(
                s.message,
                "container c1: resources: write \"1\" to /sys/fs/cgroup/c1/memory.max: \
                 entity not found"
            ),
            other => panic!("{other:?}"),
        }
    }
}
