//! The entropy device.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::QUEUE_SIZE;
use crate::devices::virtio::{ActivateContext, ActivateError, IrqTrigger, VirtioDevice, TYPE_RNG};

/// Live state after activation.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqTrigger>,
}

/// A virtio-rng device.
#[derive(Debug, Default)]
pub struct Rng {
    pub(super) active: Option<Active>,
    /// Bytes handed to the guest so far.
    pub bytes_served: u64,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues;
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount(queues.len(), 1));
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queue: queues.remove(0),
            irq: ctx.irq,
        });
        self.process_queue();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn handle_event(&mut self, _token: u32, _events: EventSet) {
        self.process_queue();
    }

    fn queues(&self) -> &[Queue] {
        self.active
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
