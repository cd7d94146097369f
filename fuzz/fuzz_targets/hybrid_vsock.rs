//! Hybrid vsock, both ends. First byte:
//! - 0: the host's parser of the VMM's `OK <port>` reply and of the agent's stdio header;
//! - 1: the VMM's parser of a host's `CONNECT <port>` line;
//! - else: vessel-vmm's vsock muxer driven by guest packets, host connections (with
//!   arbitrary handshake bytes) and host data (`vessel_vmm::devices::virtio::vsock::fuzzing`).
#![no_main]

use vessel_protocol::hybrid_vsock;
use vessel_vmm::devices::virtio::vsock::fuzzing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(port) = hybrid_vsock::parse_reply(rest) {
                // Only canonical replies are accepted.
                let line = format!("OK {port}");
                assert!(rest == line.as_bytes() || rest == format!("{line}\n").as_bytes());
            }
            let _ = vessel_protocol::stdio::StdioHeader::parse(rest);
        }
        1 => {
            if let Some(port) = fuzzing::parse_connect(rest) {
                // What the host sends for that port is read back as the same port.
                let req = hybrid_vsock::connect_request(port);
                assert_eq!(
                    fuzzing::parse_connect(req.trim_end().as_bytes()),
                    Some(port)
                );
            }
        }
        _ => fuzzing::muxer(rest),
    }
});
