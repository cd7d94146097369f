//! Client of vessel-vmm's control API (typed in `vessel-vmm-api`): one request line, one
//! response line, on a Unix socket.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vessel_vmm_api::Request;

use crate::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Writing a snapshot copies guest memory to a file.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Booting loads the kernel and initramfs into guest memory; restoring maps a snapshot.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest response line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Why a request to vessel-vmm failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ApiCallError {
    /// cannot connect to {0:?}
    Connect(std::path::PathBuf, #[source] std::io::Error),
    /// cannot send the request or read the response
    Io(#[source] std::io::Error),
    /// no response within {0:?}
    Timeout(Duration),
    /// the VMM answered with an error
    Api(#[source] vessel_vmm_api::ApiError),
}

/// Sends `req` and checks that vessel-vmm answered `ok`.
pub async fn request(socket: &Path, req: Request) -> Result<()> {
    let timeout = match req {
        Request::Snapshot { .. } => SNAPSHOT_TIMEOUT,
        Request::Boot {} | Request::Restore { .. } => START_TIMEOUT,
        _ => TIMEOUT,
    };
    let action = req.action();
    call(socket, &req, timeout)
        .await
        .map(|_| ())
        .map_err(|source| Error::VmmApi {
            request: action,
            source,
        })
}

/// Writes a snapshot of the paused VM into `dir`.
pub async fn snapshot(socket: &Path, dir: &Path) -> Result<()> {
    request(socket, Request::Snapshot { dir: dir.into() }).await
}

async fn call(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> std::result::Result<Option<serde_json::Value>, ApiCallError> {
    let run = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| ApiCallError::Connect(socket.into(), e))?;
        s.write_all(req.to_line().as_bytes())
            .await
            .map_err(ApiCallError::Io)?;
        let mut reply = Vec::new();
        BufReader::new(&mut s)
            .take(MAX_LINE)
            .read_until(b'\n', &mut reply)
            .await
            .map_err(ApiCallError::Io)?;
        vessel_vmm_api::Response::parse(&reply).map_err(ApiCallError::Api)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ApiCallError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_are_typed_and_print_each_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let e = request(&sock, Request::Pause {}).await.unwrap_err();
        assert!(
            matches!(
                &e,
                Error::VmmApi {
                    request: "pause",
                    source: ApiCallError::Connect(..)
                }
            ),
            "{e}"
        );
        vessel_testutil::assert_cause_printed_once(&e);
        // A VMM that refuses: the reason comes through, once.
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            BufReader::new(&mut s)
                .read_until(b'\n', &mut line)
                .await
                .unwrap();
            assert_eq!(
                line,
                br#"{"action":"resume"}"#.iter().chain(b"\n").copied().collect::<Vec<_>>()
            );
            s.write_all(b"{\"ok\":false,\"error\":\"not paused\"}\n")
                .await
                .unwrap();
        });
        let e = request(&sock, Request::Resume {}).await.unwrap_err();
        server.await.unwrap();
        vessel_testutil::assert_cause_printed_once(&e);
        let mut chain = e.to_string();
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            chain.push_str(&format!(": {c}"));
            cur = c.source();
        }
        assert!(chain.contains("vessel-vmm request resume failed: the VMM answered with an error: vessel-vmm refused it: not paused"), "{chain}");
    }
}
