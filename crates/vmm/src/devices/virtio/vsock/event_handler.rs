//! Moving packets between the queues and the muxer.

use std::io::{Read, Write};

use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVQ, RXQ, TXQ};
use super::muxer::TOKEN_LISTENER;
use super::packet::{Header, EVENT_TRANSPORT_RESET, HEADER_LEN, MAX_PAYLOAD};
use super::HOST_CID;
use crate::devices::virtio::queue_util::{add_used, pop, undo_pop, MAX_CHAINS_PER_EVENT};

impl Vsock {
    pub(super) fn handle(&mut self, token: u32, events: EventSet) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        let poller = active.poller.clone();
        match token {
            t if t == RXQ as u32 => {}
            t if t == TXQ as u32 => self.process_tx(),
            t if t == EVQ as u32 => {}
            TOKEN_LISTENER => self.muxer.accept(&poller),
            t => self.muxer.stream_event(t, events, &poller),
        }
        self.process_rx();
    }

    /// Takes packets the guest sent.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut payload = Vec::new();
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(chain) = pop(&mut active.queues[TXQ], &mem) else {
                break;
            };
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut reader) => {
                    if let Ok(hdr) = reader.read_obj::<Header>() {
                        let len = hdr.len;
                        let ok_addr = hdr.src_cid == self.cid && hdr.dst_cid == HOST_CID;
                        let n = (len.min(MAX_PAYLOAD) as usize).min(reader.available_bytes());
                        payload.resize(n, 0);
                        if ok_addr && len <= MAX_PAYLOAD && reader.read_exact(&mut payload).is_ok()
                        {
                            self.muxer.guest_packet(&hdr, &payload, &active.poller);
                        } else {
                            log::debug!("vsock: dropped malformed tx packet");
                        }
                    }
                }
                Err(e) => log::debug!("vsock: bad tx chain: {e}"),
            }
            add_used(&mut active.queues[TXQ], &mem, &active.irq, head, 0);
        }
    }

    /// Delivers pending packets into the guest's rx buffers.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
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
        let Some(active) = self.active.as_mut() else {
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
