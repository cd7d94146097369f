//! The vsock device: config space (guest CID), activation, snapshot state.

use vmm_sys_util::epoll::EventSet;

use super::muxer::{Muxer, TOKEN_LISTENER, TOKEN_TIMER};
use super::QUEUE_SIZE;
use crate::config::VsockConfig;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, TYPE_VSOCK,
};

/// Errors while creating the vsock device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VsockError {
    /// Cannot listen on the vsock socket {0}
    Listen(String, #[source] std::io::Error),
}

pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;
pub(super) const EVQ: usize = 2;

/// A hybrid vsock device.
#[derive(Debug)]
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) muxer: Muxer,
    pub(super) state: VirtioDeviceState,
    /// Set on restore: tell the guest its connections are gone once it is running.
    pub(super) reset_pending: bool,
}

impl Vsock {
    /// Creates the device and listens on `cfg.uds`.
    pub fn new(cfg: &VsockConfig) -> Result<Self, VsockError> {
        let muxer = Muxer::new(u64::from(cfg.cid), cfg.uds.clone())
            .map_err(|e| VsockError::Listen(cfg.uds.display().to_string(), e))?;
        Ok(Vsock {
            cid: u64::from(cfg.cid),
            muxer,
            state: VirtioDeviceState::new(TYPE_VSOCK, 3, QUEUE_SIZE, 0),
            reset_pending: false,
        })
    }

    /// Live host connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

impl VirtioDevice for Vsock {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let (listener, timer) = (self.muxer.listener_fd(), self.muxer.timer_fd());
        self.state.activate(ctx, |ctx| {
            for (fd, token) in [(listener, TOKEN_LISTENER), (timer, TOKEN_TIMER)] {
                ctx.poller
                    .add(fd, token, EventSet::IN)
                    .map_err(ActivateError::Epoll)?;
            }
            Ok(())
        })?;
        if self.reset_pending {
            self.send_transport_reset();
        }
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.state.reset() {
            self.muxer.clear(&a.poller);
            a.poller.remove(self.muxer.listener_fd());
            a.poller.remove(self.muxer.timer_fd());
        }
    }

    fn handle_event(&mut self, token: u32, events: EventSet) {
        self.handle(token, events);
    }

    fn save_state(&self) -> serde_json::Value {
        // Connections are not saved: their host ends belong to this process. The next
        // host port is, so that a clone never reuses the port of a connection its guest
        // still holds (see `Muxer::continue_host_ports_from`).
        serde_json::json!({ "cid": self.cid, "next_host_port": self.muxer.next_host_port() })
    }

    fn restore_state(&mut self, state: &serde_json::Value) {
        if let Some(port) = state
            .get("next_host_port")
            .and_then(serde_json::Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
        {
            self.muxer.continue_host_ports_from(port);
        }
        self.reset_pending = true;
    }
}
