//! The network device.

use std::os::unix::io::AsRawFd;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use super::{offered_features, tap_offloads, QUEUE_SIZE};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    DEVICE_TOKEN_BASE, TYPE_NET,
};

/// Token of the backend fd.
pub(super) const TOKEN_BACKEND: u32 = DEVICE_TOKEN_BASE;
/// Token of the device's own "more to do" eventfd (rx stopped at its per-event budget).
pub(super) const TOKEN_RESCHEDULE: u32 = DEVICE_TOKEN_BASE + 1;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    /// The tap carrying one frame per read/write.
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) mtu: Option<u16>,
    pub(super) state: VirtioDeviceState,
    /// Features the driver acked (valid while activated).
    pub(super) acked: u64,
    /// The backend may have frames to read (edge-triggered hint).
    pub(super) readable: bool,
    /// A frame (with its header) read from the backend that did not fit the guest's
    /// buffers yet.
    pub(super) pending: Option<Vec<u8>>,
    /// Written when rx stops at its budget with work left, so the event loop comes back.
    pub(super) reschedule: EventFd,
    /// Reused receive buffer.
    pub(super) rx_buf: Vec<u8>,
}

impl Net {
    /// A device over `tap` with `mac` and, if given, an MTU the guest is told.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: Option<u16>) -> std::io::Result<Self> {
        let features = offered_features(tap.vnet_hdr, tap.offloads, mtu.is_some());
        Ok(Net {
            tap,
            mac,
            mtu,
            state: VirtioDeviceState::new(TYPE_NET, 2, QUEUE_SIZE, features),
            acked: 0,
            readable: true,
            pending: None,
            reschedule: EventFd::new(libc::EFD_NONBLOCK)?,
            rx_buf: Vec::new(),
        })
    }

    /// Whether the driver acked feature `bit`.
    pub(super) fn has(&self, bit: u32) -> bool {
        self.acked & (1u64 << bit) != 0
    }

    fn config(&self) -> [u8; 12] {
        // struct virtio_net_config { u8 mac[6]; le16 status; le16 max_virtqueue_pairs;
        // le16 mtu; }
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let backend = self.tap.file.as_raw_fd();
        let resched = self.reschedule.as_raw_fd();
        let offloads = tap_offloads(features);
        let tap = &self.tap;
        self.state.activate(ctx, |ctx| {
            tap.set_offload(offloads).map_err(|e| {
                ActivateError::Backend(format!(
                    "tap {}: TUNSETOFFLOAD {offloads:#x}: {e}",
                    tap.name
                ))
            })?;
            let ev = EventSet::IN | EventSet::EDGE_TRIGGERED;
            ctx.poller
                .add(backend, TOKEN_BACKEND, ev)
                .map_err(ActivateError::Epoll)?;
            ctx.poller
                .add(resched, TOKEN_RESCHEDULE, EventSet::IN)
                .map_err(|e| {
                    ctx.poller.remove(backend);
                    ActivateError::Epoll(e)
                })
        })?;
        self.acked = features;
        self.readable = true;
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.state.reset() {
            a.poller.remove(self.tap.file.as_raw_fd());
            a.poller.remove(self.reschedule.as_raw_fd());
        }
        if let Err(e) = self.tap.set_offload(0) {
            log::warn!("tap {}: cannot turn offloads off: {e}", self.tap.name);
        }
        self.acked = 0;
        self.pending = None;
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        match token {
            t if t == TXQ as u32 => self.process_tx(),
            TOKEN_BACKEND => self.readable = true,
            TOKEN_RESCHEDULE => {
                let _ = self.reschedule.read();
            }
            _ => {}
        }
        self.process_rx();
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.mac })
    }
}
