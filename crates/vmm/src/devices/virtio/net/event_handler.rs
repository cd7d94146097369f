//! Moving frames between the queues and the backend. Everything here reads guest-written
//! rings and descriptors: lengths are checked against [`MAX_PACKET`], buffers go through
//! virtio-queue's checked Reader/Writer (guest memory bounds, writable/readable flags,
//! chain length capped by the queue size), and each event handles a bounded number of
//! chains. A bad chain drops its frame; nothing panics.

use std::io::{ErrorKind, Read, Write};

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{Net, RXQ, TXQ};
use super::{
    MAX_MERGED_BUFFERS, MAX_PACKET, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN,
};
use crate::devices::virtio::queue_util::{chain_is_complete, pop, undo_pop, MAX_CHAINS_PER_EVENT};
use crate::devices::virtio::{ActivateContext, INT_VRING};

/// virtio_net_hdr flags: the checksum is partial (csum_start/csum_offset are set).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// gso_type values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// Whether a guest-built header asks only for offloads that were negotiated (`acked`). The
/// tap checks the offsets itself and refuses inconsistent ones.
pub(super) fn tx_header_allowed(acked: u64, hdr: &[u8]) -> bool {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let (flags, gso) = (hdr[0], hdr[1]);
    if flags & !HDR_F_NEEDS_CSUM != 0 {
        return false;
    }
    if flags & HDR_F_NEEDS_CSUM != 0 && !has(VIRTIO_NET_F_CSUM) {
        return false;
    }
    match gso {
        GSO_NONE => true,
        GSO_TCPV4 => has(VIRTIO_NET_F_HOST_TSO4),
        GSO_TCPV6 => has(VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    }
}

impl Net {
    /// Sends the guest's frames to the backend. Frames the backend cannot take right now,
    /// and malformed ones, are dropped, as a NIC would.
    pub(super) fn process_tx(&mut self) {
        let acked = self.acked;
        let vnet_hdr = self.tap.vnet_hdr;
        let tap = &self.tap.file;
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mut frame = Vec::with_capacity(MAX_PACKET);
        active.serve(TXQ, |chain, mem| {
            if !chain_is_complete(&chain) {
                log::debug!("net: truncated (looping or broken) tx chain dropped");
                return 0;
            }
            let Ok(mut reader) = chain.reader(mem) else {
                return 0;
            };
            let len = reader.available_bytes();
            if !(VNET_HDR_LEN..=MAX_PACKET).contains(&len) {
                log::debug!("net: tx chain of {len} bytes dropped");
                return 0;
            }
            frame.resize(len, 0);
            if reader.read_exact(&mut frame).is_err()
                || !tx_header_allowed(acked, &frame[..VNET_HDR_LEN])
            {
                log::debug!("net: malformed tx frame dropped");
                return 0;
            }
            let bytes = if vnet_hdr {
                &frame[..]
            } else {
                &frame[VNET_HDR_LEN..]
            };
            if let Err(e) = (&*tap).write(bytes) {
                log::debug!("net: tx frame dropped: {e}");
            }
            0
        });
    }

    /// Reads the next frame from the backend into `rx_buf` (header first, zeroed if the tap
    /// has none); returns its length, or None when there is nothing to read.
    fn read_frame(&mut self) -> Option<usize> {
        self.rx_buf.resize(MAX_PACKET, 0);
        loop {
            let at = if self.tap.vnet_hdr { 0 } else { VNET_HDR_LEN };
            match (&self.tap.file).read(&mut self.rx_buf[at..]) {
                Ok(n) if at + n >= VNET_HDR_LEN && n > 0 => {
                    if at > 0 {
                        self.rx_buf[..at].fill(0);
                    }
                    return Some(at + n);
                }
                // Empty or shorter than a header: not a frame.
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        log::debug!("net: backend read: {e}");
                    }
                    // Wait for the next edge.
                    self.readable = false;
                    return None;
                }
            }
        }
    }

    /// Delivers backend frames into the guest's rx buffers, at most
    /// [`MAX_CHAINS_PER_EVENT`] per call; with work left it reschedules itself.
    pub(super) fn process_rx(&mut self) {
        if !self.state.is_activated() {
            return;
        }
        let merge = self.has(VIRTIO_NET_F_MRG_RXBUF);
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let pending = self.pending.take();
            let len = match &pending {
                Some(f) => f.len(),
                None if self.readable => match self.read_frame() {
                    Some(n) => n,
                    None => return,
                },
                None => return,
            };
            let frame: &[u8] = match &pending {
                Some(f) => f,
                None => &self.rx_buf[..len],
            };
            let Some(active) = self.state.active_mut() else {
                return;
            };
            if let Delivery::NoBuffers = deliver(active, frame, merge) {
                self.pending = Some(pending.unwrap_or_else(|| self.rx_buf[..len].to_vec()));
                return;
            }
        }
        // Budget spent with frames possibly left: come back through the event loop.
        if self.readable || self.pending.is_some() {
            let _ = self.reschedule.write(1);
        }
    }
}

/// What delivering one frame to the guest did.
enum Delivery {
    /// Written, or dropped as undeliverable with its buffers returned.
    Done,
    /// Not enough buffers posted: keep the frame for later.
    NoBuffers,
}

/// Writes `frame` (header first) into the rx queue: one chain, or with MRG_RXBUF as many
/// as it takes (at most [`MAX_MERGED_BUFFERS`]), `num_buffers` set in the header.
fn deliver(active: &mut ActivateContext, frame: &[u8], merge: bool) -> Delivery {
    let mem = active.mem.clone();
    let max = if merge { MAX_MERGED_BUFFERS } else { 1 };
    let mut chains: Vec<DescriptorChain<&GuestMemoryMmap>> = Vec::new();
    let mut capacity = 0usize;
    let mut broken = false;
    while capacity < frame.len() && chains.len() < max {
        let Some(chain) = pop(&mut active.queues[RXQ], &mem) else {
            // Put the ones taken back: the frame waits for the guest to post more.
            for _ in 0..chains.len() {
                undo_pop(&mut active.queues[RXQ]);
            }
            return Delivery::NoBuffers;
        };
        match chain.clone().writer(&mem) {
            Ok(w) if chain_is_complete(&chain) => {
                capacity = capacity.saturating_add(w.available_bytes())
            }
            _ => broken = true,
        }
        chains.push(chain);
        if broken {
            break;
        }
    }
    let mut used: Vec<(u16, u32)> = Vec::with_capacity(chains.len());
    if broken || capacity < frame.len() || (merge && !first_holds_header(&chains, &mem)) {
        log::debug!(
            "net: rx buffers ({capacity} bytes in {} chains) unusable for a {} byte frame",
            chains.len(),
            frame.len()
        );
        used.extend(chains.iter().map(|c| (c.head_index(), 0)));
    } else {
        let mut header = [0u8; VNET_HDR_LEN];
        header.copy_from_slice(&frame[..VNET_HDR_LEN]);
        header[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut rest: &[u8] = &frame[VNET_HDR_LEN..];
        for (i, chain) in chains.iter().enumerate() {
            let mut written = 0usize;
            if let Ok(mut w) = chain.clone().writer(&mem) {
                if i == 0 && w.write_all(&header).is_ok() {
                    written = VNET_HDR_LEN;
                }
                let n = rest.len().min(w.available_bytes());
                if w.write_all(&rest[..n]).is_ok() {
                    written += n;
                    rest = &rest[n..];
                }
            }
            used.push((chain.head_index(), written as u32));
        }
    }
    let queue = &mut active.queues[RXQ];
    for (head, len) in used {
        if let Err(e) = queue.add_used(&mem, head, len) {
            log::warn!("net: cannot add used descriptor {head}: {e}");
        }
    }
    if queue.needs_notification(&mem).unwrap_or(true) {
        active.irq.trigger(INT_VRING);
    }
    Delivery::Done
}

/// Whether the first chain of a merged frame holds the whole header (the spec requires it).
fn first_holds_header(chains: &[DescriptorChain<&GuestMemoryMmap>], mem: &GuestMemoryMmap) -> bool {
    chains
        .first()
        .and_then(|c| c.clone().writer(mem).ok())
        .is_some_and(|w| w.available_bytes() >= VNET_HDR_LEN)
}

#[cfg(test)]
mod tests {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    use std::os::unix::net::UnixDatagram;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::EventSet;

    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    fn setup() -> (Net, VirtQ, VirtQ, UnixDatagram) {
        setup_with(true, 0)
    }

    /// A device over a datagram socket pair (with or without vnet headers), activated with
    /// `features`.
    fn setup_with(vnet_hdr: bool, features: u64) -> (Net, VirtQ, VirtQ, UnixDatagram) {
        setup_sized(vnet_hdr, features, 16)
    }

    fn setup_sized(vnet_hdr: bool, features: u64, size: u16) -> (Net, VirtQ, VirtQ, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        // SAFETY: the fd was just taken out of `a`, so the File is its only owner.
        let backend = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
        let tap = crate::devices::virtio::net::tap::Tap::fake(backend, vnet_hdr, true);
        let mut dev = Net::new(tap, [2, 0, 0, 0, 0, 1], None).unwrap();
        let mem = memory();
        let rx = VirtQ::new(&mem, 0x1000, size);
        let tx = VirtQ::new(&mem, 0x8000, size);
        let (ctx, _e) = activate_ctx(&mem, vec![rx.queue(), tx.queue()]);
        dev.activate(features, ctx).unwrap();
        b.set_nonblocking(true).unwrap();
        (dev, rx, tx, b)
    }

    fn send_tx(dev: &mut Net, tx: &VirtQ, pkt: &[u8]) {
        tx.mem.write_slice(pkt, GuestAddress(DATA_BASE)).unwrap();
        tx.desc(0, DATA_BASE, pkt.len() as u32, 0, 0);
        tx.publish(0);
        dev.handle_event(TXQ as u32, EventSet::IN);
    }

    #[test]
    fn offload_headers_pass_only_when_negotiated() {
        let mut tso = vec![0u8; VNET_HDR_LEN];
        tso[0] = HDR_F_NEEDS_CSUM;
        tso[1] = GSO_TCPV4;
        tso.extend_from_slice(&[9u8; 200]);
        let mut got = [0u8; 512];
        // Not negotiated: dropped.
        let (mut dev, _rx, tx, peer) = setup();
        send_tx(&mut dev, &tx, &tso);
        assert!(
            peer.recv(&mut got).is_err(),
            "an unnegotiated TSO frame went out"
        );
        // Negotiated: passed through with its header unchanged.
        let f = crate::devices::virtio::net::offered_features(true, true, false);
        let (mut dev, _rx, tx, peer) = setup_with(true, f);
        send_tx(&mut dev, &tx, &tso);
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &tso[..]);
        // Unknown flags or GSO types: dropped even when offloads are on.
        for (flags, gso) in [(0x80, 0), (0, 3), (0, 0x81)] {
            let mut bad = tso.clone();
            bad[0] = flags;
            bad[1] = gso;
            send_tx(&mut dev, &tx, &bad);
            assert!(
                peer.recv(&mut got).is_err(),
                "flags {flags:#x} gso {gso:#x} went out"
            );
        }
    }

    #[test]
    fn a_tap_without_vnet_header_gets_it_stripped_and_added() {
        let (mut dev, rx, tx, peer) = setup_with(false, 0);
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend_from_slice(b"plain-frame");
        send_tx(&mut dev, &tx, &pkt);
        let mut got = [0u8; 128];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], b"plain-frame");
        peer.send(b"inbound-plain").unwrap();
        dev.handle_event(super::super::device::TOKEN_BACKEND, EventSet::IN);
        rx.desc(0, DATA_BASE + 0x1000, 2048, F_WRITE, 0);
        rx.publish(0);
        dev.handle_event(RXQ as u32, EventSet::IN);
        let len = VNET_HDR_LEN + b"inbound-plain".len();
        assert_eq!(rx.used_elem(0), (0, len as u32));
        let mut back = vec![0u8; len];
        rx.mem
            .read_slice(&mut back, GuestAddress(DATA_BASE + 0x1000))
            .unwrap();
        assert_eq!(&back[..10], &[0u8; 10], "a zeroed header");
        assert_eq!(&back[VNET_HDR_LEN..], b"inbound-plain");
    }

    #[test]
    fn mergeable_buffers_take_a_frame_across_chains() {
        let f = 1u64 << crate::devices::virtio::net::VIRTIO_NET_F_MRG_RXBUF;
        let (mut dev, rx, _tx, peer) = setup_with(true, f);
        let mut inbound = vec![0u8; VNET_HDR_LEN];
        inbound.extend((0..250u32).map(|i| i as u8));
        peer.send(&inbound).unwrap();
        dev.handle_event(super::super::device::TOKEN_BACKEND, EventSet::IN);
        // Two 100-byte buffers are not enough for 262 bytes: the frame waits, nothing used.
        rx.desc(0, DATA_BASE, 100, F_WRITE, 0);
        rx.publish(0);
        rx.desc(1, DATA_BASE + 0x100, 100, F_WRITE, 0);
        rx.publish(1);
        dev.handle_event(RXQ as u32, EventSet::IN);
        assert_eq!(rx.used_idx(), 0);
        rx.desc(2, DATA_BASE + 0x200, 100, F_WRITE, 0);
        rx.publish(2);
        dev.handle_event(RXQ as u32, EventSet::IN);
        assert_eq!(rx.used_idx(), 3);
        assert_eq!(
            [rx.used_elem(0), rx.used_elem(1), rx.used_elem(2)],
            [(0, 100), (1, 100), (2, 62)]
        );
        let mut back = vec![0u8; 262];
        for (i, at) in [0u64, 0x100, 0x200].iter().enumerate() {
            let n = if i == 2 { 62 } else { 100 };
            rx.mem
                .read_slice(
                    &mut back[i * 100..i * 100 + n],
                    GuestAddress(DATA_BASE + at),
                )
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([back[10], back[11]]), 3, "num_buffers");
        assert_eq!(&back[VNET_HDR_LEN..], &inbound[VNET_HDR_LEN..]);
    }

    #[test]
    fn merged_frames_need_a_header_sized_first_buffer_and_few_chains() {
        let f = 1u64 << crate::devices::virtio::net::VIRTIO_NET_F_MRG_RXBUF;
        let (mut dev, rx, _tx, peer) = setup_with(true, f);
        peer.send(&[0u8; 40]).unwrap();
        dev.handle_event(super::super::device::TOKEN_BACKEND, EventSet::IN);
        // A first buffer of 4 bytes cannot hold the header: dropped, buffers returned.
        rx.desc(0, DATA_BASE, 4, F_WRITE, 0);
        rx.publish(0);
        rx.desc(1, DATA_BASE + 0x100, 100, F_WRITE, 0);
        rx.publish(1);
        dev.handle_event(RXQ as u32, EventSet::IN);
        assert_eq!(rx.used_idx(), 2);
        assert_eq!([rx.used_elem(0), rx.used_elem(1)], [(0, 0), (1, 0)]);
        // A frame that would need more than MAX_MERGED_BUFFERS one-byte buffers: dropped,
        // exactly that many buffers returned.
        let (mut dev, rx, _tx, peer) = setup_sized(true, f, 128);
        peer.send(&[0u8; 1000]).unwrap();
        dev.handle_event(super::super::device::TOKEN_BACKEND, EventSet::IN);
        for i in 0..70u16 {
            rx.desc(i, DATA_BASE + u64::from(i) * 16, 1, F_WRITE, 0);
            rx.publish(i);
        }
        dev.handle_event(RXQ as u32, EventSet::IN);
        let max = crate::devices::virtio::net::MAX_MERGED_BUFFERS as u16;
        assert_eq!(rx.used_idx(), max);
        assert!((0..max).all(|i| rx.used_elem(i).1 == 0));
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
        // Too long a chain (a loop): virtio-queue caps it at the queue size.
        tx.desc(0, DATA_BASE, 64, F_NEXT, 0);
        tx.publish(0);
        dev.handle_event(TXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        assert!(peer.recv(&mut got).is_err(), "a looping chain was sent");
        rx.desc(0, DATA_BASE, 20, F_WRITE, 0);
        rx.publish(0);
        rx.desc(1, DATA_BASE, 2048, 0, 0);
        rx.publish(1);
        dev.handle_event(RXQ as u32, vmm_sys_util::epoll::EventSet::IN);
        assert_eq!(rx.used_elem(0).1, 0);
    }
}
