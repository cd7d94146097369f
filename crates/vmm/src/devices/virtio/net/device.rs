//! The network device.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::{QUEUE_SIZE, VIRTIO_NET_F_MAC};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqTrigger, Poller, VirtioDevice,
    DEVICE_TOKEN_BASE, TYPE_NET,
};

/// Token of the backend fd.
pub(super) const TOKEN_BACKEND: u32 = DEVICE_TOKEN_BASE;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// Live state after activation.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqTrigger>,
    pub poller: Poller,
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    /// Tap (or test) fd carrying one frame, with its vnet header, per read/write.
    pub(super) backend: File,
    pub(super) mac: [u8; 6],
    pub(super) active: Option<Active>,
    /// The backend may have frames to read (edge-triggered hint).
    pub(super) readable: bool,
    /// A frame read from the backend that did not fit the guest's buffers yet.
    pub(super) pending: Option<Vec<u8>>,
    queue_sizes: [u16; 2],
}

impl Net {
    /// A device over `backend` (non-blocking) with `mac`.
    pub fn new(backend: File, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            active: None,
            readable: true,
            pending: None,
            queue_sizes: [QUEUE_SIZE; 2],
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; ... }
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::QueueCount(ctx.queues.len(), 2));
        }
        let ev = EventSet::IN | EventSet::EDGE_TRIGGERED;
        ctx.poller
            .add(self.backend.as_raw_fd(), TOKEN_BACKEND, ev)
            .map_err(ActivateError::Epoll)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
            poller: ctx.poller,
        });
        self.readable = true;
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            a.poller.remove(self.backend.as_raw_fd());
        }
        self.pending = None;
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        match token {
            t if t == TXQ as u32 => self.process_tx(),
            TOKEN_BACKEND => self.readable = true,
            _ => {}
        }
        self.process_rx();
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.mac })
    }
}
