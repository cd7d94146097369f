//! Control API: newline-delimited JSON over a Unix stream socket. One request per line,
//! one response per line. The API only parses; the VMM acts ([`crate::vmm::Vmm`]).

pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

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
        /// New vsock Unix socket path (the snapshot's is used when unset).
        #[serde(default)]
        vsock_uds: Option<PathBuf>,
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

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
mod tests {
    use super::*;

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
