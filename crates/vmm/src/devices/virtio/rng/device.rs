//! The entropy device.

use vmm_sys_util::epoll::EventSet;

use super::QUEUE_SIZE;
use crate::devices::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, TYPE_RNG,
};

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    pub(super) state: VirtioDeviceState,
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng {
            state: VirtioDeviceState::new(TYPE_RNG, 1, QUEUE_SIZE, 0),
            bytes_served: 0,
        }
    }
}

impl VirtioDevice for Rng {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state.activate(ctx, |_| Ok(()))?;
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        self.state.reset();
    }

    fn handle_event(&mut self, _token: u32, _events: EventSet) {
        self.process_queue();
    }
}
