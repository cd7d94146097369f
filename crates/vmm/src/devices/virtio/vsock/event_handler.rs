//! Moving packets between the queues and the muxer.

use std::io::{Read, Write};

use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVQ, RXQ, TXQ};
use super::muxer::{TOKEN_LISTENER, TOKEN_TIMER};
use super::packet::{Header, EVENT_TRANSPORT_RESET, HEADER_LEN, MAX_PAYLOAD};
use super::HOST_CID;
use crate::devices::virtio::queue_util::{add_used, pop, undo_pop, MAX_CHAINS_PER_EVENT};

impl Vsock {
    pub(super) fn handle(&mut self, token: u32, events: EventSet) {
        let Some(active) = self.state.active() else {
            return;
        };
        let poller = active.poller.clone();
        match token {
            t if t == RXQ as u32 => {}
            t if t == TXQ as u32 => self.process_tx(),
            t if t == EVQ as u32 => {}
            TOKEN_LISTENER => self.muxer.accept(&poller),
            TOKEN_TIMER => self.muxer.expire_handshakes(&poller),
            t => self.muxer.stream_event(t, events, &poller),
        }
        self.process_rx();
    }

    /// Takes packets the guest sent.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let poller = active.poller.clone();
        let mut payload = Vec::new();
        active.serve(TXQ, |chain, mem| {
            match chain.reader(mem) {
                Ok(mut reader) => {
                    if let Ok(hdr) = reader.read_obj::<Header>() {
                        let len = hdr.len;
                        let ok_addr = hdr.src_cid == self.cid && hdr.dst_cid == HOST_CID;
                        // A payload shorter than the header says is malformed: drop it
                        // rather than forward a truncated stream.
                        let fits = len <= MAX_PAYLOAD && len as usize <= reader.available_bytes();
                        payload.resize(if fits { len as usize } else { 0 }, 0);
                        if ok_addr && fits && reader.read_exact(&mut payload).is_ok() {
                            self.muxer.guest_packet(&hdr, &payload, &poller);
                        } else {
                            log::debug!("vsock: dropped malformed tx packet");
                        }
                    }
                }
                Err(e) => log::debug!("vsock: bad tx chain: {e}"),
            }
            0
        });
    }

    /// Delivers pending packets into the guest's rx buffers.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut buf = Vec::new();
        for _ in 0..MAX_CHAINS_PER_EVENT {
            if !self.muxer.has_rx() {
                break;
            }
            let Some(chain) = pop(&mut active.queues[RXQ], &mem) else {
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&mem) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                _ => {
                    log::debug!("vsock: rx buffer unusable");
                    add_used(&mut active.queues[RXQ], &mem, &active.irq, head, 0);
                    continue;
                }
            };
            let max = (writer.available_bytes() - HEADER_LEN).min(MAX_PAYLOAD as usize);
            let Some(hdr) = self.muxer.next_rx(max, &mut buf, &active.poller) else {
                undo_pop(&mut active.queues[RXQ]);
                break;
            };
            let len = if writer.write_obj(hdr).is_ok() && writer.write_all(&buf).is_ok() {
                (HEADER_LEN + buf.len()) as u32
            } else {
                0
            };
            add_used(&mut active.queues[RXQ], &mem, &active.irq, head, len);
        }
    }

    /// Tells the guest that every connection is gone (after a restore).
    pub(super) fn send_transport_reset(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        if let Some(chain) = pop(&mut active.queues[EVQ], &mem) {
            let head = chain.head_index();
            let len = match chain.writer(&mem) {
                Ok(mut w) => w.write_obj(EVENT_TRANSPORT_RESET).map_or(0, |_| 4),
                Err(_) => 0,
            };
            add_used(&mut active.queues[EVQ], &mem, &active.irq, head, len);
            self.reset_pending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    use vm_memory::{Bytes, GuestAddress};

    use super::super::packet::*;
    use super::*;
    use crate::config::VsockConfig;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    const CID: u64 = 3;
    const TX_BUF: u64 = DATA_BASE;
    const RX_BUF: u64 = DATA_BASE + 0x10000;

    struct Fixture {
        dev: Vsock,
        rx: VirtQ,
        tx: VirtQ,
        dir: tempfile::TempDir,
        _epoll: std::sync::Arc<vmm_sys_util::epoll::Epoll>,
    }

    fn setup() -> Fixture {
        setup_restored(None)
    }

    /// A device activated fresh, or restored from `state` (a `save_state`).
    fn setup_restored(state: Option<&serde_json::Value>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = Vsock::new(&VsockConfig {
            uds: dir.path().join("v.sock"),
            cid: CID as u32,
        })
        .unwrap();
        if let Some(state) = state {
            dev.restore_state(state);
        }
        let mem = memory();
        let rx = VirtQ::new(&mem, 0x1000, 16);
        let tx = VirtQ::new(&mem, 0x4000, 16);
        let ev = VirtQ::new(&mem, 0x7000, 16);
        let (ctx, epoll) = activate_ctx(&mem, vec![rx.queue(), tx.queue(), ev.queue()]);
        dev.activate(0, ctx).unwrap();
        Fixture {
            dev,
            rx,
            tx,
            dir,
            _epoll: epoll,
        }
    }

    impl Fixture {
        fn send(&mut self, mut hdr: Header, payload: &[u8]) {
            hdr.len = payload.len() as u32;
            self.send_raw(hdr, payload, (HEADER_LEN + payload.len()) as u32);
        }

        fn send_raw(&mut self, hdr: Header, payload: &[u8], desc_len: u32) {
            self.tx.mem.write_obj(hdr, GuestAddress(TX_BUF)).unwrap();
            self.tx
                .mem
                .write_slice(payload, GuestAddress(TX_BUF + HEADER_LEN as u64))
                .unwrap();
            self.tx.desc(0, TX_BUF, desc_len, 0, 0);
            self.tx.publish(0);
            self.dev.handle(TXQ as u32, EventSet::IN);
        }

        /// Offers one rx buffer of `len` bytes; returns the packet written, if any.
        fn recv(&mut self, len: u32) -> Option<(Header, Vec<u8>)> {
            let before = self.rx.used_idx();
            self.rx.desc(0, RX_BUF, len, F_WRITE, 0);
            self.rx.publish(0);
            self.dev.handle(RXQ as u32, EventSet::IN);
            if self.rx.used_idx() == before {
                // Not consumed: take the offer back for the next call.
                let idx: u16 = self
                    .rx
                    .mem
                    .read_obj(GuestAddress(0x1000 + 16 * 16 + 2))
                    .unwrap();
                self.rx.set_avail_idx(idx.wrapping_sub(1));
                return None;
            }
            let (_, used) = self.rx.used_elem(before);
            if used == 0 {
                return Some((Header::default(), Vec::new()));
            }
            let hdr: Header = self.rx.mem.read_obj(GuestAddress(RX_BUF)).unwrap();
            let mut payload = vec![0u8; used as usize - HEADER_LEN];
            self.rx
                .mem
                .read_slice(&mut payload, GuestAddress(RX_BUF + HEADER_LEN as u64))
                .unwrap();
            Some((hdr, payload))
        }

        fn guest_hdr(&self, host_port: u32, guest_port: u32, op: u16) -> Header {
            let mut h = header((CID, guest_port), (HOST_CID, host_port), op);
            h.buf_alloc = 1 << 20;
            h
        }

        fn listen(&self, port: u32) -> UnixListener {
            UnixListener::bind(format!(
                "{}_{port}",
                self.dir.path().join("v.sock").display()
            ))
            .unwrap()
        }

        /// Delivers host-side readiness for every stream (the tests have no event loop).
        fn pump(&mut self) {
            self.dev.handle(TOKEN_LISTENER, EventSet::IN);
            for t in TOKEN_TIMER + 1..TOKEN_TIMER + 8 {
                self.dev.handle(t, EventSet::IN | EventSet::OUT);
            }
        }
    }

    #[test]
    fn guest_connect_and_data_both_ways() {
        let mut f = setup();
        let listener = f.listen(1234);
        f.send(f.guest_hdr(1234, 99, OP_REQUEST), &[]);
        let (resp, _) = f.recv(4096).unwrap();
        assert_eq!({ resp.op }, OP_RESPONSE);
        assert_eq!(({ resp.src_port }, { resp.dst_port }), (1234, 99));
        let (mut host, _) = listener.accept().unwrap();
        f.send(f.guest_hdr(1234, 99, OP_RW), b"to-host");
        let mut got = [0u8; 7];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to-host");
        host.write_all(b"to-guest").unwrap();
        f.pump();
        let (rw, data) = f.recv(4096).unwrap();
        assert_eq!({ rw.op }, OP_RW);
        assert_eq!(data, b"to-guest");
        assert_eq!({ rw.buf_alloc }, super::super::CONN_BUF_ALLOC);
    }

    #[test]
    fn host_connect_handshake() {
        let mut f = setup();
        let mut host = UnixStream::connect(f.dir.path().join("v.sock")).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        f.pump();
        let (req, _) = f.recv(4096).unwrap();
        assert_eq!({ req.op }, OP_REQUEST);
        assert_eq!({ req.dst_port }, 52);
        let host_port = req.src_port;
        f.send(f.guest_hdr(host_port, 52, OP_RESPONSE), &[]);
        let mut ok = vec![0u8; format!("OK {host_port}\n").len()];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(ok, format!("OK {host_port}\n").as_bytes());
    }

    /// The host port of a host-initiated connection (its `OP_REQUEST`'s source port).
    fn host_connect_port(f: &mut Fixture) -> u32 {
        let mut host = UnixStream::connect(f.dir.path().join("v.sock")).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        f.pump();
        loop {
            let (req, _) = f.recv(4096).unwrap();
            if { req.op } == OP_REQUEST {
                return req.src_port;
            }
        }
    }

    /// A clone's guest still holds the snapshot's connections until it has handled the
    /// transport reset: a new connection must not reuse one of their host ports.
    #[test]
    fn a_restored_device_never_reuses_the_snapshots_host_ports() {
        let mut template = setup();
        let used = [
            host_connect_port(&mut template),
            host_connect_port(&mut template),
        ];
        let state = template.dev.save_state();
        let mut clone = setup_restored(Some(&state));
        let port = host_connect_port(&mut clone);
        assert!(port > used[1] && used[1] > used[0], "{port} after {used:?}");
    }

    #[test]
    fn credit_limits_what_the_guest_receives() {
        let mut f = setup();
        let listener = f.listen(7);
        let mut h = f.guest_hdr(7, 1, OP_REQUEST);
        h.buf_alloc = 10;
        f.send(h, &[]);
        f.recv(4096).unwrap();
        let (mut host, _) = listener.accept().unwrap();
        host.write_all(&[1u8; 100]).unwrap();
        f.pump();
        let (_, data) = f.recv(4096).unwrap();
        assert_eq!(data.len(), 10, "more than the guest's credit was sent");
        let (req, _) = f.recv(4096).unwrap();
        assert_eq!({ req.op }, OP_CREDIT_REQUEST);
        assert!(
            f.recv(4096).is_none(),
            "nothing more until the guest grants credit"
        );
        let mut upd = f.guest_hdr(7, 1, OP_CREDIT_UPDATE);
        upd.buf_alloc = 10;
        upd.fwd_cnt = 10;
        f.send(upd, &[]);
        let (_, data) = f.recv(4096).unwrap();
        assert_eq!(data.len(), 10);
    }

    #[test]
    fn malformed_packets_never_panic() {
        let mut f = setup();
        let listener = f.listen(1);
        f.send(f.guest_hdr(1, 5, OP_REQUEST), &[]);
        f.recv(4096).unwrap();
        let (mut host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        // Header claims more payload than the descriptor holds.
        let mut h = f.guest_hdr(1, 5, OP_RW);
        h.len = 60000;
        f.send_raw(h, b"abc", (HEADER_LEN + 3) as u32);
        // Header claims a huge payload.
        h.len = u32::MAX;
        f.send_raw(h, b"abc", (HEADER_LEN + 3) as u32);
        // Spoofed source CID.
        let mut spoof = f.guest_hdr(1, 5, OP_RW);
        spoof.src_cid = 99;
        f.send(spoof, b"spoofed");
        // Descriptor shorter than a header, and one outside guest memory.
        f.send_raw(f.guest_hdr(1, 5, OP_RW), &[], 10);
        f.tx.desc(0, MEM_SIZE - 8, 64, 0, 0);
        f.tx.publish(0);
        f.dev.handle(TXQ as u32, EventSet::IN);
        // A descriptor loop in tx.
        f.tx.desc(0, TX_BUF, 44, F_NEXT, 1);
        f.tx.desc(1, TX_BUF, 44, F_NEXT, 0);
        f.tx.publish(0);
        f.dev.handle(TXQ as u32, EventSet::IN);
        // Device-readable rx buffer (wrong direction) and a tiny rx buffer.
        f.send(f.guest_hdr(1, 77, OP_RW), b"x"); // unknown connection: RST queued
        f.rx.desc(0, RX_BUF, 4096, 0, 0);
        f.rx.publish(0);
        f.dev.handle(RXQ as u32, EventSet::IN);
        assert_eq!(f.recv(8), Some((Header::default(), Vec::new())));
        let (rst, _) = f.recv(4096).unwrap();
        assert_eq!({ rst.op }, OP_RST);
        // None of the malformed RW packets reached the host.
        let mut buf = [0u8; 64];
        assert!(
            host.read(&mut buf).is_err(),
            "malformed data reached the host"
        );
        // The connection still works.
        f.send(f.guest_hdr(1, 5, OP_RW), b"ok");
        let mut got = [0u8; 2];
        host.set_nonblocking(false).unwrap();
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
    }

    use std::time::Duration;

    #[test]
    fn unanswered_connect_times_out() {
        let mut f = setup();
        f.dev.muxer.handshake_timeout = std::time::Duration::from_millis(20);
        let mut host = UnixStream::connect(f.dir.path().join("v.sock")).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        // A second client that never sends its CONNECT line.
        let mut silent = UnixStream::connect(f.dir.path().join("v.sock")).unwrap();
        f.pump();
        let (req, _) = f.recv(4096).unwrap();
        assert_eq!({ req.op }, OP_REQUEST);
        host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        silent
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // The guest never answers: once the timer fires, the host sees EOF and the guest a
        // RST for the half-open connection.
        let mut buf = [0u8; 8];
        let start = std::time::Instant::now();
        loop {
            f.dev.handle(TOKEN_TIMER, EventSet::IN);
            // Both stale entries are gone after 1.5 timeouts at most.
            if f.dev.connection_count() == 0 && start.elapsed() > Duration::from_millis(40) {
                break;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
        }
        assert_eq!(host.read(&mut buf).unwrap(), 0);
        assert_eq!(silent.read(&mut buf).unwrap(), 0);
        let (rst, _) = f.recv(4096).unwrap();
        assert_eq!({ rst.op }, OP_RST);
    }

    #[test]
    fn refused_guest_connect_gets_rst() {
        let mut f = setup();
        f.send(f.guest_hdr(4321, 9, OP_REQUEST), &[]);
        let (rst, _) = f.recv(4096).unwrap();
        assert_eq!({ rst.op }, OP_RST);
    }
}
