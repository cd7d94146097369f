//! The vsock device: config space (guest CID), activation, snapshot state.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::muxer::{Muxer, TOKEN_LISTENER, TOKEN_TIMER};
use super::QUEUE_SIZE;
use crate::config::VsockConfig;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqTrigger, Poller, VirtioDevice, TYPE_VSOCK,
};

/// Errors while creating the vsock device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VsockError {
    /// Cannot listen on the vsock socket {0}: {1}
    Listen(String, std::io::Error),
}

pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

/// Live state after activation.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqTrigger>,
    pub poller: Poller,
}

/// A hybrid vsock device.
#[derive(Debug)]
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) muxer: Muxer,
    pub(super) active: Option<Active>,
    /// Set on restore: tell the guest its connections are gone once it is running.
    pub(super) reset_pending: bool,
    queue_sizes: [u16; 3],
}

impl Vsock {
    /// Creates the device and listens on `cfg.uds`.
    pub fn new(cfg: &VsockConfig) -> Result<Self, VsockError> {
        let muxer = Muxer::new(u64::from(cfg.cid), cfg.uds.clone())
            .map_err(|e| VsockError::Listen(cfg.uds.display().to_string(), e))?;
        Ok(Vsock {
            cid: u64::from(cfg.cid),
            muxer,
            active: None,
            reset_pending: false,
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    /// Live host connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::QueueCount(ctx.queues.len(), 3));
        }
        ctx.poller
            .add(self.muxer.listener_fd(), TOKEN_LISTENER, EventSet::IN)
            .map_err(ActivateError::Epoll)?;
        ctx.poller
            .add(self.muxer.timer_fd(), TOKEN_TIMER, EventSet::IN)
            .map_err(ActivateError::Epoll)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
            poller: ctx.poller,
        });
        if self.reset_pending {
            self.send_transport_reset();
        }
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            self.muxer.clear(&a.poller);
            a.poller.remove(self.muxer.listener_fd());
            a.poller.remove(self.muxer.timer_fd());
        }
    }

    fn handle_event(&mut self, token: u32, events: EventSet) {
        self.handle(token, events);
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn save_state(&self) -> serde_json::Value {
        // Connections are not saved: their host ends belong to this process.
        serde_json::json!({ "cid": self.cid })
    }

    fn restore_state(&mut self, _state: &serde_json::Value) {
        self.reset_pending = true;
    }
}
