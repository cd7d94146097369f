//! The shim's one mapping of pod and agent errors to ttrpc replies (no
//! root, no VM).

use containerd_shim_vessel_v2::error::pod_error;
use ttrpc::Code;
use vessel_runtime::agent::AgentError;
use vessel_runtime::pod::PodError;

fn parts(e: ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
        other => panic!("{other:?}"),
    }
}

fn rpc(code: Code) -> PodError {
    let source = ttrpc::Error::RpcStatus(ttrpc::get_status(code, "bad quota".to_string()));
    PodError::Agent(AgentError::Rpc {
        rpc: "UpdateContainer",
        source: source.into(),
    })
}

#[test]
fn one_mapping_of_pod_and_agent_errors() {
    let (code, msg) = parts(pod_error("c1", rpc(Code::INVALID_ARGUMENT)));
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::INVALID_ARGUMENT,
            "agent UpdateContainer c1: bad quota"
        )
    );
    for (from, to) in [
        (Code::OK, Code::INTERNAL),
        (Code::UNAUTHENTICATED, Code::INTERNAL),
        (Code::NOT_FOUND, Code::NOT_FOUND),
        (Code::PERMISSION_DENIED, Code::PERMISSION_DENIED),
    ] {
        assert_eq!(parts(pod_error("c1", rpc(from))).0, to);
    }
    let bad_reply = AgentError::BadReply {
        rpc: "ExecProcess",
        reason: "pid 0".into(),
    };
    assert_eq!(
        parts(pod_error("c1", PodError::Agent(bad_reply))).0,
        Code::INTERNAL
    );
    let status = vessel_runtime::container::Status::Created;
    let wrong = PodError::WrongState {
        what: "container c1".into(),
        status,
        op: "pause",
    };
    let (code, msg) = parts(pod_error("c1", wrong));
    assert_eq!(
        (code, msg.as_str()),
        (
            Code::FAILED_PRECONDITION,
            "container c1 is created: cannot pause"
        )
    );
    assert_eq!(
        parts(pod_error("c1", PodError::NotFound("c1".into()))).0,
        Code::NOT_FOUND
    );
    assert_eq!(
        parts(pod_error("c1", PodError::Exists("c1".into()))).0,
        Code::ALREADY_EXISTS
    );
}
