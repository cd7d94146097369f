//! The host side of hybrid vsock: the listening socket, handshakes, and the table of
//! connections keyed by (host port, guest port).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, HostRead, State};
use super::packet::*;
use super::{HOST_CID, MAX_CONNECTIONS};
use crate::devices::virtio::{Poller, DEVICE_TOKEN_BASE};

/// Token of the listening socket.
pub const TOKEN_LISTENER: u32 = DEVICE_TOKEN_BASE;
/// Token of the handshake timer.
pub const TOKEN_TIMER: u32 = DEVICE_TOKEN_BASE + 1;
/// First token of host streams.
pub(super) const FIRST_STREAM_TOKEN: u32 = DEVICE_TOKEN_BASE + 2;
/// How long a host connection may wait for its `CONNECT` line, and then for the guest's
/// answer, before it is closed (the guest's vsock driver may not be up yet, or stuck).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
/// Most control packets queued for the guest (a guest that posts no rx buffers while
/// flooding requests gets the excess dropped).
const MAX_CTRL_QUEUE: usize = 4096;
/// First host port given to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// (host port, guest port).
type Key = (u32, u32);

#[derive(Debug)]
enum Owner {
    /// Accepted at the given time, `CONNECT` line not complete yet.
    Handshake(UnixStream, Vec<u8>, Instant),
    /// A connection in the table.
    Conn(Key),
}

/// The connection multiplexer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    conns: BTreeMap<Key, Connection>,
    owners: HashMap<u32, Owner>,
    ctrl: VecDeque<Header>,
    next_token: u32,
    next_host_port: u32,
    cursor: Key,
    timer: TimerFd,
    /// Handshake deadline (a field so tests can shorten it).
    pub(super) handshake_timeout: Duration,
}

impl Muxer {
    /// Listens on `uds` for host connections.
    pub fn new(guest_cid: u64, uds: PathBuf) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(&uds);
        let listener = UnixListener::bind(&uds)?;
        listener.set_nonblocking(true)?;
        let timer = TimerFd::new().map_err(std::io::Error::from)?;
        // SAFETY: F_SETFL on a timerfd we own; a spurious event then never blocks the loop.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Muxer {
            guest_cid,
            uds,
            listener,
            conns: BTreeMap::new(),
            owners: HashMap::new(),
            ctrl: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            cursor: (0, 0),
            timer,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The handshake timer fd (registered by the device on activation).
    pub fn timer_fd(&self) -> std::os::unix::io::RawFd {
        self.timer.as_raw_fd()
    }

    fn arm_timer(&mut self) {
        if !self.timer.is_armed().unwrap_or(true) {
            // Half the timeout: a stale handshake lives at most 1.5 timeouts.
            if let Err(e) = self.timer.reset(self.handshake_timeout / 2, None) {
                log::warn!("vsock: cannot arm the handshake timer: {e}");
            }
        }
    }

    /// Closes host connections whose handshake took too long; the guest side of one
    /// still waiting for a RESPONSE gets a RST.
    pub fn expire_handshakes(&mut self, poller: &Poller) {
        let _ = self.timer.wait();
        let timeout = self.handshake_timeout;
        let stale_handshakes: Vec<u32> = self
            .owners
            .iter()
            .filter_map(|(t, o)| match o {
                Owner::Handshake(_, _, since) if since.elapsed() >= timeout => Some(*t),
                _ => None,
            })
            .collect();
        for t in stale_handshakes {
            if let Some(Owner::Handshake(s, _, _)) = self.owners.remove(&t) {
                poller.remove(s.as_raw_fd());
            }
        }
        let stale_conns: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting && c.since.elapsed() >= timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in stale_conns {
            log::debug!(
                "vsock: guest did not answer CONNECT to port {} in time",
                key.1
            );
            self.remove(key, poller);
            self.send_rst(key);
        }
        let pending = self
            .owners
            .values()
            .any(|o| matches!(o, Owner::Handshake(..)))
            || self.conns.values().any(|c| c.state == State::Connecting);
        if pending {
            self.arm_timer();
        }
    }

    /// The listener fd (registered by the device on activation).
    pub fn listener_fd(&self) -> std::os::unix::io::RawFd {
        self.listener.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(FIRST_STREAM_TOKEN);
            if !self.owners.contains_key(&t) {
                return t;
            }
        }
    }

    fn push_ctrl(&mut self, hdr: Header) {
        if self.ctrl.len() < MAX_CTRL_QUEUE {
            self.ctrl.push_back(hdr);
        }
    }

    fn to_guest(&self, key: Key, op: u16) -> Header {
        header((HOST_CID, key.0), (self.guest_cid, key.1), op)
    }

    fn send_rst(&mut self, key: Key) {
        let mut h = self.to_guest(key, OP_RST);
        h.buf_alloc = 0;
        self.push_ctrl(h);
    }

    fn remove(&mut self, key: Key, poller: &Poller) {
        if let Some(c) = self.conns.remove(&key) {
            poller.remove(c.stream.as_raw_fd());
            self.owners.remove(&c.token);
        }
    }

    /// Accepts host connections; each must then send its `CONNECT` line.
    pub fn accept(&mut self, poller: &Poller) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.owners.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            let ev = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
            if poller.add(stream.as_raw_fd(), token, ev).is_ok() {
                self.owners
                    .insert(token, Owner::Handshake(stream, Vec::new(), Instant::now()));
                self.arm_timer();
                self.handshake(token, poller);
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line byte by byte (so no data after it is consumed).
    fn handshake(&mut self, token: u32, poller: &Poller) {
        let Some(Owner::Handshake(stream, line, _)) = self.owners.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(line),
                Ok(1) if line.len() < MAX_HANDSHAKE => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break None,
            }
        };
        let Some(Owner::Handshake(stream, _, _)) = self.owners.remove(&token) else {
            return;
        };
        let Some(guest_port) = port else {
            poller.remove(stream.as_raw_fd());
            return;
        };
        let host_port = self.alloc_host_port();
        let key = (host_port, guest_port);
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if poller.modify(stream.as_raw_fd(), token, ev).is_err() {
            return;
        }
        self.conns
            .insert(key, Connection::new(stream, token, State::Connecting));
        self.owners.insert(token, Owner::Conn(key));
        let mut req = self.to_guest(key, OP_REQUEST);
        if let Some(c) = self.conns.get_mut(&key) {
            c.stamp(&mut req);
        }
        self.push_ctrl(req);
    }

    /// The host port the next host-initiated connection gets (saved in snapshots).
    pub fn next_host_port(&self) -> u32 {
        self.next_host_port
    }

    /// Continues host port numbers from a snapshot's [`Self::next_host_port`]. A restored
    /// guest still holds the snapshot's connections until it has processed the transport
    /// reset; a new connection that reused one of their host ports could reach the guest
    /// first and be taken for a packet of that old connection (dropped, unanswered until
    /// the handshake timeout).
    pub fn continue_host_ports_from(&mut self, port: u32) {
        self.next_host_port = port.max(FIRST_HOST_PORT);
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.keys().any(|(h, _)| *h == p) {
                return p;
            }
        }
    }

    /// A host stream (or handshake) is ready.
    pub fn stream_event(&mut self, token: u32, events: EventSet, poller: &Poller) {
        let key = match self.owners.get(&token) {
            Some(Owner::Handshake(..)) => return self.handshake(token, poller),
            Some(Owner::Conn(key)) => *key,
            None => return,
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            c.readable = true;
        }
        if events.contains(EventSet::OUT) && c.flush().is_err() {
            self.remove(key, poller);
            self.send_rst(key);
            return;
        }
        if c.state == State::Connecting && c.readable {
            // Host gave up before the guest answered? A read of 0 tells.
            let mut peek = [0u8; 1];
            // SAFETY: recv with MSG_PEEK into a valid 1-byte buffer on an owned socket.
            let n = unsafe {
                libc::recv(
                    c.stream.as_raw_fd(),
                    peek.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                self.remove(key, poller);
                self.send_rst(key);
            }
        }
    }

    /// A packet from the guest (already validated as addressed from our guest to the host).
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8], poller: &Poller) {
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.send_rst(key);
            }
            return;
        }
        if hdr.op == OP_REQUEST {
            return self.guest_connect(key, hdr, poller);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.send_rst(key);
            }
            return;
        };
        c.update_peer_credit(hdr);
        match hdr.op {
            OP_RESPONSE if c.state == State::Connecting => {
                let ok = format!("OK {}\n", key.0);
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.remove(key, poller);
                    self.send_rst(key);
                    return;
                }
                c.state = State::Established;
                c.readable = true;
            }
            OP_RW if c.state == State::Established => {
                if c.write_from_guest(payload).is_err() {
                    self.remove(key, poller);
                    self.send_rst(key);
                }
            }
            OP_CREDIT_REQUEST => c.credit_update_due = true,
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                // Best effort: hand over what the guest sent, then close both ways.
                let _ = c.flush();
                self.remove(key, poller);
                self.send_rst(key);
            }
            OP_RST => self.remove(key, poller),
            _ => {
                self.remove(key, poller);
                self.send_rst(key);
            }
        }
    }

    fn guest_connect(&mut self, key: Key, hdr: &Header, poller: &Poller) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            return self.send_rst(key);
        }
        let path = format!("{}_{}", self.uds.display(), key.0);
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                log::debug!(
                    "vsock: guest connection to host port {} refused ({path})",
                    key.0
                );
                return self.send_rst(key);
            }
        };
        let token = self.alloc_token();
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if poller.add(stream.as_raw_fd(), token, ev).is_err() {
            return self.send_rst(key);
        }
        let mut c = Connection::new(stream, token, State::Established);
        c.update_peer_credit(hdr);
        let mut resp = self.to_guest(key, OP_RESPONSE);
        c.stamp(&mut resp);
        self.conns.insert(key, c);
        self.owners.insert(token, Owner::Conn(key));
        self.push_ctrl(resp);
    }

    /// Whether anything may be waiting for the guest's rx queue.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.wants_rx() || c.needs_credit())
    }

    /// The next packet for the guest: a header, with its payload in `buf` (at most `max`
    /// bytes). None when there is nothing to send.
    pub fn next_rx(&mut self, max: usize, buf: &mut Vec<u8>, poller: &Poller) -> Option<Header> {
        buf.clear();
        if let Some(h) = self.ctrl.pop_front() {
            return Some(h);
        }
        // Round-robin over connections, starting after the last one served.
        let keys: Vec<Key> = self
            .conns
            .range((
                std::ops::Bound::Excluded(self.cursor),
                std::ops::Bound::Unbounded,
            ))
            .chain(self.conns.range(..=self.cursor))
            .filter(|(_, c)| c.wants_rx() || c.needs_credit())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let guest_cid = self.guest_cid;
            let c = self.conns.get_mut(&key)?;
            let mut hdr = header((HOST_CID, key.0), (guest_cid, key.1), OP_RW);
            if c.needs_credit() {
                c.credit_requested = true;
                hdr.op = OP_CREDIT_REQUEST;
                c.stamp(&mut hdr);
                self.cursor = key;
                return Some(hdr);
            }
            if c.readable && c.peer_credit() > 0 && max > 0 {
                buf.resize(max, 0);
                match c.read_for_guest(buf) {
                    Ok(HostRead::Data(n)) => {
                        buf.truncate(n);
                        hdr.len = n as u32;
                        c.stamp(&mut hdr);
                        self.cursor = key;
                        return Some(hdr);
                    }
                    Ok(HostRead::WouldBlock) => buf.clear(),
                    Ok(HostRead::Eof) => {
                        buf.clear();
                        hdr.op = OP_SHUTDOWN;
                        hdr.flags = SHUTDOWN_BOTH;
                        c.stamp(&mut hdr);
                        self.remove(key, poller);
                        return Some(hdr);
                    }
                    Err(()) => {
                        buf.clear();
                        self.remove(key, poller);
                        hdr.op = OP_RST;
                        return Some(hdr);
                    }
                }
            }
            let c = self.conns.get_mut(&key)?;
            if c.credit_update_due {
                hdr.op = OP_CREDIT_UPDATE;
                c.stamp(&mut hdr);
                self.cursor = key;
                return Some(hdr);
            }
        }
        None
    }

    /// Drops every connection (device reset).
    pub fn clear(&mut self, poller: &Poller) {
        for c in self.conns.values() {
            poller.remove(c.stream.as_raw_fd());
        }
        for o in self.owners.values() {
            if let Owner::Handshake(s, _, _) = o {
                poller.remove(s.as_raw_fd());
            }
        }
        self.conns.clear();
        self.owners.clear();
        self.ctrl.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    }
}
