//! Moving frames between the queues and the backend.

use std::io::{ErrorKind, Read, Write};

use super::device::{Net, RXQ, TXQ};
use super::{MAX_PACKET, VNET_HDR_LEN};
use crate::devices::virtio::queue_util::{add_used, pop, MAX_CHAINS_PER_EVENT};

impl Net {
    /// Sends the guest's frames to the backend. Frames the backend cannot take right now
    /// are dropped, as a NIC would.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mut frame = Vec::with_capacity(MAX_PACKET);
        active.serve(TXQ, |chain, mem| {
            if let Ok(mut reader) = chain.reader(mem) {
                let len = reader.available_bytes();
                if (VNET_HDR_LEN..=MAX_PACKET).contains(&len) {
                    frame.resize(len, 0);
                    if reader.read_exact(&mut frame).is_ok() {
                        if let Err(e) = self.backend.write(&frame) {
                            log::debug!("net: tx frame dropped: {e}");
                        }
                    }
                }
            }
            0
        });
    }

    /// Delivers backend frames into the guest's rx buffers.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut buf = vec![0u8; MAX_PACKET];
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let frame = match self.pending.take() {
                Some(f) => f,
                None if self.readable => match self.backend.read(&mut buf) {
                    Ok(n) if n >= VNET_HDR_LEN => buf[..n].to_vec(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        // WouldBlock (or a broken backend): wait for the next edge.
                        self.readable = false;
                        return;
                    }
                },
                None => return,
            };
            let Some(chain) = pop(&mut active.queues[RXQ], &mem) else {
                // No buffer: keep the frame until the guest posts one.
                self.pending = Some(frame);
                return;
            };
            let head = chain.head_index();
            let mut frame = frame;
            // num_buffers = 1: we never merge buffers.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let len = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => {
                    w.write_all(&frame).map_or(0, |_| frame.len() as u32)
                }
                Ok(_) => {
                    log::debug!("net: rx buffer smaller than a {} byte frame", frame.len());
                    0
                }
                Err(_) => 0,
            };
            add_used(&mut active.queues[RXQ], &mem, &active.irq, head, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    fn setup() -> (Net, VirtQ, VirtQ, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // SAFETY: the fd was just taken out of `a`, so the File is its only owner.
        let backend = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
        let mut dev = Net::new(backend, [2, 0, 0, 0, 0, 1]);
        let mem = memory();
        let rx = VirtQ::new(&mem, 0x1000, 16);
        let tx = VirtQ::new(&mem, 0x4000, 16);
        let (ctx, _e) = activate_ctx(&mem, vec![rx.queue(), tx.queue()]);
        dev.activate(0, ctx).unwrap();
        (dev, rx, tx, b)
    }

    #[test]
    fn frames_flow_both_ways() {
        let (mut dev, rx, tx, peer) = setup();
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(b"ethernet-frame-from-guest");
        tx.mem.write_slice(&pkt, GuestAddress(DATA_BASE)).unwrap();
        tx.desc(0, DATA_BASE, 6, F_NEXT, 1);
        tx.desc(1, DATA_BASE + 6, pkt.len() as u32 - 6, 0, 0);
        tx.publish(0);
        dev.handle_event(TXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        let mut got = [0u8; 128];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &pkt[..]);

        let mut inbound = vec![0u8; VNET_HDR_LEN];
        inbound.extend_from_slice(b"frame-to-guest");
        peer.send(&inbound).unwrap();
        // No rx buffer yet: the frame waits.
        dev.handle_event(
            super::super::device::TOKEN_BACKEND,
            vmm_sys_util::epoll::EventSet::IN,
        );
        assert_eq!(rx.used_idx(), 0);
        rx.desc(0, DATA_BASE + 0x1000, 2048, F_WRITE, 0);
        rx.publish(0);
        dev.handle_event(RXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        assert_eq!(rx.used_elem(0), (0, inbound.len() as u32));
        let mut back = vec![0u8; inbound.len()];
        rx.mem
            .read_slice(&mut back, GuestAddress(DATA_BASE + 0x1000))
            .unwrap();
        assert_eq!(&back[VNET_HDR_LEN..], b"frame-to-guest");
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 1, "num_buffers");
    }

    #[test]
    fn malformed_chains_are_dropped() {
        let (mut dev, rx, tx, peer) = setup();
        peer.set_nonblocking(true).unwrap();
        // tx: shorter than a header, huge, outside memory, device-writable only.
        for (addr, len, flags) in [
            (DATA_BASE, 4, 0),
            (DATA_BASE, u32::MAX, 0),
            (MEM_SIZE - 8, 64, 0),
            (DATA_BASE, 64, F_WRITE),
        ] {
            tx.desc(0, addr, len, flags, 0);
            tx.publish(0);
            dev.handle_event(TXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        }
        let mut got = [0u8; 128];
        assert!(peer.recv(&mut got).is_err(), "a malformed frame was sent");
        assert_eq!(tx.used_idx(), 4);
        // rx: a buffer too small for the frame, and one that is device-readable.
        let mut inbound = vec![0u8; VNET_HDR_LEN];
        inbound.extend_from_slice(&[7u8; 100]);
        peer.send(&inbound).unwrap();
        rx.desc(0, DATA_BASE, 20, F_WRITE, 0);
        rx.publish(0);
        rx.desc(1, DATA_BASE, 2048, 0, 0);
        rx.publish(1);
        dev.handle_event(RXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        assert_eq!(rx.used_elem(0).1, 0);
    }
}
