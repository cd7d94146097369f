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

/// An agent error as the shim returns it, with the RPC and container named.
/// The guest is not trusted: only the request-error codes the agent documents
/// pass through (a bad request stays INVALID_ARGUMENT for containerd), any
/// other code becomes INTERNAL, and the message is bounded and printable.
/// Transport failures are UNAVAILABLE.
fn rpc_error(rpc: &str, id: &str, e: ttrpc::Error) -> ttrpc::Error {
    let (code, msg) = match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg: String = s
                .message
                .chars()
                .take(MAX_MESSAGE)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let code = match s.code() {
                c @ (Code::INVALID_ARGUMENT
                | Code::FAILED_PRECONDITION
                | Code::NOT_FOUND
                | Code::ALREADY_EXISTS) => c,
                _ => Code::INTERNAL,
            };
            (code, msg)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
    }

    fn parts(e: ttrpc::Error) -> (Code, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn agent_errors_are_bounded_and_keep_only_request_codes() {
        let (code, msg) = parts(rpc_error(
            "UpdateContainer",
            "c1",
            status(Code::INVALID_ARGUMENT, "bad\nquota"),
        ));
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert_eq!(msg, "agent UpdateContainer c1: bad quota");
        let (code, _) = parts(rpc_error("CreateContainer", "c1", status(Code::OK, "x")));
        assert_eq!(code, Code::INTERNAL);
        let (code, msg) = parts(rpc_error(
            "CreateContainer",
            "c1",
            status(Code::UNAUTHENTICATED, &"y".repeat(5000)),
        ));
        assert_eq!(code, Code::INTERNAL);
        assert!(msg.len() < MAX_MESSAGE + 64, "{}", msg.len());
    }
}
