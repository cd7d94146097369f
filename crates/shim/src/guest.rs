//! Agent RPCs only the shim uses: creating a container that joins the pod
//! sandbox's namespaces, and updating a container's resource limits.
//!
//! They travel on a second ttrpc connection to the agent (the agent serves any
//! number); everything else goes through `vessel_runtime`'s `ContainerClient`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ttrpc::r#async::transport::Socket;
use ttrpc::Code;
use vessel_hypervisor::AgentEndpoint;
use vessel_protocol::agent::{
    CreateContainerRequest, StdioConfig, Storage, UpdateContainerRequest,
};
use vessel_protocol::agent_ttrpc::AgentClient;
use vessel_protocol::ports::AGENT_VSOCK_PORT;

/// Timeout of one RPC (creation runs libcontainer in the guest).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest pid a Linux guest can hand out (PID_MAX_LIMIT).
const MAX_PID: u32 = 4_194_304;
/// Longest agent error message passed on (the guest is not trusted).
const MAX_MESSAGE: usize = 1024;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
}

/// An agent error as the shim returns it: the agent's status code (the agent
/// says INVALID_ARGUMENT for a bad request), its message bounded, with the
/// RPC and container named; transport failures are UNAVAILABLE.
fn rpc_error(rpc: &str, id: &str, e: ttrpc::Error) -> ttrpc::Error {
    let (code, msg) = match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg: String = s.message.chars().take(MAX_MESSAGE).collect();
            (s.code(), msg)
        }
        other => (Code::UNAVAILABLE, other.to_string()),
    };
    crate::service::err(code, format!("agent {rpc} {id}: {msg}"))
}

#[derive(Clone)]
pub struct GuestAgent {
    rpc: AgentClient,
}

/// A container to create in the pod's VM.
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub spec_json: Vec<u8>,
    pub storages: Vec<Storage>,
    /// stdin, stdout, stderr wanted.
    pub stdio: (bool, bool, bool),
    /// Guest id of the pod's sandbox container whose ipc, uts and pid
    /// namespaces the container joins where its spec names one.
    pub share_namespaces_with: Option<&'a str>,
}

impl GuestAgent {
    /// Opens a ttrpc connection to the agent behind the hybrid-vsock socket.
    pub async fn connect(vsock_uds: &Path) -> anyhow::Result<Self> {
        let endpoint = AgentEndpoint::HybridVsock {
            uds: vsock_uds.to_path_buf(),
        };
        let stream =
            vessel_runtime::agent::connect_socket(&endpoint, AGENT_VSOCK_PORT, CONNECT_TIMEOUT)
                .await
                .context("connect to the agent")?;
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        Ok(GuestAgent {
            rpc: AgentClient::new(client),
        })
    }

    /// Creates the container; returns the guest pid of its init process.
    pub async fn create(&self, c: NewContainer<'_>) -> ttrpc::Result<u32> {
        let (stdin, stdout, stderr) = c.stdio;
        let req = CreateContainerRequest {
            container_id: c.id.into(),
            spec_json: c.spec_json,
            storages: c.storages,
            stdio: Some(StdioConfig {
                stdin,
                stdout,
                stderr,
                ..Default::default()
            })
            .into(),
            share_namespaces_with: c.share_namespaces_with.unwrap_or_default().into(),
            ..Default::default()
        };
        let r = self
            .rpc
            .create_container(ctx(), &req)
            .await
            .map_err(|e| rpc_error("CreateContainer", c.id, e))?;
        // Untrusted reply.
        if r.pid == 0 || r.pid > MAX_PID {
            return Err(crate::service::err(
                Code::INTERNAL,
                format!("agent CreateContainer {}: invalid pid {}", c.id, r.pid),
            ));
        }
        Ok(r.pid)
    }

    /// Applies OCI `linux.resources` JSON to the container's cgroup.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> ttrpc::Result<()> {
        let req = UpdateContainerRequest {
            container_id: id.into(),
            resources_json,
            ..Default::default()
        };
        self.rpc
            .update_container(ctx(), &req)
            .await
            .map_err(|e| rpc_error("UpdateContainer", id, e))?;
        Ok(())
    }
}
