//! Test doubles for unit tests without root, QEMU or KVM: a [`FakeHypervisor`]
//! whose [`FakeVm`]s run a [`FakeAgent`] in-process, reached as a real one
//! is: hybrid vsock over a Unix socket (`CONNECT <port>` / `OK <port>`), the
//! agent's ttrpc services on port 1024, stdio streams on port 1026 and the
//! readiness line on `<uds>_1025`. Replies are scripted: processes exit when
//! signalled or when the test says so, and any RPC can be made to fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ttrpc::r#async::TtrpcContext;
use ttrpc::Code;
use vessel_hypervisor::{
    Accelerator, AgentChannel, AgentEndpoint, Capabilities, Hypervisor, Vm, VmConfig, VmExit,
};
use vessel_protocol::agent::*;
use vessel_protocol::health::check_response::ServingStatus;
use vessel_protocol::health::{CheckRequest, CheckResponse, VersionRequest, VersionResponse};
use vessel_protocol::ports::{AGENT_VSOCK_PORT, READY_MAGIC, READY_VSOCK_PORT, STDIO_VSOCK_PORT};

/// The host pid a [`FakeVm`] reports: above the kernel's PID_MAX_LIMIT, so
/// that no code under test can signal a real process with it.
pub const FAKE_VMM_PID: u32 = 4_194_305;

/// The memory usage a [`FakeAgent`] reports for every container.
pub const FAKE_MEMORY_USAGE: u64 = 42 << 20;

fn status(code: Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

#[derive(Default)]
struct AgentState {
    /// Exit status watch per (container id, exec id; "" = init).
    procs: HashMap<(String, String), watch::Sender<Option<i32>>>,
    /// RPC name (`CreateContainer`, ...) -> the status it fails with.
    failures: HashMap<String, (Code, String)>,
    calls: Vec<String>,
    /// Container id -> the container whose namespaces it was created to share.
    joined: HashMap<String, String>,
}

/// A scripted agent: see the module documentation.
#[derive(Clone, Default)]
pub struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
    next_pid: Arc<AtomicU32>,
}

impl FakeAgent {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every later call of `rpc` (e.g. `"PauseContainer"`) fail.
    pub fn fail(&self, rpc: &str, code: Code, message: &str) {
        self.lock()
            .failures
            .insert(rpc.to_string(), (code, message.to_string()));
    }

    /// The RPCs called so far, in order (`"StartContainer c1"`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The container whose namespaces container `id` was created to share.
    pub fn joined(&self, id: &str) -> Option<String> {
        self.lock().joined.get(id).cloned()
    }

    /// Makes a process exit with `status` (exec_id "" = the container's init).
    pub fn exit(&self, id: &str, exec_id: &str, status: i32) {
        if let Some(p) = self
            .lock()
            .procs
            .get(&(id.to_string(), exec_id.to_string()))
        {
            p.send_replace(Some(status));
        }
    }

    /// Records the call; fails it if scripted to.
    fn call(&self, rpc: &str, id: &str) -> ttrpc::Result<()> {
        let mut st = self.lock();
        st.calls.push(format!("{rpc} {id}"));
        match st.failures.get(rpc) {
            Some((code, msg)) => Err(status(*code, msg)),
            None => Ok(()),
        }
    }

    fn spawn(&self, id: &str, exec_id: &str) -> u32 {
        let key = (id.to_string(), exec_id.to_string());
        self.lock().procs.insert(key, watch::channel(None).0);
        100 + self.next_pid.fetch_add(1, Ordering::Relaxed)
    }

    /// Serves this agent behind the hybrid-vsock socket `uds` and announces
    /// readiness on `<uds>_1025` (when someone listens there).
    pub async fn serve(&self, uds: &Path) -> std::io::Result<FakeAgentServer> {
        let ttrpc_path = PathBuf::from(format!("{}.ttrpc", uds.display()));
        let _ = std::fs::remove_file(&ttrpc_path);
        let agent = vessel_protocol::agent_ttrpc::create_agent(Arc::new(self.clone()));
        let health = vessel_protocol::health_ttrpc::create_health(Arc::new(FakeHealth));
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", ttrpc_path.display()))
            .map_err(std::io::Error::other)?
            .register_service(health)
            .register_service(agent);
        server.start().await.map_err(std::io::Error::other)?;
        let listener = UnixListener::bind(uds)?;
        let target = ttrpc_path.clone();
        // The connections are the mux task's: aborting it (stop, drop) ends them, as a
        // VM's death does. Left running, they would keep the ttrpc server's graceful
        // shutdown waiting out its 5 s connection timeout.
        let mux = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((conn, _)) => {
                            connections.spawn(hybrid_vsock(conn, target.clone()));
                        }
                        Err(_) => break,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        let mut ready = std::ffi::OsString::from(uds.as_os_str());
        ready.push(format!("_{READY_VSOCK_PORT}"));
        if let Ok(mut s) = UnixStream::connect(&ready).await {
            let _ = s
                .write_all(format!("{READY_MAGIC} fake\n").as_bytes())
                .await;
        }
        Ok(FakeAgentServer {
            server: Some(server),
            mux,
            paths: vec![uds.to_path_buf(), ttrpc_path],
        })
    }
}

/// One guest-side connection: the hybrid-vsock handshake, then the agent's
/// ttrpc service (proxied) or an empty stdio stream.
async fn hybrid_vsock(conn: UnixStream, ttrpc_path: PathBuf) {
    let mut conn = BufReader::new(conn);
    let mut line = String::new();
    if conn.read_line(&mut line).await.is_err() {
        return;
    }
    let Some(port) = line
        .trim()
        .strip_prefix("CONNECT ")
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return;
    };
    if conn
        .get_mut()
        .write_all(format!("OK {port}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    match port {
        AGENT_VSOCK_PORT => {
            if let Ok(mut api) = UnixStream::connect(&ttrpc_path).await {
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut api).await;
            }
        }
        STDIO_VSOCK_PORT => {
            // Accept the stream header; the process writes nothing (EOF).
            line.clear();
            if conn.read_line(&mut line).await.is_ok() {
                let _ = conn
                    .get_mut()
                    .write_all(vessel_protocol::stdio::REPLY_OK.as_bytes())
                    .await;
            }
        }
        _ => {}
    }
}

/// A running [`FakeAgent`] server; stops when dropped.
pub struct FakeAgentServer {
    server: Option<ttrpc::r#async::Server>,
    mux: JoinHandle<()>,
    paths: Vec<PathBuf>,
}

impl FakeAgentServer {
    /// Stops serving: connections end, as when a VM dies.
    pub async fn stop(&mut self) {
        self.mux.abort();
        if let Some(mut s) = self.server.take() {
            let _ = s.shutdown().await;
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for FakeAgentServer {
    fn drop(&mut self) {
        self.mux.abort();
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct FakeHealth;

#[async_trait]
impl vessel_protocol::health_ttrpc::Health for FakeHealth {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(&self, _: &TtrpcContext, _: VersionRequest) -> ttrpc::Result<VersionResponse> {
        Ok(VersionResponse {
            agent_version: "fake".into(),
            protocol_version: vessel_protocol::PROTOCOL_VERSION,
            kernel_release: "fake".into(),
            boot_id: "fake-boot-id".into(),
            ..Default::default()
        })
    }
}

#[async_trait]
impl vessel_protocol::agent_ttrpc::Agent for FakeAgent {
    async fn create_container(
        &self,
        _: &TtrpcContext,
        r: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        self.call("CreateContainer", &r.container_id)?;
        if !r.share_namespaces_with.is_empty() {
            let owner = r.share_namespaces_with.clone();
            self.lock().joined.insert(r.container_id.clone(), owner);
        }
        Ok(CreateContainerResponse {
            pid: self.spawn(&r.container_id, ""),
            ..Default::default()
        })
    }

    async fn start_container(&self, _: &TtrpcContext, r: ContainerRequest) -> ttrpc::Result<Empty> {
        self.call("StartContainer", &r.container_id)?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        r: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        self.call("ExecProcess", &r.container_id)?;
        Ok(ExecProcessResponse {
            pid: self.spawn(&r.container_id, &r.exec_id),
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        r: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.call("SignalProcess", &r.container_id)?;
        self.exit(&r.container_id, &r.exec_id, 128 + r.signal as i32);
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        r: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.call("WaitProcess", &r.container_id)?;
        let key = (r.container_id.clone(), r.exec_id.clone());
        let mut rx = match self.lock().procs.get(&key) {
            Some(p) => p.subscribe(),
            None => return Err(status(Code::NOT_FOUND, "no such process")),
        };
        let code = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| status(Code::NOT_FOUND, "process removed"))?
            .unwrap_or_default();
        Ok(WaitProcessResponse {
            exit_status: code,
            signal: if code > 128 { (code - 128) as u32 } else { 0 },
            ..Default::default()
        })
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        r: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.call("RemoveContainer", &r.container_id)?;
        self.lock().procs.retain(|(id, _), _| *id != r.container_id);
        Ok(Empty::new())
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        self.call("ListProcesses", &r.container_id)?;
        Ok(ListProcessesResponse {
            pids: vec![1],
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.call("StatsContainer", &r.container_id)?;
        Ok(StatsContainerResponse {
            memory: Some(MemoryStats {
                usage_bytes: FAKE_MEMORY_USAGE,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    async fn pause_container(&self, _: &TtrpcContext, r: ContainerRequest) -> ttrpc::Result<Empty> {
        self.call("PauseContainer", &r.container_id)?;
        Ok(Empty::new())
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        r: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.call("ResumeContainer", &r.container_id)?;
        Ok(Empty::new())
    }

    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        std::future::pending().await
    }

    /// Decodes the policy as the real agent does; it is not enforced (not
    /// recorded in the calls either: every sandbox start sends one).
    async fn set_policy(&self, _: &TtrpcContext, r: SetPolicyRequest) -> ttrpc::Result<Empty> {
        vessel_protocol::policy::Policy::from_json(&r.policy_json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, &e.to_string()))?;
        if let Some((code, msg)) = self.lock().failures.get("SetPolicy") {
            return Err(status(*code, msg));
        }
        Ok(Empty::new())
    }
}

struct VmState {
    exit: watch::Sender<Option<VmExit>>,
    agent: tokio::sync::Mutex<Option<FakeAgentServer>>,
}

/// A VM of a [`FakeHypervisor`]: its agent runs in this process.
pub struct FakeVm {
    uds: PathBuf,
    state: Arc<VmState>,
}

impl FakeVm {
    async fn end(state: &VmState, exit: VmExit) {
        if let Some(mut a) = state.agent.lock().await.take() {
            a.stop().await;
        }
        state
            .exit
            .send_if_modified(|e| e.is_none() && e.replace(exit).is_none());
    }
}

#[async_trait]
impl Vm for FakeVm {
    fn agent_endpoint(&self) -> AgentEndpoint {
        AgentEndpoint::HybridVsock {
            uds: self.uds.clone(),
        }
    }

    fn accelerator(&self) -> Accelerator {
        Accelerator::Tcg
    }

    fn pids(&self) -> Vec<u32> {
        vec![FAKE_VMM_PID]
    }

    async fn wait(&self) -> VmExit {
        let mut rx = self.state.exit.subscribe();
        let exit = rx.wait_for(Option::is_some).await;
        exit.ok().and_then(|e| e.clone()).unwrap_or(VmExit {
            code: None,
            signal: None,
        })
    }

    fn try_exit(&self) -> Option<VmExit> {
        self.state.exit.borrow().clone()
    }

    fn diagnostics(&self) -> String {
        "fake VM".into()
    }

    async fn pause(&self) -> vessel_hypervisor::Result<()> {
        Ok(())
    }

    async fn resume(&self) -> vessel_hypervisor::Result<()> {
        Ok(())
    }

    async fn stop(&self, _grace: Duration) -> vessel_hypervisor::Result<VmExit> {
        let exit = VmExit {
            code: Some(0),
            signal: None,
        };
        Self::end(&self.state, exit.clone()).await;
        Ok(self.try_exit().unwrap_or(exit))
    }
}

/// A hypervisor whose VMs are [`FakeVm`]s sharing one [`FakeAgent`]. Clones
/// share their agent and VMs (hand one to the code under test, script the other).
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    pub agent: FakeAgent,
    launched: Arc<Mutex<Vec<Launched>>>,
}

/// A launched VM: its configuration and its state.
type Launched = (VmConfig, Arc<VmState>);

impl FakeHypervisor {
    /// The configurations of the VMs launched so far.
    pub fn launched(&self) -> Vec<VmConfig> {
        let l = self.launched.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Kills every VM launched so far, as a crashed hypervisor would end.
    pub async fn kill_all(&self) {
        let vms: Vec<Arc<VmState>> = {
            let l = self.launched.lock().unwrap_or_else(|e| e.into_inner());
            l.iter().map(|(_, s)| s.clone()).collect()
        };
        for s in vms {
            let exit = VmExit {
                code: None,
                signal: Some(9),
            };
            FakeVm::end(&s, exit).await;
        }
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            accelerator: Accelerator::Tcg,
            channels: vec![AgentChannel::Vsock],
            pause_resume: true,
            shared_dirs: true,
            snapshot: false,
        }
    }

    async fn launch(&self, config: &VmConfig) -> vessel_hypervisor::Result<Box<dyn Vm>> {
        let server = self.agent.serve(&config.vsock_uds).await.map_err(|e| {
            vessel_hypervisor::Error::Io {
                what: "fake agent".into(),
                source: e,
            }
        })?;
        let state = Arc::new(VmState {
            exit: watch::channel(None).0,
            agent: tokio::sync::Mutex::new(Some(server)),
        });
        self.launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((config.clone(), state.clone()));
        Ok(Box::new(FakeVm {
            uds: config.vsock_uds.clone(),
            state,
        }))
    }
}
