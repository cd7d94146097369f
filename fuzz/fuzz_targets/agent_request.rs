//! The agent's request handling before it acts. The input is a ttrpc `Request` (service,
//! method, payload) as the agent's server receives it; the payload is protobuf-decoded as
//! that method's request type (what the generated server code does) and put through the
//! checks the agent's service runs first (`vessel_protocol::request`: ids, storage mount
//! points and count, signal target, time, entropy size; `net::Network::from_request` for
//! SetNetwork), after the agent policy's decision (`vessel_protocol::policy`: the default
//! policy and one with every field rule, so the spec and process JSON are read);
//! SetPolicy's JSON is parsed as the agent parses it. A first byte of 0 instead feeds the
//! rest to the stdio stream header parser (the line that opens a process stdio stream).
//! Nothing here touches the host.
#![no_main]

use protobuf::Message;
use vessel_protocol::agent::*;
use vessel_protocol::health::{CheckRequest, VersionRequest};
use vessel_protocol::policy::Policy;
use vessel_protocol::{id, net, request};

/// A policy with every field rule set, so that its checks read the request's JSON.
fn strict() -> &'static Policy {
    static P: std::sync::OnceLock<Policy> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        Policy::from_json(
            br#"{"version":1,"exec":true,"max_containers":4,
                "allowed_capabilities":["CAP_CHOWN","CAP_KILL"],
                "allowed_mount_types":["bind","proc","tmpfs"],
                "allowed_bind_sources":["/run/vessel/shared"],
                "allowed_storage_fstypes":["virtiofs"],
                "allowed_commands":["/bin/sh","sh"]}"#,
        )
        .expect("the strict policy parses")
    })
}

fn decode<M: Message>(payload: &[u8]) -> Option<M> {
    M::parse_from_bytes(payload).ok()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which == 0 {
        if let Ok(h) = vessel_protocol::stdio::StdioHeader::parse(rest) {
            assert!(id::valid_id(&h.container_id));
            assert!(h.exec_id.as_deref().is_none_or(id::valid_id));
        }
        return;
    }
    let Ok(req) = ttrpc::Request::parse_from_bytes(rest) else {
        return;
    };
    let p = &req.payload;
    match (req.service.as_str(), req.method.as_str()) {
        ("vessel.agent.v1.Agent", "CreateContainer") => {
            if let Some(r) = decode::<CreateContainerRequest>(p) {
                let fstypes = || r.storages.iter().map(|s| s.fstype.as_str());
                let _ = strict().check_create(&r.spec_json, fstypes(), 1);
                assert!(Policy::default()
                    .check_create(&r.spec_json, fstypes(), 1)
                    .is_ok());
                if request::create(&r).is_ok() {
                    assert!(id::valid_id(&r.container_id));
                    for s in &r.storages {
                        let mp = request::mount_point(&s.mount_point).unwrap();
                        assert!(mp.is_absolute());
                        assert!(!mp.components().any(|c| c.as_os_str() == ".."));
                    }
                }
            }
        }
        ("vessel.agent.v1.Agent", "ExecProcess") => {
            if let Some(r) = decode::<ExecProcessRequest>(p) {
                let _ = strict().check_exec(&r.process_json);
                assert!(Policy::default().check_exec(&r.process_json).is_ok());
                if request::exec(&r).is_ok() {
                    assert!(id::valid_id(&r.exec_id));
                }
            }
        }
        ("vessel.agent.v1.Agent", "SignalProcess") => {
            if let Some(r) = decode::<SignalProcessRequest>(p) {
                let _ = request::signal(&r);
            }
        }
        ("vessel.agent.v1.Agent", "SetTime") => {
            if let Some(r) = decode::<SetTimeRequest>(p) {
                let _ = request::set_time(&r);
            }
        }
        ("vessel.agent.v1.Agent", "ReseedRandom") => {
            if let Some(r) = decode::<ReseedRandomRequest>(p) {
                assert!(request::seed(&r).len() <= request::MAX_SEED);
            }
        }
        ("vessel.agent.v1.Agent", "SetNetwork") => {
            if let Some(r) = decode::<SetNetworkRequest>(p) {
                if let Ok(n) = net::Network::from_request(&r) {
                    // What the agent accepts, the host would send the same way.
                    let back = net::Network::from_request(&n.to_request())
                        .expect("a checked network round-trips");
                    assert_eq!(back, n);
                }
            }
        }
        ("vessel.agent.v1.Agent", "SetPolicy") => {
            if let Some(r) = decode::<SetPolicyRequest>(p) {
                if let Ok(policy) = Policy::from_json(&r.policy_json) {
                    let back = Policy::from_json(&policy.to_json()).expect("a policy round-trips");
                    assert_eq!(back, policy);
                }
            }
        }
        ("vessel.agent.v1.Agent", "UpdateContainer") => {
            let _ = decode::<UpdateContainerRequest>(p);
        }
        ("vessel.agent.v1.Agent", "ResizeTty") => {
            let _ = decode::<ResizeTtyRequest>(p);
        }
        ("vessel.agent.v1.Agent", "RemoveContainer") => {
            let _ = decode::<RemoveContainerRequest>(p);
        }
        ("vessel.agent.v1.Agent", "WaitProcess" | "CloseStdin") => {
            let _ = decode::<ProcessRequest>(p);
        }
        ("vessel.agent.v1.Agent", "GetOOMEvent") => {
            let _ = decode::<GetOOMEventRequest>(p);
        }
        ("vessel.agent.v1.Agent", "Probe") => {
            let _ = decode::<ProbeRequest>(p);
        }
        ("vessel.agent.v1.Agent", _) => {
            let _ = decode::<ContainerRequest>(p);
        }
        ("vessel.agent.v1.Health", "Check") => {
            let _ = decode::<CheckRequest>(p);
        }
        ("vessel.agent.v1.Health", _) => {
            let _ = decode::<VersionRequest>(p);
        }
        _ => {}
    }
});
