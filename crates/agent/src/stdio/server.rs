//! Accepts stdio connections and hands them to the process they name.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use vessel_protocol::stdio::{HeaderError, StdioHeader, MAX_HEADER_LEN, REPLY_OK};

use super::{BoxConn, ProcessIo};

/// How long a host may take to send its header line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds the stdio of a process by the ids in a header.
pub trait ProcessLookup: Send + Sync + 'static {
    /// `exec_id` None = the container's init process.
    fn process_io(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
    ) -> Result<Arc<ProcessIo>, String>;
}

/// Where stdio connections come from.
pub enum StdioListener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener),
}

impl StdioListener {
    async fn accept(&mut self) -> std::io::Result<BoxConn> {
        Ok(match self {
            StdioListener::Vsock(l) => Box::new(l.accept().await?.0),
            StdioListener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Serves stdio connections until the listener fails.
pub async fn serve(mut listener: StdioListener, lookup: Arc<dyn ProcessLookup>) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let lookup = lookup.clone();
                tokio::spawn(async move { handle(conn, &*lookup).await });
            }
            Err(e) => {
                log::warn!("stdio accept failed: {e}");
                // Accept errors (EMFILE...) are transient; do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut conn: BoxConn, lookup: &dyn ProcessLookup) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn)).await {
        Ok(Ok(line)) => StdioHeader::parse(&line).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no stdio header within {}s",
            HEADER_TIMEOUT.as_secs()
        )),
    };
    let result = header.and_then(|h| {
        let io = lookup.process_io(&h.container_id, h.exec_id.as_deref())?;
        let claim = io.claim(h.stream).map_err(|e| e.to_string())?;
        Ok((h, claim))
    });
    match result {
        Ok((h, claim)) => {
            // If the host vanished before OK, the stream stays claimed by a
            // dead connection: its output is drained and dropped.
            let _ = conn.write_all(REPLY_OK.as_bytes()).await;
            log::debug!("stdio attached: {}", h.to_string().trim_end());
            claim.connect(conn);
        }
        Err(reason) => {
            log::debug!("stdio connection refused: {reason}");
            let reply = format!("ERR {}\n", reason.replace('\n', " "));
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
    }
}

/// Reads up to and including `\n`, one byte at a time so that no stream data
/// sent right after the header is consumed here.
async fn read_header<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Vec<u8>, HeaderError> {
    let mut line = Vec::with_capacity(64);
    loop {
        let mut b = [0u8; 1];
        match r.read(&mut b).await {
            Ok(1) => {}
            _ => {
                return Err(HeaderError::Malformed(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixStream;

    struct One(Arc<ProcessIo>);
    impl ProcessLookup for One {
        fn process_io(&self, c: &str, e: Option<&str>) -> Result<Arc<ProcessIo>, String> {
            match (c, e) {
                ("c1", None) => Ok(self.0.clone()),
                _ => Err(format!("no process {c}/{e:?}")),
            }
        }
    }

    async fn request(lookup: &One, header: &[u8]) -> (String, UnixStream) {
        let (mut host, agent) = UnixStream::pair().unwrap();
        host.write_all(header).await.unwrap();
        handle(Box::new(agent), lookup).await;
        let mut reply = Vec::new();
        loop {
            let mut b = [0u8; 1];
            if host.read(&mut b).await.unwrap() == 0 || b[0] == b'\n' {
                break;
            }
            reply.push(b[0]);
        }
        (String::from_utf8(reply).unwrap(), host)
    }

    #[tokio::test]
    async fn attaches_and_refuses() {
        let (io, child) = ProcessIo::pipes(false, true, false).unwrap();
        let lookup = One(Arc::new(io));
        let (reply, _) = request(&lookup, b"STDIO c2 - stdout\n").await;
        assert!(reply.starts_with("ERR no process c2"), "{reply}");
        let (reply, _) = request(&lookup, b"STDIO c1 - stderr\n").await;
        assert!(
            reply.starts_with("ERR stream stderr was not requested"),
            "{reply}"
        );
        let (reply, _) = request(&lookup, &[b'x'; 300]).await;
        assert!(reply.starts_with("ERR stdio header longer"), "{reply}");
        let (reply, _) = request(&lookup, b"HELLO\n").await;
        assert!(reply.starts_with("ERR stdio header must be"), "{reply}");
        let (reply, mut host) = request(&lookup, b"STDIO c1 - stdout\n").await;
        assert_eq!(reply, "OK");
        drop(child.stdout);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
