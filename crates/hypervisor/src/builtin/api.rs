//! Client of vessel-vmm's control API: newline-delimited JSON on a Unix socket.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Writing a snapshot copies guest memory to a file.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest response line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Sends `{"action": action}` and checks `{"ok": true}`.
pub async fn request(socket: &Path, action: &str) -> Result<()> {
    send(socket, serde_json::json!({ "action": action }), TIMEOUT).await
}

/// Writes a snapshot of the paused VM into `dir`.
pub async fn snapshot(socket: &Path, dir: &Path) -> Result<()> {
    let req = serde_json::json!({ "action": "snapshot", "dir": dir });
    send(socket, req, SNAPSHOT_TIMEOUT).await
}

async fn send(socket: &Path, req: serde_json::Value, timeout: Duration) -> Result<()> {
    let action = req["action"].as_str().unwrap_or_default().to_string();
    let err = |reason: String| Error::Qmp {
        command: format!("vessel-vmm {action}"),
        reason,
    };
    let run = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| err(format!("connect {}: {e}", socket.display())))?;
        let line = format!("{req}\n");
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut reply = Vec::new();
        BufReader::new(&mut s)
            .take(MAX_LINE)
            .read_until(b'\n', &mut reply)
            .await
            .map_err(|e| err(e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&reply).map_err(|e| err(format!("bad reply: {e}")))?;
        if v.get("ok") == Some(&serde_json::Value::Bool(true)) {
            Ok(())
        } else {
            Err(err(v
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_string()))
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| err(format!("no reply within {timeout:?}")))?
}
