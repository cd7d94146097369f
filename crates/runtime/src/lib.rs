//! vessel-runtime: the library behind the `vessel` CLI and the containerd shim.
//!
//! - [`config`]: `/etc/vessel/config.toml`, every key with a documented default.
//! - [`backend`]: which hypervisor runs sandboxes on this host, and the factory.
//! - [`sandbox`]: one VM with its agent: boot, talk, stop, clean up.
//! - [`agent`]: the host-side agent client (readiness, hybrid vsock, ttrpc).
//! - [`network`]: the sandbox's network (taps and tc redirects in its namespace).
//! - [`container`]: OCI containers (one per sandbox), their supervisor and state.
//! - [`pod`]: the pod model (a VM, its share and network, its containers and
//!   processes with their guards, stdio and exits) behind the containerd shim.

pub mod agent;
pub mod backend;
pub mod config;
pub mod container;
pub mod network;
pub mod pod;
pub mod sandbox;

pub use config::Config;
pub use sandbox::Sandbox;

/// Runtime errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum Error {
    /// Configuration file {path}: {reason}
    Config { path: String, reason: String },
    /// {0}
    Hypervisor(#[from] vessel_hypervisor::Error),
    /// hypervisor = "{backend}" cannot run sandboxes on this host: {reason}
    BackendUnavailable {
        backend: config::HypervisorKind,
        reason: String,
    },
    /// State directory {path}: {source}
    StateDir {
        path: String,
        source: std::io::Error,
    },
    /// Agent: {0}
    Agent(#[from] agent::AgentError),
    /// The VM ended before the agent was ready ({exit}).
    /// Hypervisor log:
    /// {hypervisor}
    /// Console log tail:
    /// {console}
    VmDiedEarly {
        exit: String,
        hypervisor: String,
        console: String,
    },
    /// Timed out after {secs} s waiting for the agent. Console log tail:
    /// {console}
    BootTimeout { secs: u64, console: String },
    /// sandbox: {0}
    InvalidId(vessel_protocol::id::InvalidId),
    /// Sandbox {0} already exists
    Exists(String),
}

pub type Result<T> = std::result::Result<T, Error>;
