//! The network device.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use super::{QUEUE_SIZE, VIRTIO_NET_F_MAC};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    DEVICE_TOKEN_BASE, TYPE_NET,
};

/// Token of the backend fd.
pub(super) const TOKEN_BACKEND: u32 = DEVICE_TOKEN_BASE;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    /// Tap (or test) fd carrying one frame, with its vnet header, per read/write.
    pub(super) backend: File,
    pub(super) mac: [u8; 6],
    pub(super) state: VirtioDeviceState,
    /// The backend may have frames to read (edge-triggered hint).
    pub(super) readable: bool,
    /// A frame read from the backend that did not fit the guest's buffers yet.
    pub(super) pending: Option<Vec<u8>>,
}

impl Net {
    /// A device over `backend` (non-blocking) with `mac`.
    pub fn new(backend: File, mac: [u8; 6]) -> Self {
        Net {
            backend,
            mac,
            state: VirtioDeviceState::new(TYPE_NET, 2, QUEUE_SIZE, 1 << VIRTIO_NET_F_MAC),
            readable: true,
            pending: None,
        }
    }
}

impl VirtioDevice for Net {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config { u8 mac[6]; ... }
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let backend = self.backend.as_raw_fd();
        self.state.activate(ctx, |ctx| {
            let ev = EventSet::IN | EventSet::EDGE_TRIGGERED;
            ctx.poller
                .add(backend, TOKEN_BACKEND, ev)
                .map_err(ActivateError::Epoll)
        })?;
        self.readable = true;
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.state.reset() {
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

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.mac })
    }
}
