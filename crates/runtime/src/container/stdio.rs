//! Copies between host file descriptors and a process's stdio streams.
//!
//! One thread per direction: host fds may be pipes, files, ttys or
//! /dev/null, which not all work with epoll. Output relays are joined before
//! an exit is reported, so output always arrives before the exit status.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::Duration;

/// Output relays still running.
pub struct Relays {
    done: mpsc::Receiver<()>,
    tx: mpsc::Sender<()>,
    outputs: usize,
}

impl Default for Relays {
    fn default() -> Self {
        let (tx, done) = mpsc::channel();
        Relays {
            done,
            tx,
            outputs: 0,
        }
    }
}

impl Relays {
    /// host `src` -> process; shuts down the stream's write side at EOF
    /// (closing the process's stdin). Not waited for.
    pub fn input(&mut self, src: File, dst: UnixStream) {
        std::thread::spawn(move || {
            let mut dst_w = &dst;
            let _ = copy(src, &mut dst_w);
            let _ = dst.shutdown(Shutdown::Write);
        });
    }

    /// host `src` -> a terminal's stream; EOF does not close the stream (a
    /// terminal has no half-close: the process would lose its output).
    pub fn tty_input(&mut self, src: File, dst: UnixStream) {
        std::thread::spawn(move || {
            let _ = copy(src, &dst);
        });
    }

    /// process -> host `dst`, until the agent shuts the stream down.
    pub fn output(&mut self, src: UnixStream, dst: File) {
        let tx = self.tx.clone();
        self.outputs += 1;
        std::thread::spawn(move || {
            let _ = copy(&src, dst);
            let _ = tx.send(());
        });
    }

    /// Both directions of a terminal: `host` is the host pty slave (raw mode).
    pub fn terminal(&mut self, host: File, stream: UnixStream) -> std::io::Result<()> {
        let host_in = host.try_clone()?;
        let stream_in = stream.try_clone()?;
        std::thread::spawn(move || {
            let _ = copy(host_in, &stream_in);
        });
        let tx = self.tx.clone();
        self.outputs += 1;
        std::thread::spawn(move || {
            let _ = copy(&stream, host);
            let _ = tx.send(());
        });
        Ok(())
    }

    /// Waits until every output relay finished, or `timeout` (a hostile
    /// guest may never close a stream). Returns whether all finished.
    pub fn drain(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.outputs > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.done.recv_timeout(left) {
                Ok(()) => self.outputs -= 1,
                Err(_) => return false,
            }
        }
        true
    }
}

/// Like `std::io::copy`, but flushes per chunk and retries EINTR; stops at
/// EOF or the first error (e.g. EPIPE when the reader went away).
fn copy(mut src: impl Read, mut dst: impl Write) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        dst.flush()?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_drained() {
        let (guest, host) = UnixStream::pair().unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut r = Relays::default();
        r.output(host, out.reopen().unwrap());
        let data = vec![7u8; 1 << 20];
        let mut g = &guest;
        g.write_all(&data).unwrap();
        guest.shutdown(Shutdown::Both).unwrap();
        assert!(r.drain(Duration::from_secs(10)));
        assert_eq!(std::fs::read(out.path()).unwrap(), data);
    }

    #[test]
    fn drain_times_out_on_open_stream() {
        let (_guest, host) = UnixStream::pair().unwrap();
        let mut r = Relays::default();
        r.output(host, tempfile::tempfile().unwrap());
        assert!(!r.drain(Duration::from_millis(20)));
    }
}
