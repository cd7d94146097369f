//! Process stdio: the guest end of the streams described in
//! [`vessel_protocol::stdio`].
//!
//! Each process gets a [`ProcessIo`]: pipes (or a pty master) whose agent ends
//! are pumped by tasks. A pump waits for the host to attach its connection;
//! output produced before that is buffered up to [`OUTPUT_BUFFER`] bytes, then
//! the pump stops reading and the process blocks on a full pipe (backpressure,
//! never loss). [`ProcessIo::drained`] resolves once every output stream has
//! been written to its host connection and shut down.

mod fd;
pub mod server;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Notify};
use vessel_protocol::stdio::StdioStream;

pub use fd::FdStream;

/// Output kept for a host that has not attached yet.
pub const OUTPUT_BUFFER: usize = 1 << 20;

const CHUNK: usize = 64 * 1024;

/// A host stdio connection (vsock or Unix stream).
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}
pub type BoxConn = Box<dyn Conn>;

/// Why a stream could not be attached; sent to the host as `ERR <reason>`.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AttachError {
    /// stream {0} was not requested for this process (or it has a terminal)
    NotRequested(&'static str),
    /// stream {0} is already attached
    AlreadyAttached(&'static str),
}

/// Child-side fds for a process's stdin/stdout/stderr (`None` = /dev/null).
#[derive(Default)]
pub struct ChildStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// A claimed stream, waiting for its host connection.
pub struct Claim(oneshot::Sender<BoxConn>);

impl Claim {
    /// Hands the connection to the stream's pump.
    pub fn connect(self, conn: BoxConn) {
        // A pump only ends early when the process is being removed.
        let _ = self.0.send(conn);
    }
}

/// The agent side of one process's stdio.
pub struct ProcessIo {
    slots: Mutex<HashMap<StdioStream, oneshot::Sender<BoxConn>>>,
    stdin_close: Arc<Notify>,
    drained: Vec<watch::Receiver<bool>>,
    tty: Option<FdStream>,
    /// Every stream this process has, attached or not.
    streams: Vec<StdioStream>,
}

impl ProcessIo {
    /// Pipes for the requested streams. Returns the agent side (with its pumps
    /// running) and the child side to hand to the process.
    pub fn pipes(stdin: bool, stdout: bool, stderr: bool) -> std::io::Result<(Self, ChildStdio)> {
        let mut io = ProcessIo::empty();
        let mut child = ChildStdio::default();
        if stdin {
            let (r, w) = pipe()?;
            child.stdin = Some(r);
            let (tx, rx) = oneshot::channel();
            io.add_slot(StdioStream::Stdin, tx);
            tokio::spawn(pump_stdin(FdStream::new(w)?, rx, io.stdin_close.clone()));
        }
        for (wanted, stream) in [(stdout, StdioStream::Stdout), (stderr, StdioStream::Stderr)] {
            if !wanted {
                continue;
            }
            let (r, w) = pipe()?;
            match stream {
                StdioStream::Stdout => child.stdout = Some(w),
                _ => child.stderr = Some(w),
            }
            let (tx, rx) = oneshot::channel();
            io.add_slot(stream, tx);
            let (done_tx, done_rx) = watch::channel(false);
            io.drained.push(done_rx);
            tokio::spawn(pump_output(FdStream::new(r)?, None, rx, done_tx));
        }
        Ok((io, child))
    }

    /// A terminal process: one bidirectional `tty` stream on the pty master.
    pub fn tty(master: OwnedFd) -> std::io::Result<Self> {
        let mut io = ProcessIo::empty();
        let master = FdStream::new(master)?;
        let (tx, rx) = oneshot::channel();
        io.add_slot(StdioStream::Tty, tx);
        let (done_tx, done_rx) = watch::channel(false);
        io.drained.push(done_rx);
        tokio::spawn(pump_output(
            master.clone(),
            Some(master.clone()),
            rx,
            done_tx,
        ));
        io.tty = Some(master);
        Ok(io)
    }

    fn empty() -> Self {
        ProcessIo {
            slots: Mutex::new(HashMap::new()),
            stdin_close: Arc::new(Notify::new()),
            drained: Vec::new(),
            tty: None,
            streams: Vec::new(),
        }
    }

    fn add_slot(&mut self, stream: StdioStream, tx: oneshot::Sender<BoxConn>) {
        self.streams.push(stream);
        self.slots
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .insert(stream, tx);
    }

    /// Claims `stream` for a host connection; each stream is claimed once.
    pub fn claim(&self, stream: StdioStream) -> Result<Claim, AttachError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&stream).map(Claim).ok_or_else(|| {
            if self.has_stream(stream) {
                AttachError::AlreadyAttached(stream.as_str())
            } else {
                AttachError::NotRequested(stream.as_str())
            }
        })
    }

    /// Claims `stream` and hands it the host connection.
    #[cfg(test)]
    pub fn attach(&self, stream: StdioStream, conn: BoxConn) -> Result<(), AttachError> {
        self.claim(stream)?.connect(conn);
        Ok(())
    }

    fn has_stream(&self, stream: StdioStream) -> bool {
        self.streams.contains(&stream)
    }

    /// Closes the process's stdin (whether or not the host attached it).
    pub fn close_stdin(&self) {
        self.stdin_close.notify_one();
    }

    /// The pty master of a terminal process.
    pub fn tty_master(&self) -> Option<&FdStream> {
        self.tty.as_ref()
    }

    /// Resolves once all output streams were delivered and shut down.
    pub async fn drained(&self) {
        for rx in &self.drained {
            let mut rx = rx.clone();
            // An error means the pump is gone, which also means it is done.
            let _ = rx.wait_for(|done| *done).await;
        }
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Copies host -> process stdin until the host half-closes, then closes the pipe.
async fn pump_stdin(mut dst: FdStream, attach: oneshot::Receiver<BoxConn>, close: Arc<Notify>) {
    tokio::select! {
        conn = attach => {
            if let Ok(mut conn) = conn {
                tokio::select! {
                    r = tokio::io::copy(&mut conn, &mut dst) => {
                        if let Err(e) = r {
                            log::debug!("stdin stream ended: {e}");
                        }
                    }
                    _ = close.notified() => {}
                }
            }
        }
        _ = close.notified() => {}
    }
    log::debug!("closing stdin pipe fd {}", dst.as_raw_fd());
}

/// Buffers `src` until the host attaches, then streams it; shuts the host
/// connection down after the last byte and reports on `done`. With `tty_input`
/// the host connection is also copied into the pty master.
async fn pump_output(
    mut src: FdStream,
    tty_input: Option<FdStream>,
    attach: oneshot::Receiver<BoxConn>,
    done: watch::Sender<bool>,
) {
    let mut pending = Vec::new();
    let mut eof = false;
    let mut chunk = vec![0u8; CHUNK];
    let mut attach = attach;
    let conn = loop {
        tokio::select! {
            conn = &mut attach => break conn.ok(),
            r = src.read(&mut chunk), if !eof && pending.len() < OUTPUT_BUFFER => match r {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            },
        }
    };
    let Some(conn) = conn else {
        // The process is being removed before the host attached.
        let _ = done.send(true);
        return;
    };
    let (mut host_rx, mut host_tx) = tokio::io::split(conn);
    // Host EOF on a tty does not close the terminal: the host ends a terminal
    // session with a signal, not with EOF.
    let input = tty_input.map(|mut master| {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut host_rx, &mut master).await;
        })
    });
    let mut host_ok = host_tx.write_all(&pending).await.is_ok();
    drop(pending);
    while !eof {
        match src.read(&mut chunk).await {
            Ok(0) | Err(_) => eof = true,
            Ok(n) if host_ok => host_ok = host_tx.write_all(&chunk[..n]).await.is_ok(),
            // The host went away: keep draining so the process never blocks.
            Ok(_) => {}
        }
    }
    if host_ok {
        let _ = host_tx.flush().await;
        let _ = host_tx.shutdown().await;
    }
    // Close the connection fully: some vsock backends (vhost-device-vsock)
    // do not pass a guest half-close on to the host.
    if let Some(input) = input {
        input.abort();
        let _ = input.await;
    }
    drop(host_tx);
    let _ = done.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::net::UnixStream;

    #[tokio::test]
    async fn buffers_before_attach_and_delivers_all() {
        let (io, child) = ProcessIo::pipes(false, true, false).unwrap();
        // 3 MiB: more than the buffer, so the writer must wait for the host.
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let stdout = child.stdout.unwrap();
        let writer = std::thread::spawn(move || {
            std::fs::File::from(stdout).write_all(&data).unwrap();
        });
        let (host, agent) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdout, Box::new(agent)).unwrap();
        assert!(matches!(
            io.attach(StdioStream::Stdout, Box::new(UnixStream::pair().unwrap().0)),
            Err(AttachError::AlreadyAttached(_))
        ));
        let reader = tokio::spawn(async move {
            let mut host = host;
            let mut got = Vec::new();
            host.read_to_end(&mut got).await.unwrap();
            got
        });
        tokio::time::timeout(std::time::Duration::from_secs(20), io.drained())
            .await
            .unwrap();
        writer.join().unwrap();
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn stdin_half_close_closes_pipe() {
        let (io, child) = ProcessIo::pipes(true, false, false).unwrap();
        let (mut host, agent) = UnixStream::pair().unwrap();
        io.attach(StdioStream::Stdin, Box::new(agent)).unwrap();
        host.write_all(b"hello").await.unwrap();
        host.shutdown().await.unwrap();
        let stdin = child.stdin.unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(stdin), &mut s).unwrap();
            s
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), got)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, "hello");
        assert!(matches!(
            io.attach(StdioStream::Stdout, Box::new(UnixStream::pair().unwrap().0)),
            Err(AttachError::NotRequested(_))
        ));
    }

    #[tokio::test]
    async fn close_stdin_without_host() {
        let (io, child) = ProcessIo::pipes(true, false, false).unwrap();
        io.close_stdin();
        let stdin = child.stdin.unwrap();
        let n = tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(stdin), &mut v).unwrap()
        });
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), n)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
    }
}
