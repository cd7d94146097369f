//! Client of vessel-vmm's control API: newline-delimited JSON on a Unix socket.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::{Error, Result};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Longest response line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Sends `{"action": action}` and checks `{"ok": true}`.
pub async fn request(socket: &Path, action: &str) -> Result<()> {
    let err = |reason: String| Error::Qmp {
        command: format!("vessel-vmm {action}"),
        reason,
    };
    let run = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| err(format!("connect {}: {e}", socket.display())))?;
        let line = format!("{}\n", serde_json::json!({ "action": action }));
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
    tokio::time::timeout(TIMEOUT, run)
        .await
        .map_err(|_| err(format!("no reply within {TIMEOUT:?}")))?
}
