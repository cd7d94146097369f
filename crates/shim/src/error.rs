//! ONE mapping of the pod model's errors (agent errors included) to the
//! shim's ttrpc replies.

use ttrpc::Code;
use vessel_runtime::agent::AgentError;
use vessel_runtime::pod::PodError;

/// A ttrpc status reply.
pub fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A failure of the shim itself (not of the request or the guest).
pub fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    err(Code::INTERNAL, format!("{e:#}"))
}

/// An agent RPC failure as the shim returns it, with the RPC and container
/// named: only the request-error codes the agent documents pass through (a
/// bad request stays INVALID_ARGUMENT for containerd, a request the agent
/// policy denies PERMISSION_DENIED), any other code becomes
/// INTERNAL (the runtime bounded the guest's message); a transport failure is
/// UNAVAILABLE.
fn rpc_error(rpc: &str, id: &str, e: ttrpc::Error) -> ttrpc::Error {
    let (code, msg) = match e {
        ttrpc::Error::RpcStatus(s) => match s.code() {
            c @ (Code::INVALID_ARGUMENT
            | Code::FAILED_PRECONDITION
            | Code::NOT_FOUND
            | Code::ALREADY_EXISTS
            | Code::PERMISSION_DENIED) => (c, s.message),
            _ => (Code::INTERNAL, s.message),
        },
        other => (Code::UNAVAILABLE, other.to_string()),
    };
    err(code, format!("agent {rpc} {id}: {msg}"))
}

/// Every failed pod operation on container `id`, as the shim returns it.
/// Agent RPC statuses go through [`rpc_error`]; no connection to the agent
/// is UNAVAILABLE; a reply or stream the guest got wrong is INTERNAL.
pub fn pod_error(id: &str, e: PodError) -> ttrpc::Error {
    let code = match e {
        PodError::Agent(AgentError::Rpc { rpc, source }) => return rpc_error(rpc, id, source.0),
        PodError::Agent(AgentError::Connect { .. } | AgentError::Handshake(_)) => Code::UNAVAILABLE,
        PodError::NotFound(_) | PodError::ExecNotFound { .. } => Code::NOT_FOUND,
        PodError::Exists(_) => Code::ALREADY_EXISTS,
        PodError::Invalid(_) => Code::INVALID_ARGUMENT,
        PodError::WrongState { .. } | PodError::VmExited(_) => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
    };
    err(code, format!("{:#}", anyhow::Error::new(e)))
}
