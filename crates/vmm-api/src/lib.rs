//! vessel-vmm's control API, typed: the VM configuration ([`config`]), the requests and
//! responses (newline-delimited JSON on a Unix stream socket, one request per line, one
//! response per line), and the host KVM probe ([`kvm`]). vessel-vmm serves it; the built-in
//! backend (crates/hypervisor) speaks it; neither spells a field by hand.

pub mod config;
pub mod kvm;

pub use config::{SerialLogLimits, VmConfig};
pub use kvm::HostKvm;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A request (`{"action": "...", ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Variants without fields are written `X {}` so that `deny_unknown_fields` applies to them.
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Sets the VM configuration (before `boot`).
    Configure {
        /// The configuration.
        config: VmConfig,
    },
    /// Boots the configured VM.
    Boot {},
    /// Pauses all vCPUs.
    Pause {},
    /// Resumes paused vCPUs.
    Resume {},
    /// Stops the VM; the VMM process exits with status 0.
    Shutdown {},
    /// Writes a snapshot (memory, vCPU and device state) of the paused VM into `dir`.
    Snapshot {
        /// Directory to write `state.json` and `memory` into (created if missing).
        dir: PathBuf,
    },
    /// Restores a snapshot (before `boot`; replaces it) and resumes the VM.
    Restore {
        /// Snapshot directory.
        dir: PathBuf,
        /// New serial log path (the snapshot's is used when unset).
        #[serde(default)]
        serial_log: Option<PathBuf>,
        /// New caps of the serial log (the snapshot's are used when unset).
        #[serde(default)]
        serial_log_limits: Option<config::SerialLogLimits>,
        /// New vsock Unix socket path (the snapshot's is used when unset).
        #[serde(default)]
        vsock_uds: Option<PathBuf>,
        /// New vhost-user sockets of the snapshot's virtio-fs devices, in device order
        /// (each clone has its own virtiofsd); empty: the snapshot's.
        #[serde(default)]
        fs_sockets: Vec<PathBuf>,
        /// Tap fds (inherited) of the snapshot's network devices, in device order
        /// (each clone has its own taps); empty: the snapshot's.
        #[serde(default)]
        net_fds: Vec<i32>,
        /// Leave the restored VM paused.
        #[serde(default)]
        paused: bool,
    },
    /// Sets the balloon target (the guest gives back this much memory).
    Balloon {
        /// Target balloon size in MiB.
        target_mib: u64,
    },
    /// Returns counters and sizes.
    Metrics {},
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Error message when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Request-specific result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    /// Success without a result.
    pub fn ok() -> Self {
        Response {
            ok: true,
            error: None,
            result: None,
        }
    }

    /// Success with a result.
    pub fn with(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result: Some(result),
        }
    }

    /// Failure.
    pub fn err(msg: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(msg.to_string()),
            result: None,
        }
    }
}

impl Request {
    /// The request's `action`, for messages.
    pub fn action(&self) -> &'static str {
        match self {
            Request::Configure { .. } => "configure",
            Request::Boot {} => "boot",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Shutdown {} => "shutdown",
            Request::Snapshot { .. } => "snapshot",
            Request::Restore { .. } => "restore",
            Request::Balloon { .. } => "balloon",
            Request::Metrics {} => "metrics",
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        // A Request has only string-keyed maps and plain values: serializing cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// A request that vessel-vmm answered with an error, or an answer that is not a response.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ApiError {
    /// vessel-vmm refused it: {0}
    Refused(String),
    /// vessel-vmm's answer is not a response
    BadResponse(#[source] serde_json::Error),
}

impl Response {
    /// Parses a response line and turns `ok: false` into [`ApiError::Refused`].
    pub fn parse(line: &[u8]) -> Result<Option<serde_json::Value>, ApiError> {
        let r: Response = serde_json::from_slice(line).map_err(ApiError::BadResponse)?;
        if r.ok {
            Ok(r.result)
        } else {
            Err(ApiError::Refused(
                r.error.unwrap_or_else(|| "no reason given".into()),
            ))
        }
    }
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_responses_become_results() {
        let r = Request::Restore {
            dir: "/s".into(),
            serial_log: Some("/c".into()),
            serial_log_limits: None,
            vsock_uds: None,
            fs_sockets: vec!["/run/fs0.sock".into()],
            net_fds: vec![5],
            paused: true,
        };
        let line = r.to_line();
        assert!(
            line.ends_with('\n') && line.contains(r#""action":"restore""#),
            "{line}"
        );
        assert_eq!(parse_request(line.trim_end().as_bytes()).unwrap(), r);
        assert_eq!(r.action(), "restore");
        assert_eq!(Response::parse(br#"{"ok":true}"#).unwrap(), None);
        let e = Response::parse(br#"{"ok":false,"error":"paused"}"#).unwrap_err();
        assert_eq!(e.to_string(), "vessel-vmm refused it: paused");
        let e = Response::parse(b"garbage").unwrap_err();
        assert!(matches!(e, ApiError::BadResponse(_)), "{e}");
        assert!(!e.to_string().contains("expected"), "{e}");
    }

    #[test]
    fn parses_and_rejects_unknown_fields() {
        assert_eq!(
            parse_request(br#"{"action":"pause"}"#).unwrap(),
            Request::Pause {}
        );
        assert!(parse_request(br#"{"action":"pause","x":1}"#).is_err());
        assert!(parse_request(br#"{"action":"fly"}"#).is_err());
        let r = parse_request(br#"{"action":"snapshot","dir":"/tmp/s"}"#).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                dir: "/tmp/s".into()
            }
        );
        assert!(parse_request(br#"{"action":"snapshot","dir":"/s","extra":true}"#).is_err());
        let c = br#"{"action":"configure","config":{"kernel":"/k","mem_mib":64,"oops":1}}"#;
        assert!(parse_request(c).is_err());
    }
}
