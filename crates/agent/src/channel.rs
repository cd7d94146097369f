//! Which transport carries the agent API.

use std::fmt;

use vessel_protocol::ports::{AGENT_VSOCK_PORT, CHANNEL_CMDLINE_KEY};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// AF_VSOCK, port [`AGENT_VSOCK_PORT`]; readiness announced on the ready port.
    Vsock,
    /// The virtio-serial port named `vessel.agent`.
    Serial,
    /// A ttrpc address (`unix://...`), for running outside a VM.
    Listen(String),
}

impl Channel {
    pub fn from_cmdline(cmdline: &str) -> anyhow::Result<Self> {
        let prefix = format!("{CHANNEL_CMDLINE_KEY}=");
        match cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
        {
            None | Some("vsock") => Ok(Channel::Vsock),
            Some("serial") => Ok(Channel::Serial),
            Some(other) => {
                anyhow::bail!("unknown {CHANNEL_CMDLINE_KEY}={other:?} (expected vsock or serial)")
            }
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Vsock => write!(f, "vsock port {AGENT_VSOCK_PORT}"),
            Channel::Serial => write!(f, "virtio-serial"),
            Channel::Listen(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel() {
        assert_eq!(
            Channel::from_cmdline("console=ttyS0 quiet").unwrap(),
            Channel::Vsock
        );
        assert_eq!(
            Channel::from_cmdline("vessel.channel=serial").unwrap(),
            Channel::Serial
        );
        assert_eq!(
            Channel::from_cmdline("a vessel.channel=vsock b").unwrap(),
            Channel::Vsock
        );
        assert!(Channel::from_cmdline("vessel.channel=carrier-pigeon").is_err());
    }
}

/// The agent API over a virtio-serial port.
///
/// A virtio-serial port is a single byte stream, so the "listener" yields one
/// connection at a time: the next one once the host has reconnected after the
/// previous connection ended.
pub mod serial {
    use std::fs::OpenOptions;
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use anyhow::Context as _;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::sync::Notify;
    use ttrpc::r#async::transport::Listener;
    use vessel_protocol::ports::AGENT_SERIAL_PORT_NAME;

    use crate::stdio::FdStream;

    /// How often to look for the host end while it is not connected: the
    /// virtio-serial driver reports a host (dis)connect through POLLHUP only.
    const HOST_POLL_INTERVAL: Duration = Duration::from_millis(10);

    /// Finds `/dev/vportNpM` whose sysfs name is [`AGENT_SERIAL_PORT_NAME`].
    fn find_port() -> anyhow::Result<PathBuf> {
        for entry in std::fs::read_dir("/sys/class/virtio-ports").context("list virtio ports")? {
            let entry = entry?;
            let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
            if name.trim() == AGENT_SERIAL_PORT_NAME {
                return Ok(PathBuf::from("/dev").join(entry.file_name()));
            }
        }
        anyhow::bail!("no virtio-serial port named {AGENT_SERIAL_PORT_NAME}")
    }

    pub fn listener() -> anyhow::Result<Listener> {
        let path = find_port()?;
        let done = Arc::new(Notify::new());
        // `wait` is true once a connection was handed out: the next open waits
        // until that connection is dropped (Notify keeps the permit if it
        // already was), so the port never has two readers.
        let stream =
            futures::stream::unfold((path, done, false), |(path, done, wait)| async move {
                if wait {
                    done.notified().await;
                }
                let conn = SerialConn::open(&path, done.clone()).await;
                let wait = conn.is_ok();
                Some((conn, (path, done, wait)))
            });
        Ok(Listener::new(stream))
    }

    pub struct SerialConn {
        stream: FdStream,
        done: Arc<Notify>,
    }

    impl SerialConn {
        async fn open(path: &PathBuf, done: Arc<Notify>) -> io::Result<Self> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)?;
            let fd: OwnedFd = file.into();
            loop {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::ZERO)?;
                let hup = fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLHUP));
                if !hup {
                    break;
                }
                tokio::time::sleep(HOST_POLL_INTERVAL).await;
            }
            log::debug!("host connected on virtio-serial {}", path.display());
            Ok(SerialConn {
                stream: FdStream::new(fd)?,
                done,
            })
        }
    }

    impl Drop for SerialConn {
        fn drop(&mut self) {
            self.done.notify_one();
        }
    }

    // The byte stream is the agent's non-blocking fd stream; the connection
    // only adds the "dropped" signal that lets the listener reopen the port.
    impl AsyncRead for SerialConn {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for SerialConn {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, data)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }
}
