//! vessel-runtime: the library behind the `vessel` CLI and the containerd shim.
//!
//! - [`config`]: `/etc/vessel/config.toml`, every key with a documented default.
//! - [`backend`]: which hypervisor runs sandboxes on this host, and the factory.
//! - [`sandbox`]: one VM with its agent: boot, talk, stop, clean up.
//! - [`template`]: sandboxes started from a snapshot of their shape.
//! - [`agent`]: the host-side agent client (readiness, hybrid vsock, ttrpc).
//! - [`network`]: the sandbox's network (taps and tc redirects in its namespace).
//! - [`container`]: OCI containers (one per sandbox), their supervisor and state.
//! - [`pod`]: the pod model (a VM, its share and network, its containers and
//!   processes with their guards, stdio and exits) behind both front-ends.
//! - `fake` (feature `test-fakes`): test doubles of the runtime's traits.
//! - [`image`]: OCI images (archive, layout, registry) unpacked into a bundle.
//! - [`beneath`]: race-free file operations inside trees the guest can write.
//! - [`guest_events`]: the guest's log lines and security events, checked and capped.
//! - [`limits`]: the host cgroup that holds every host process of a sandbox.
//! - [`metrics`]: each sandbox's Prometheus socket, and `vessel monitor`'s aggregation.
//! - [`audit`]: the settings and host facts that weaken isolation (`vessel check --audit`).

pub mod agent;
pub mod audit;
pub mod backend;
pub mod beneath;
pub mod config;
pub mod container;
#[cfg(feature = "test-fakes")]
pub mod fake;
pub mod guest_events;
#[cfg(feature = "image")]
pub mod image;
pub mod limits;
pub mod metrics;
pub mod network;
pub mod pod;
pub mod sandbox;
pub mod template;

pub use config::Config;
pub use sandbox::Sandbox;

/// Runtime errors. A variant that wraps a source does not repeat it: `{:#}`
/// (anyhow) or [`chain`] prints the chain once.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum Error {
    /// Configuration file {path}: {reason}
    Config { path: String, reason: String },
    /// hypervisor
    Hypervisor(#[from] vessel_hypervisor::Error),
    /// hypervisor = "{backend}" cannot run sandboxes on this host: {reason}
    BackendUnavailable {
        backend: config::HypervisorKind,
        reason: String,
    },
    /// State directory {path}
    StateDir {
        path: String,
        source: std::io::Error,
    },
    /// agent
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
    /// template
    Template(#[source] template::TemplateError),
    /// host cgroup vessel/{name} (host limits: `[limits]` in the configuration)
    Cgroup {
        name: String,
        source: vessel_cgroup::CgroupError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub use vessel_protocol::error::{chain, Chain};

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn errors_print_their_cause_once() {
        let spawn = || vessel_hypervisor::Error::Spawn {
            what: "qemu",
            source: io(),
        };
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(Error::Hypervisor(spawn())),
            Box::new(Error::StateDir {
                path: "/r".into(),
                source: io(),
            }),
            Box::new(Error::Agent(agent::AgentError::Connect {
                path: "/s".into(),
                source: io(),
            })),
            Box::new(container::ContainerError::from(Error::Hypervisor(spawn()))),
            Box::new(container::ContainerError::io(
                std::path::Path::new("/x"),
                io(),
            )),
            Box::new(container::ContainerError::Mount {
                what: "bind".into(),
                path: "/m".into(),
                source: nix::Error::EBUSY,
            }),
            Box::new(container::ContainerError::Agent(
                agent::AgentError::ReadyListen {
                    path: "/l".into(),
                    source: io(),
                },
            )),
            Box::new(agent::AgentError::Handshake(
                vessel_protocol::hybrid_vsock::HandshakeError::Io(io()),
            )),
            Box::new(agent::AgentError::Rpc {
                rpc: "Check",
                source: ttrpc::Error::Others("x".into()).into(),
            }),
        ];
        for e in &errors {
            vessel_testutil::assert_cause_printed_once(e.as_ref());
        }
        // The reproduced report: the cause once, in order.
        let e = container::ContainerError::from(Error::Hypervisor(spawn()));
        assert_eq!(
            chain(&e).to_string(),
            "sandbox: hypervisor: Failed to start qemu: entity not found"
        );
    }
}
