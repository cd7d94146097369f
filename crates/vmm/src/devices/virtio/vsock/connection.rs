//! One vsock connection: its host Unix stream, buffered guest data, and credit accounting.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::Header;
use super::CONN_BUF_ALLOC;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows both ways.
    Established,
}

/// Result of reading host data for the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    /// `n` bytes were read.
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The host closed its end.
    Eof,
}

/// A connection between a guest port and a host Unix stream.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Event-loop token of the stream.
    pub token: u32,
    /// Lifecycle state.
    pub state: State,
    /// When the connection was created (for the handshake timeout).
    pub since: std::time::Instant,
    /// The host may have data to read (edge-triggered hint).
    pub readable: bool,
    /// A credit update should be sent to the guest.
    pub credit_update_due: bool,
    /// A credit request was sent and not yet answered.
    pub credit_requested: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest (wrapping).
    rx_cnt: u32,
    /// Bytes from the guest written to the host stream (wrapping).
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest data not yet accepted by the host stream.
    pending: Vec<u8>,
}

impl Connection {
    /// A connection over `stream` (already non-blocking).
    pub fn new(stream: UnixStream, token: u32, state: State) -> Self {
        Connection {
            stream,
            token,
            state,
            since: std::time::Instant::now(),
            readable: state == State::Established,
            credit_update_due: false,
            credit_requested: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            pending: Vec::new(),
        }
    }

    /// Learns the guest's buffer state from any header it sent.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        self.credit_requested = false;
    }

    /// How many more bytes the guest can take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fills our credit fields into a header going to the guest.
    pub fn stamp(&mut self, hdr: &mut Header) {
        hdr.buf_alloc = CONN_BUF_ALLOC;
        hdr.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
    }

    /// Data from the guest: written to the host stream, the rest buffered. Fails if the
    /// guest sent more than the credit we gave it, or the stream is broken.
    pub fn write_from_guest(&mut self, data: &[u8]) -> Result<(), ()> {
        if self.pending.len() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(());
        }
        self.pending.extend_from_slice(data);
        self.flush()
    }

    /// Writes buffered guest data to the host stream.
    pub fn flush(&mut self) -> Result<(), ()> {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return Err(()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
        }
        // Tell the guest about freed space once a quarter of the buffer was consumed.
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CONN_BUF_ALLOC / 4 {
            self.credit_update_due = true;
        }
        Ok(())
    }

    /// Reads host data for the guest into `buf` (at most the guest's credit).
    pub fn read_for_guest(&mut self, buf: &mut [u8]) -> Result<HostRead, ()> {
        let n = buf.len().min(self.peer_credit() as usize);
        if n == 0 {
            return Ok(HostRead::WouldBlock);
        }
        loop {
            match self.stream.read(&mut buf[..n]) {
                Ok(0) => return Ok(HostRead::Eof),
                Ok(r) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(r as u32);
                    return Ok(HostRead::Data(r));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(HostRead::WouldBlock);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Err(()),
            }
        }
    }

    /// Whether the connection has something for the guest right now.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established
            && (self.credit_update_due || (self.readable && self.peer_credit() > 0))
    }

    /// Whether the guest must be asked for credit before more data can flow.
    pub fn needs_credit(&self) -> bool {
        self.state == State::Established
            && self.readable
            && self.peer_credit() == 0
            && !self.credit_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 0, State::Established), b)
    }

    #[test]
    fn never_sends_more_than_the_guest_credit() {
        let (mut c, mut host) = pair();
        host.write_all(&[7u8; 1000]).unwrap();
        let mut buf = [0u8; 4096];
        // No credit yet: nothing is read.
        assert_eq!(c.read_for_guest(&mut buf).unwrap(), HostRead::WouldBlock);
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 0,
            ..Default::default()
        });
        assert_eq!(c.read_for_guest(&mut buf).unwrap(), HostRead::Data(100));
        assert_eq!(c.peer_credit(), 0);
        assert!(c.needs_credit());
        c.update_peer_credit(&Header {
            buf_alloc: 100,
            fwd_cnt: 60,
            ..Default::default()
        });
        assert_eq!(c.read_for_guest(&mut buf).unwrap(), HostRead::Data(60));
    }

    #[test]
    fn guest_overrunning_our_buffer_is_an_error() {
        let (mut c, _host) = pair();
        // The host never reads, so data piles up in the socket and then in `pending`.
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..64 {
            if c.write_from_guest(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
