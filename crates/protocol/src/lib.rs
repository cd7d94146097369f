//! The contract between the Vessel host runtime and `vessel-agent` in the guest.
//!
//! - [`health`] / [`health_ttrpc`], [`agent`] / [`agent_ttrpc`]: generated
//!   messages and ttrpc services (container lifecycle lives in `agent`).
//! - [`error`]: [`error::chain`], an error and its causes printed once each.
//! - [`id`]: the one rule for sandbox, container and exec ids.
//! - [`stdio`]: the header line that opens a process stdio stream.
//! - [`net`]: the guest network configuration (`SetNetwork`), typed and checked.
//! - [`policy`]: the agent policy (allowed RPCs and request fields), host and guest.
//! - [`ports`]: vsock ports and virtio-serial port names.
//! - [`request`]: what the agent checks in a request before it acts (ids, paths, sizes).
//! - [`hybrid_vsock`]: the Firecracker-style `CONNECT <port>` handshake that the
//!   host speaks over a Unix socket to reach a guest vsock port.
//! - [`kernel`]: the guest kernel's oops and panic lines, for the agent and the host.
//!
//! This crate does no I/O policy (timeouts, retries): callers decide those.

pub mod error;
pub mod hybrid_vsock;
pub mod id;
pub mod kernel;
pub mod net;
pub mod policy;
pub mod ports;
pub mod request;
pub mod stdio;

/// Revision of the agent protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 2;

#[allow(warnings, clippy::all, clippy::undocumented_unsafe_blocks)]
mod generated {
    pub mod health {
        include!(concat!(env!("OUT_DIR"), "/health.rs"));
    }
    pub mod health_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
    }
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use generated::{agent, agent_ttrpc, health, health_ttrpc};
pub use protobuf;
pub use ttrpc;
