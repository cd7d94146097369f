//! Process stdio: containerd's FIFOs on one side, the agent's stdio streams
//! (vsock port 1026, one connection per stream) on the other.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use vessel_protocol::hybrid_vsock;
use vessel_protocol::ports::STDIO_VSOCK_PORT;
use vessel_protocol::stdio::{StdioHeader, StdioStream, MAX_HEADER_LEN, REPLY_OK};

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The FIFO paths containerd passed for one process ("" = not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn agent_config(&self) -> vessel_protocol::agent::StdioConfig {
        vessel_protocol::agent::StdioConfig {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty(),
            ..Default::default()
        }
    }
}

/// Running relays of one process.
#[derive(Default)]
pub struct Relays {
    /// Finish once the guest shut its output streams down.
    output: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
}

impl Relays {
    /// Waits (bounded) until all output reached the FIFOs.
    pub async fn drain(&mut self, timeout: Duration) {
        for h in self.output.drain(..) {
            let abort = h.abort_handle();
            if tokio::time::timeout(timeout, h).await.is_err() {
                log::warn!("stdio relay still busy after {timeout:?}; dropping it");
                abort.abort();
            }
        }
    }

    /// Stops forwarding stdin (CloseIO); dropping the stream closes the
    /// process's stdin in the guest.
    pub fn close_stdin(&mut self) {
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        self.close_stdin();
        for h in &self.output {
            h.abort();
        }
    }
}

/// Opens one stdio stream of a process through the hybrid-vsock socket `uds`.
async fn open_stream(
    uds: &Path,
    container_id: &str,
    exec_id: Option<&str>,
    stream: StdioStream,
) -> Result<UnixStream> {
    let header = StdioHeader {
        container_id: container_id.to_string(),
        exec_id: exec_id.map(str::to_string),
        stream,
    };
    let open = async {
        let mut s = UnixStream::connect(uds)
            .await
            .with_context(|| format!("connect {}", uds.display()))?;
        hybrid_vsock::handshake(&mut s, STDIO_VSOCK_PORT).await?;
        s.write_all(header.to_string().as_bytes()).await?;
        // The reply is untrusted: read at most one header's worth, byte by byte
        // so that no stream data is consumed.
        let mut reply = Vec::with_capacity(8);
        while !reply.ends_with(b"\n") {
            if reply.len() >= MAX_HEADER_LEN {
                bail!("agent stdio reply longer than {MAX_HEADER_LEN} bytes");
            }
            let b = s.read_u8().await.context("agent closed the stdio stream")?;
            reply.push(b);
        }
        if reply != REPLY_OK.as_bytes() {
            let text: String = String::from_utf8_lossy(&reply)
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            bail!("agent refused stdio stream {}: {text}", stream.as_str());
        }
        Ok(s)
    };
    tokio::time::timeout(OPEN_TIMEOUT, open)
        .await
        .with_context(|| format!("opening {} of {container_id}: timed out", stream.as_str()))?
        .with_context(|| format!("opening {} of {container_id}", stream.as_str()))
}

fn fifo_reader(path: &str) -> Result<pipe::Receiver> {
    // read_write: the FIFO never reports EOF just because no writer is attached yet.
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .with_context(|| format!("open stdin FIFO {path}"))
}

fn fifo_writer(path: &str) -> Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .with_context(|| format!("open output FIFO {path}"))
}

fn copy_out<R>(mut from: R, mut to: pipe::Sender, what: String) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
            log::debug!("{what}: {e}");
        }
        let _ = to.flush().await;
    })
}

fn copy_in<W>(mut from: pipe::Receiver, mut to: W) -> JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = to.shutdown().await;
    })
}

/// Attaches the FIFOs of one process (after CreateContainer / ExecProcess).
pub async fn attach(
    uds: &Path,
    container_id: &str,
    exec_id: Option<&str>,
    paths: &StdioPaths,
) -> Result<Relays> {
    let mut relays = Relays::default();
    if paths.terminal {
        let s = open_stream(uds, container_id, exec_id, StdioStream::Tty).await?;
        let (r, w) = s.into_split();
        if !paths.stdout.is_empty() {
            let out = fifo_writer(&paths.stdout)?;
            relays
                .output
                .push(copy_out(r, out, format!("{container_id} tty")));
        }
        if !paths.stdin.is_empty() {
            relays.stdin = Some(copy_in(fifo_reader(&paths.stdin)?, w));
        }
        return Ok(relays);
    }
    for (path, stream) in [
        (&paths.stdout, StdioStream::Stdout),
        (&paths.stderr, StdioStream::Stderr),
    ] {
        if path.is_empty() {
            continue;
        }
        let fifo = fifo_writer(path)?;
        let s = open_stream(uds, container_id, exec_id, stream).await?;
        let what = format!("{container_id} {}", stream.as_str());
        relays.output.push(copy_out(s, fifo, what));
    }
    if !paths.stdin.is_empty() {
        let fifo = fifo_reader(&paths.stdin)?;
        let s = open_stream(uds, container_id, exec_id, StdioStream::Stdin).await?;
        relays.stdin = Some(copy_in(fifo, s));
    }
    Ok(relays)
}
