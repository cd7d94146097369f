//! Agent errors of the calls whose status codes containerd acts on (creating
//! a container, updating its limits), mapped for the shim's replies.

use ttrpc::Code;
use vessel_runtime::container::ContainerError;

/// Longest agent error message passed on (the guest is not trusted).
const MAX_MESSAGE: usize = 1024;

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

/// A failed agent call of `ContainerClient` as the shim returns it: RPC
/// errors through [`rpc_error`], anything else (a transport or reply problem)
/// INTERNAL.
pub fn agent_error(rpc: &str, id: &str, e: ContainerError) -> ttrpc::Error {
    match e {
        ContainerError::Rpc { source, .. } => rpc_error(rpc, id, source),
        other => crate::service::err(Code::INTERNAL, format!("agent {rpc} {id}: {other}")),
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
