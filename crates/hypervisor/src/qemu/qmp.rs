//! A minimal QMP client: one connection per command ([`execute`]), or a
//! [`Session`] for commands that need state on one connection (file
//! descriptors passed with `getfd`).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::{Error, Result};

/// Longest QMP line accepted (the greeting and replies are small).
const MAX_LINE: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `command` (no arguments) and returns its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<serde_json::Value> {
    let err = |reason: String| Error::Qmp {
        command: command.to_string(),
        reason,
    };
    let run = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| err(format!("connect {}: {e}", socket.display())))?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        read_reply(&mut rd, true).await.map_err(&err)?;
        for cmd in ["qmp_capabilities", command] {
            let line = format!("{}\n", serde_json::json!({ "execute": cmd }));
            wr.write_all(line.as_bytes())
                .await
                .map_err(|e| err(e.to_string()))?;
            let reply = read_reply(&mut rd, false).await.map_err(&err)?;
            if cmd == command {
                return Ok(reply);
            }
        }
        unreachable!("loop returns on the last command")
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .map_err(|_| err(format!("no reply within {TIMEOUT:?}")))?
}

/// One QMP connection, past capability negotiation.
pub struct Session {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Session {
    pub async fn connect(socket: &Path) -> Result<Self> {
        let err = |reason: String| Error::Qmp {
            command: "qmp_capabilities".into(),
            reason,
        };
        let run = async {
            // A QEMU that just started may have bound its socket but not yet
            // listen()ed on it.
            let stream = loop {
                match UnixStream::connect(socket).await {
                    Ok(s) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(err(format!("connect {}: {e}", socket.display()))),
                }
            };
            let (rd, wr) = stream.into_split();
            let mut s = Session {
                rd: BufReader::new(rd),
                wr,
            };
            read_reply(&mut s.rd, true).await.map_err(err)?;
            Ok::<_, Error>(s)
        };
        let mut s = tokio::time::timeout(TIMEOUT, run)
            .await
            .map_err(|_| err(format!("no reply within {TIMEOUT:?}")))??;
        s.execute("qmp_capabilities", serde_json::json!({})).await?;
        Ok(s)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// Runs `command`; `fd`, if any, travels with the request (SCM_RIGHTS), as
    /// `getfd` expects.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<serde_json::Value> {
        let err = |reason: String| Error::Qmp {
            command: command.to_string(),
            reason,
        };
        let line = format!(
            "{}\n",
            serde_json::json!({ "execute": command, "arguments": arguments })
        );
        let run = async {
            match fd {
                None => self
                    .wr
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|e| err(e.to_string()))?,
                Some(fd) => send_with_fd(&mut self.wr, line.as_bytes(), fd)
                    .await
                    .map_err(|e| err(e.to_string()))?,
            }
            read_reply(&mut self.rd, false).await.map_err(err)
        };
        tokio::time::timeout(TIMEOUT, run)
            .await
            .map_err(|_| err(format!("no reply within {TIMEOUT:?}")))?
    }
}

/// Writes `data` (a whole QMP line, far below the socket buffer) in one
/// sendmsg(2) with `fd` attached.
async fn send_with_fd(
    wr: &mut OwnedWriteHalf,
    data: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    loop {
        let stream: &UnixStream = wr.as_ref();
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [std::io::IoSlice::new(data)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(n) => {
                // The descriptor went with the first byte; send the rest plainly.
                return wr.write_all(&data[n..]).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads lines until the greeting (`QMP`) or a `return`/`error`, skipping events.
async fn read_reply<R: AsyncBufReadExt + Unpin>(
    rd: &mut R,
    greeting: bool,
) -> std::result::Result<serde_json::Value, String> {
    loop {
        let mut line = Vec::new();
        let n = (&mut *rd)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        if !line.ends_with(b"\n") {
            return Err(format!("QMP line longer than {MAX_LINE} bytes"));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&line).map_err(|e| format!("bad QMP JSON: {e}"))?;
        if greeting && v.get("QMP").is_some() {
            return Ok(v);
        }
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(e
                .get("desc")
                .and_then(|d| d.as_str())
                .unwrap_or("unknown error")
                .to_string());
        }
        // An asynchronous event: skip it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    async fn fake_qemu(reply: &'static str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"{\"return\": {}}\n").await.unwrap();
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"{\"event\": \"STOP\"}\n").await.unwrap();
            s.write_all(reply.as_bytes()).await.unwrap();
        });
        (dir, path)
    }

    #[tokio::test]
    async fn returns_value_after_events() {
        let (_d, p) = fake_qemu("{\"return\": {\"status\": \"paused\"}}\n").await;
        let v = execute(&p, "query-status").await.unwrap();
        assert_eq!(v["status"], "paused");
    }

    #[tokio::test]
    async fn reports_errors() {
        let (_d, p) =
            fake_qemu("{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n").await;
        let e = execute(&p, "stop").await.unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
