//! The agent's container RPCs and stdio streams, on [`AgentClient`].
//!
//! Every reply is validated: the guest is not trusted.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vessel_protocol::agent::*;
use vessel_protocol::ports::STDIO_VSOCK_PORT;
use vessel_protocol::stdio::{StdioHeader, StdioStream, MAX_HEADER_LEN};

use vessel_hypervisor::AgentEndpoint;

use super::{
    connect_socket, no_deadline, reply, within, AgentClient, AgentError, Result, CONNECT_TIMEOUT,
};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Shell convention: code, or 128 + signal.
    pub status: i32,
    pub signal: Option<u32>,
}

/// A container to create in a sandbox VM.
pub struct NewContainer<'a> {
    pub id: &'a str,
    /// The OCI spec, rewritten for the guest (root and mounts in guest paths).
    pub spec_json: Vec<u8>,
    /// Mounted before the container is created.
    pub storages: Vec<Storage>,
    /// stdin, stdout, stderr wanted.
    pub stdio: (bool, bool, bool),
    /// Guest id of the pod's sandbox container whose ipc, uts and pid
    /// namespaces the container joins where its spec names one (pods only).
    pub share_namespaces_with: Option<&'a str>,
}

fn rpc_err(rpc: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |source| super::rpc_error(rpc, source)
}

fn stdio_config(s: (bool, bool, bool)) -> StdioConfig {
    let mut c = StdioConfig::new();
    (c.stdin, c.stdout, c.stderr) = s;
    c
}

fn exec_key(exec_id: Option<&str>) -> String {
    exec_id.unwrap_or_default().to_string()
}

impl AgentClient {
    /// Creates the container in the guest; returns the guest pid of its init.
    pub async fn create(&self, c: NewContainer<'_>) -> Result<u32> {
        let mut req = CreateContainerRequest::new();
        req.container_id = c.id.into();
        req.spec_json = c.spec_json;
        req.storages = c.storages;
        req.stdio = Some(stdio_config(c.stdio)).into();
        req.share_namespaces_with = c.share_namespaces_with.unwrap_or_default().into();
        let r = self
            .call(
                "CreateContainer",
                self.agent.create_container(no_deadline(), &req),
            )
            .await?;
        reply::pid("CreateContainer", r.pid)
    }

    /// Applies OCI `linux.resources` JSON to the container's cgroup in the
    /// guest (the VM itself keeps its size).
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources_json = resources_json;
        self.call(
            "UpdateContainer",
            self.agent.update_container(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let mut req = ContainerRequest::new();
        req.container_id = id.into();
        self.call(
            "StartContainer",
            self.agent.start_container(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: (bool, bool, bool),
    ) -> Result<u32> {
        let mut req = ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process_json = process_json;
        req.stdio = Some(stdio_config(stdio)).into();
        let r = self
            .call("ExecProcess", self.agent.exec_process(no_deadline(), &req))
            .await?;
        reply::pid("ExecProcess", r.pid)
    }

    pub async fn signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let mut req = SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_key(exec_id);
        req.signal = signal;
        req.all = all;
        self.call(
            "SignalProcess",
            self.agent.signal_process(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    /// Blocks (no timeout) until the process exited and its output was delivered.
    pub async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus> {
        let mut req = ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_key(exec_id);
        let r = self
            .agent
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map_err(rpc_err("WaitProcess"))?;
        reply::exit_status(&r)
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = force;
        self.call(
            "RemoveContainer",
            self.agent.remove_container(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<u32>> {
        let r = self
            .call(
                "ListProcesses",
                self.agent.list_processes(no_deadline(), &container_req(id)),
            )
            .await?;
        reply::pids(r)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.call(
            "PauseContainer",
            self.agent
                .pause_container(no_deadline(), &container_req(id)),
        )
        .await?;
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.call(
            "ResumeContainer",
            self.agent
                .resume_container(no_deadline(), &container_req(id)),
        )
        .await?;
        Ok(())
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.call(
            "StatsContainer",
            self.agent
                .stats_container(no_deadline(), &container_req(id)),
        )
        .await
    }

    pub async fn resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<()> {
        let mut req = ResizeTtyRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_key(exec_id);
        req.rows = rows.into();
        req.cols = cols.into();
        self.call("ResizeTty", self.agent.resize_tty(no_deadline(), &req))
            .await?;
        Ok(())
    }

    /// Blocks until the next OOM kill in any container of the sandbox.
    pub async fn oom_event(&self) -> Result<String> {
        let r = self
            .agent
            .get_oom_event(
                ttrpc::context::Context::default(),
                &GetOOMEventRequest::new(),
            )
            .await
            .map_err(rpc_err("GetOOMEvent"))?;
        reply::oom_event(r)
    }

    /// Long-polls the agent's log records and security events (waits up to
    /// `wait` when none is pending); the reply is checked and capped
    /// ([`crate::guest_events::from_reply`]).
    pub async fn events(
        &self,
        wait: std::time::Duration,
    ) -> Result<crate::guest_events::GuestEvents> {
        let req = GetEventsRequest {
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
            ..Default::default()
        };
        // A guest that never answers holds only this loop.
        let limit = wait + std::time::Duration::from_secs(10);
        let r = within(limit, self.agent.get_events(no_deadline(), &req))
            .await
            .map_err(rpc_err("GetEvents"))?;
        crate::guest_events::from_reply(r).map_err(|reason| AgentError::BadReply {
            rpc: "GetEvents",
            reason,
        })
    }

    /// Opens one stdio stream; returns it as a blocking std socket after `OK`.
    pub async fn open_stream(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
    ) -> Result<std::os::unix::net::UnixStream> {
        open_stream(&self.endpoint, id, exec_id, stream).await
    }

    /// Where the agent's stdio streams are opened (see [`open_stream`]).
    pub fn endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }
}

/// Opens one stdio stream of a process at the agent behind `endpoint` (no
/// RPC connection needed: a front-end that relays a process's stdio itself
/// opens its streams while the process's owner holds the client); returns
/// it as a blocking std socket after `OK`.
pub async fn open_stream(
    endpoint: &AgentEndpoint,
    id: &str,
    exec_id: Option<&str>,
    stream: StdioStream,
) -> Result<std::os::unix::net::UnixStream> {
    let mut s = connect_socket(endpoint, STDIO_VSOCK_PORT, CONNECT_TIMEOUT).await?;
    let header = StdioHeader {
        container_id: id.into(),
        exec_id: exec_id.map(str::to_string),
        stream,
    };
    let what = format!(
        "{} stream of {id}/{}",
        stream.as_str(),
        exec_id.unwrap_or("init")
    );
    let io = |e: std::io::Error| AgentError::Stdio {
        what: what.clone(),
        reason: e.to_string(),
    };
    s.write_all(header.to_string().as_bytes())
        .await
        .map_err(io)?;
    let mut line = Vec::with_capacity(8);
    let read = async {
        loop {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 || line.len() >= MAX_HEADER_LEN {
                break;
            }
            line.push(b[0]);
            if b[0] == b'\n' {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .map_err(|_| AgentError::Stdio {
            what: what.clone(),
            reason: "no reply from the agent".into(),
        })?
        .map_err(io)?;
    reply::stdio_reply(&line, what.clone())?;
    let std = s.into_std().map_err(io)?;
    std.set_nonblocking(false).map_err(io)?;
    Ok(std)
}

fn container_req(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}
