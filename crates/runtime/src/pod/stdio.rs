//! Process stdio of a pod: host FIFOs (containerd's) on one side, the
//! agent's stdio streams (vsock port 1026, one connection per stream) on
//! the other.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use vessel_protocol::stdio::StdioStream;

use super::{PodError, Result};
use crate::agent::AgentClient;

/// The host FIFO paths of one process ("" = not wanted).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Which streams the agent should expect: (stdin, stdout, stderr).
    pub fn wanted(&self) -> (bool, bool, bool) {
        (
            !self.stdin.is_empty(),
            !self.stdout.is_empty(),
            !self.stderr.is_empty(),
        )
    }
}

/// Who relays a process's stdio.
#[derive(Debug, Clone)]
pub enum Stdio {
    /// The pod, between these host FIFOs and the agent's streams.
    Fifos(StdioPaths),
    /// The front-end, which opens the agent's streams itself
    /// ([`crate::agent::AgentClient::open_stream`]): all three, or the tty.
    Caller { terminal: bool },
}

impl Stdio {
    /// Which streams the agent should expect: (stdin, stdout, stderr).
    pub fn wanted(&self) -> (bool, bool, bool) {
        match self {
            Stdio::Fifos(p) => p.wanted(),
            Stdio::Caller { terminal } => (!terminal, !terminal, !terminal),
        }
    }

    /// The FIFOs (none when the caller relays).
    pub fn paths(&self) -> StdioPaths {
        match self {
            Stdio::Fifos(p) => p.clone(),
            Stdio::Caller { terminal } => StdioPaths {
                terminal: *terminal,
                ..StdioPaths::default()
            },
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

/// Opens one stdio stream of a process (agent handshake included).
async fn open_stream(
    agent: &AgentClient,
    container_id: &str,
    exec_id: Option<&str>,
    stream: StdioStream,
) -> Result<UnixStream> {
    let s = agent.open_stream(container_id, exec_id, stream).await?;
    let io = |e| PodError::Io {
        path: format!("{} stream of {container_id}", stream.as_str()),
        source: e,
    };
    s.set_nonblocking(true).map_err(io)?;
    UnixStream::from_std(s).map_err(io)
}

fn fifo_io(path: &str) -> impl FnOnce(std::io::Error) -> PodError + '_ {
    move |source| PodError::Io {
        path: Path::new(path).display().to_string(),
        source,
    }
}

fn fifo_reader(path: &str) -> Result<pipe::Receiver> {
    // read_write: the FIFO never reports EOF just because no writer is attached yet.
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(fifo_io(path))
}

fn fifo_writer(path: &str) -> Result<pipe::Sender> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(fifo_io(path))
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

/// Attaches the FIFOs of one process (after CreateContainer / ExecProcess);
/// nothing if the caller relays.
pub async fn attach(
    agent: &AgentClient,
    container_id: &str,
    exec_id: Option<&str>,
    stdio: &Stdio,
) -> Result<Relays> {
    let mut relays = Relays::default();
    let Stdio::Fifos(paths) = stdio else {
        return Ok(relays);
    };
    if paths.terminal {
        let s = open_stream(agent, container_id, exec_id, StdioStream::Tty).await?;
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
        let s = open_stream(agent, container_id, exec_id, stream).await?;
        let what = format!("{container_id} {}", stream.as_str());
        relays.output.push(copy_out(s, fifo, what));
    }
    if !paths.stdin.is_empty() {
        let fifo = fifo_reader(&paths.stdin)?;
        let s = open_stream(agent, container_id, exec_id, StdioStream::Stdin).await?;
        relays.stdin = Some(copy_in(fifo, s));
    }
    Ok(relays)
}
