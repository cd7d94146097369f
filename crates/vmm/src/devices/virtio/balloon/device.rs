//! The balloon device and its host-side control handle.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::EventSet;

use super::{QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqTrigger, VirtioDevice, VirtioDeviceState,
    INT_CONFIG, TYPE_BALLOON,
};

/// Queue indices: inflate, deflate, and (with REPORTING negotiated) reporting.
pub(super) const INFLATEQ: usize = 0;
pub(super) const DEFLATEQ: usize = 1;
pub(super) const REPORTQ: usize = 2;

/// Shared between the device and the VMM: target size, what the guest reports, counters.
#[derive(Debug, Default)]
pub struct BalloonControl {
    /// Target balloon size in 4 KiB pages.
    pub target_pages: AtomicU32,
    /// Balloon size the guest reports, in 4 KiB pages.
    pub actual_pages: AtomicU32,
    /// Bytes dropped after inflation.
    pub inflated_bytes: AtomicU64,
    /// Bytes dropped after free page reports.
    pub reported_bytes: AtomicU64,
    irq: std::sync::Mutex<Option<Arc<IrqTrigger>>>,
}

impl BalloonControl {
    /// Sets the target and tells the guest (config change interrupt).
    pub fn set_target_mib(&self, mib: u64) {
        let pages = (mib << 20) / super::BALLOON_PAGE;
        self.target_pages
            .store(u32::try_from(pages).unwrap_or(u32::MAX), Ordering::SeqCst);
        if let Some(irq) = crate::devices::lock(&self.irq).as_ref() {
            irq.trigger(INT_CONFIG);
        }
    }
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    pub(super) control: Arc<BalloonControl>,
    pub(super) state: VirtioDeviceState,
}

impl Balloon {
    /// A balloon starting at `target_mib`.
    pub fn new(target_mib: u64) -> Self {
        let control = Arc::new(BalloonControl::default());
        control.set_target_mib(target_mib);
        let features = (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | (1 << VIRTIO_BALLOON_F_REPORTING);
        Balloon {
            control,
            state: VirtioDeviceState::new(TYPE_BALLOON, 3, QUEUE_SIZE, features),
        }
    }

    /// The host-side handle.
    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }
}

impl VirtioDevice for Balloon {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_balloon_config { le32 num_pages; le32 actual; ... }
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(
            &self
                .control
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        cfg[4..].copy_from_slice(
            &self
                .control
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 {
            if let Ok(b) = <[u8; 4]>::try_from(data) {
                self.control
                    .actual_pages
                    .store(u32::from_le_bytes(b), Ordering::SeqCst);
            }
        }
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let active = self.state.activate(ctx, |_| Ok(()))?;
        *crate::devices::lock(&self.control.irq) = Some(active.irq.clone());
        for q in [INFLATEQ, DEFLATEQ, REPORTQ] {
            self.process_queue(q);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
        *crate::devices::lock(&self.control.irq) = None;
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        self.process_queue(token as usize);
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({
            "target_pages": self.control.target_pages.load(Ordering::SeqCst),
            "actual_pages": self.control.actual_pages.load(Ordering::SeqCst),
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) {
        let get = |k: &str| state.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        self.control
            .target_pages
            .store(get("target_pages"), Ordering::SeqCst);
        self.control
            .actual_pages
            .store(get("actual_pages"), Ordering::SeqCst);
    }
}
