//! Relaying queue kicks to the backend and its completions to the guest.

use super::device::{Fs, TOKEN_CALL_BASE};
use crate::devices::virtio::{DEVICE_TOKEN_BASE, INT_VRING};

impl Fs {
    pub(super) fn relay(&mut self, token: u32) {
        let Some(active) = self.state.active() else {
            return;
        };
        if token < DEVICE_TOKEN_BASE {
            // The guest kicked queue `token`: pass it on.
            if let Some(k) = self.kicks.get(token as usize) {
                let _ = k.write(1);
            }
        } else if let Some(c) = self.calls.get((token - TOKEN_CALL_BASE) as usize) {
            // The backend used buffers: raise the interrupt with the status bit set.
            if c.read().is_ok() {
                active.irq.trigger(INT_VRING);
            }
        }
    }
}
