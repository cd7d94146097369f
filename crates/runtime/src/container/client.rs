//! Typed client of the agent's container service, and stdio stream opening.
//!
//! Every reply is validated: the guest is not trusted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::r#async::transport::Socket;
use vessel_hypervisor::AgentEndpoint;
use vessel_protocol::agent::*;
use vessel_protocol::agent_ttrpc::AgentClient as Ttrpc;
use vessel_protocol::ports::{AGENT_VSOCK_PORT, STDIO_VSOCK_PORT};
use vessel_protocol::stdio::{StdioHeader, StdioStream, MAX_HEADER_LEN, REPLY_OK};

use super::{ContainerError, Result};
use crate::agent::connect_socket;

/// Timeout for RPCs that do not block by design.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for connecting and for a stdio header reply.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most pids accepted from ListProcesses.
const MAX_PIDS: usize = 65_536;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Shell convention: code, or 128 + signal.
    pub status: i32,
    pub signal: Option<u32>,
}

/// Client of the agent's `Agent` service for one sandbox.
#[derive(Clone)]
pub struct ContainerClient {
    rpc: Ttrpc,
    uds: PathBuf,
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

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

fn rpc_err(rpc: &'static str) -> impl FnOnce(ttrpc::Error) -> ContainerError {
    move |source| ContainerError::Rpc { rpc, source }
}

fn stdio_config(s: (bool, bool, bool)) -> StdioConfig {
    let mut c = StdioConfig::new();
    (c.stdin, c.stdout, c.stderr) = s;
    c
}

fn exec_key(exec_id: Option<&str>) -> String {
    exec_id.unwrap_or_default().to_string()
}

impl ContainerClient {
    /// Connects to the agent behind the sandbox's hybrid-vsock socket.
    pub async fn connect(vsock_uds: &Path) -> Result<Self> {
        let endpoint = AgentEndpoint::HybridVsock {
            uds: vsock_uds.to_path_buf(),
        };
        let stream = connect_socket(&endpoint, AGENT_VSOCK_PORT, CONNECT_TIMEOUT).await?;
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        Ok(ContainerClient {
            rpc: Ttrpc::new(client),
            uds: vsock_uds.to_path_buf(),
        })
    }

    /// Creates the container in the guest; returns the guest pid of its init.
    pub async fn create(&self, c: NewContainer<'_>) -> Result<u32> {
        let mut req = CreateContainerRequest::new();
        req.container_id = c.id.into();
        req.spec_json = c.spec_json;
        req.storages = c.storages;
        req.stdio = Some(stdio_config(c.stdio)).into();
        req.share_namespaces_with = c.share_namespaces_with.unwrap_or_default().into();
        let r = self
            .rpc
            .create_container(ctx(), &req)
            .await
            .map_err(rpc_err("CreateContainer"))?;
        valid_pid("CreateContainer", r.pid)
    }

    /// Applies OCI `linux.resources` JSON to the container's cgroup in the
    /// guest (the VM itself keeps its size).
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources_json = resources_json;
        self.rpc
            .update_container(ctx(), &req)
            .await
            .map_err(rpc_err("UpdateContainer"))?;
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let mut req = ContainerRequest::new();
        req.container_id = id.into();
        self.rpc
            .start_container(ctx(), &req)
            .await
            .map_err(rpc_err("StartContainer"))?;
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
            .rpc
            .exec_process(ctx(), &req)
            .await
            .map_err(rpc_err("ExecProcess"))?;
        valid_pid("ExecProcess", r.pid)
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
        self.rpc
            .signal_process(ctx(), &req)
            .await
            .map_err(rpc_err("SignalProcess"))?;
        Ok(())
    }

    /// Blocks (no timeout) until the process exited and its output was delivered.
    pub async fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitStatus> {
        let mut req = ProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_key(exec_id);
        let r = self
            .rpc
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map_err(rpc_err("WaitProcess"))?;
        let bad = |reason: String| ContainerError::BadReply {
            rpc: "WaitProcess",
            reason,
        };
        if !(0..=255).contains(&r.exit_status) {
            return Err(bad(format!("exit status {} out of 0..=255", r.exit_status)));
        }
        let signal = match r.signal {
            0 => None,
            s if (1..=64).contains(&s) && r.exit_status == 128 + s as i32 => Some(s),
            s => {
                return Err(bad(format!(
                    "signal {s} with exit status {}",
                    r.exit_status
                )))
            }
        };
        Ok(ExitStatus {
            status: r.exit_status,
            signal,
        })
    }

    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = id.into();
        req.force = force;
        self.rpc
            .remove_container(ctx(), &req)
            .await
            .map_err(rpc_err("RemoveContainer"))?;
        Ok(())
    }

    pub async fn processes(&self, id: &str) -> Result<Vec<u32>> {
        let r = self
            .rpc
            .list_processes(ctx(), &container_req(id))
            .await
            .map_err(rpc_err("ListProcesses"))?;
        if r.pids.len() > MAX_PIDS {
            return Err(ContainerError::BadReply {
                rpc: "ListProcesses",
                reason: format!("{} pids", r.pids.len()),
            });
        }
        Ok(r.pids)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.rpc
            .pause_container(ctx(), &container_req(id))
            .await
            .map_err(rpc_err("PauseContainer"))?;
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.rpc
            .resume_container(ctx(), &container_req(id))
            .await
            .map_err(rpc_err("ResumeContainer"))?;
        Ok(())
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.rpc
            .stats_container(ctx(), &container_req(id))
            .await
            .map_err(rpc_err("StatsContainer"))
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
        self.rpc
            .resize_tty(ctx(), &req)
            .await
            .map_err(rpc_err("ResizeTty"))?;
        Ok(())
    }

    /// Blocks until the next OOM kill in any container of the sandbox.
    pub async fn oom_event(&self) -> Result<String> {
        let r = self
            .rpc
            .get_oom_event(
                ttrpc::context::Context::default(),
                &GetOOMEventRequest::new(),
            )
            .await
            .map_err(rpc_err("GetOOMEvent"))?;
        if !vessel_protocol::stdio::valid_id(&r.container_id) {
            return Err(ContainerError::BadReply {
                rpc: "GetOOMEvent",
                reason: "invalid container id".into(),
            });
        }
        Ok(r.container_id)
    }

    /// Opens one stdio stream; returns it as a blocking std socket after `OK`.
    pub async fn open_stream(
        &self,
        id: &str,
        exec_id: Option<&str>,
        stream: StdioStream,
    ) -> Result<std::os::unix::net::UnixStream> {
        let endpoint = AgentEndpoint::HybridVsock {
            uds: self.uds.clone(),
        };
        let mut s = connect_socket(&endpoint, STDIO_VSOCK_PORT, CONNECT_TIMEOUT).await?;
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
        let io = |e: std::io::Error| ContainerError::Stdio {
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
            .map_err(|_| ContainerError::Stdio {
                what: what.clone(),
                reason: "no reply from the agent".into(),
            })?
            .map_err(io)?;
        if line != REPLY_OK.as_bytes() {
            let text = String::from_utf8_lossy(&line);
            let text: String = text
                .trim_end()
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            return Err(ContainerError::Stdio {
                what,
                reason: format!("agent refused: {text}"),
            });
        }
        let std = s.into_std().map_err(io)?;
        std.set_nonblocking(false).map_err(io)?;
        Ok(std)
    }
}

fn container_req(id: &str) -> ContainerRequest {
    let mut r = ContainerRequest::new();
    r.container_id = id.into();
    r
}

fn valid_pid(rpc: &'static str, pid: u32) -> Result<u32> {
    if pid == 0 || pid > 4_194_304 {
        return Err(ContainerError::BadReply {
            rpc,
            reason: format!("pid {pid}"),
        });
    }
    Ok(pid)
}
