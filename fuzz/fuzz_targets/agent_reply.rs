//! The host's decoding of agent replies. The input is one ttrpc `Response` frame payload
//! (status + payload) as the guest sends it; the first byte picks the RPC. A non-OK status
//! goes through the runtime's status-message sanitizer; an OK payload is protobuf-decoded
//! as that RPC's reply type (as ttrpc does) and validated by `vessel_runtime::agent::reply`.
//! The readiness line and the stdio stream reply are raw lines read from the guest.
#![no_main]

use protobuf::Message;
use vessel_protocol::agent::*;
use vessel_protocol::health::{CheckResponse, VersionResponse};
use vessel_runtime::agent::reply;

fn decode<M: Message>(payload: &[u8]) -> Option<M> {
    M::parse_from_bytes(payload).ok()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 13 {
        0 => {
            let _ = reply::ready_line(rest);
            return;
        }
        1 => {
            let _ = reply::stdio_reply(rest, "stdout stream of c/init".into());
            return;
        }
        _ => {}
    }
    let Ok(resp) = ttrpc::Response::parse_from_bytes(rest) else {
        return;
    };
    if let Some(status) = resp.status.clone().into_option() {
        if status.code() != ttrpc::Code::OK {
            let e = reply::rpc_error("Fuzz", ttrpc::Error::RpcStatus(status));
            if let vessel_runtime::agent::AgentError::Rpc {
                source: vessel_runtime::agent::RpcFailure(ttrpc::Error::RpcStatus(s)),
                ..
            } = &e
            {
                assert!(s.message.chars().count() <= reply::MAX_STATUS_MESSAGE);
                assert!(!s.message.chars().any(char::is_control));
            }
            let _ = e.to_string();
            return;
        }
    }
    let p = &resp.payload;
    match which % 13 {
        2 => {
            if let Some(r) = decode::<CreateContainerResponse>(p) {
                let _ = reply::pid("CreateContainer", r.pid);
            }
        }
        3 => {
            if let Some(r) = decode::<ExecProcessResponse>(p) {
                let _ = reply::pid("ExecProcess", r.pid);
            }
        }
        4 => {
            if let Some(r) = decode::<WaitProcessResponse>(p) {
                if let Ok(st) = reply::exit_status(&r) {
                    assert!((0..=255).contains(&st.status));
                }
            }
        }
        5 => {
            if let Some(r) = decode::<ListProcessesResponse>(p) {
                let _ = reply::pids(r);
            }
        }
        6 => {
            if let Some(r) = decode::<OOMEvent>(p) {
                if let Ok(id) = reply::oom_event(r) {
                    assert!(vessel_protocol::id::valid_id(&id));
                }
            }
        }
        7 => {
            if let Some(r) = decode::<ProbeResponse>(p) {
                let _ = reply::probe(r);
            }
        }
        8 => {
            if let Some(r) = decode::<CheckResponse>(p) {
                let _ = reply::health(&r);
            }
        }
        9 => {
            if let Some(r) = decode::<VersionResponse>(p) {
                let _ = reply::version(r);
            }
        }
        10 => {
            let _ = decode::<StatsContainerResponse>(p);
        }
        11 => {
            use vessel_runtime::guest_events::{from_reply, MAX_BATCH, MAX_TEXT};
            if let Some(r) = decode::<GetEventsResponse>(p) {
                if let Ok(g) = from_reply(r) {
                    assert!(g.logs.len() <= MAX_BATCH && g.events.len() <= MAX_BATCH);
                    for l in &g.logs {
                        assert!(l.msg.chars().count() <= MAX_TEXT);
                        assert!(!l.msg.chars().any(char::is_control));
                        assert!(l.container.as_deref().is_none_or(vessel_protocol::id::valid_id));
                    }
                    for e in &g.events {
                        assert!(e.detail.chars().count() <= MAX_TEXT);
                        assert!(!e.detail.chars().any(char::is_control));
                    }
                }
            }
        }
        _ => {
            let _ = decode::<StateContainerResponse>(p);
        }
    }
});
