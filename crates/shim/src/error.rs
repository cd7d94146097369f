//! ONE mapping of agent errors to the shim's ttrpc replies.

use ttrpc::Code;
use vessel_runtime::agent::AgentError;

/// A ttrpc status reply.
pub fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// A failure of the shim itself (not of the request or the guest).
pub fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    err(Code::INTERNAL, format!("{e:#}"))
}

/// Longest agent error message passed on (the guest is not trusted).
const MAX_MESSAGE: usize = 1024;

/// An agent RPC status as the shim returns it, with the RPC and container
/// named. The guest is not trusted: only the request-error codes the agent
/// documents pass through (a bad request stays INVALID_ARGUMENT for
/// containerd), any other code becomes INTERNAL, and the message is bounded
/// and printable. Transport failures are UNAVAILABLE.
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
    err(code, format!("agent {rpc} {id}: {msg}"))
}

/// Every failed agent call of container `id`, as the shim returns it: RPC
/// statuses through [`rpc_error`]; no connection, UNAVAILABLE; a reply or
/// stream the guest got wrong, INTERNAL.
pub fn agent_error(id: &str, e: AgentError) -> ttrpc::Error {
    let code = match e {
        AgentError::Rpc { rpc, source } => return rpc_error(rpc, id, source),
        AgentError::Connect { .. } | AgentError::Handshake(_) => Code::UNAVAILABLE,
        _ => Code::INTERNAL,
    };
    err(code, format!("agent, container {id}: {e}"))
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
        let (code, msg) = parts(agent_error(
            "c1",
            AgentError::Rpc {
                rpc: "PauseContainer",
                source: status(Code::FAILED_PRECONDITION, "not running"),
            },
        ));
        assert_eq!(code, Code::FAILED_PRECONDITION);
        assert_eq!(msg, "agent PauseContainer c1: not running");
        let (code, _) = parts(agent_error(
            "c1",
            AgentError::BadReply {
                rpc: "ExecProcess",
                reason: "pid 0".into(),
            },
        ));
        assert_eq!(code, Code::INTERNAL);
    }
}
