//! What every virtio device keeps, whatever it does: its type, its queues' maximum sizes,
//! the features it offers, and, from DRIVER_OK until a reset, the context it was activated
//! with (guest memory, live queues, interrupt, event-loop handle). The transport owns the
//! registers (acknowledged features, status, interrupt status) and saves them with the queue
//! positions; devices save only what is theirs.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use super::queue_util::{add_used, pop, MAX_CHAINS_PER_EVENT};
use super::{ActivateError, IrqTrigger, Poller};

/// What a device gets when the driver sets DRIVER_OK, and keeps (in its
/// [`VirtioDeviceState`]) until a reset.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub irq: Arc<IrqTrigger>,
    /// The device's handle on the event loop.
    pub poller: Poller,
}

impl ActivateContext {
    /// Serves queue `index`: hands each available chain, at most [`MAX_CHAINS_PER_EVENT`],
    /// to `handle` and returns it to the driver as used with the byte count `handle` wrote
    /// (interrupting the driver if it asked for that). Returns true if it stopped at the
    /// limit, so more chains may be waiting.
    pub fn serve(
        &mut self,
        index: usize,
        mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32,
    ) -> bool {
        let Some(queue) = self.queues.get_mut(index) else {
            return false;
        };
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(chain) = pop(queue, &self.mem) else {
                return false;
            };
            let head = chain.head_index();
            let len = handle(chain, &self.mem);
            add_used(queue, &self.mem, &self.irq, head, len);
        }
        true
    }
}

/// The state common to all virtio devices.
#[derive(Debug)]
pub struct VirtioDeviceState {
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    avail_features: u64,
    active: Option<ActivateContext>,
}

impl VirtioDeviceState {
    /// An inactive device of virtio type `device_type` with `queues` queues of `queue_size`
    /// entries each, offering `avail_features` (the transport adds VIRTIO_F_VERSION_1).
    pub fn new(device_type: u32, queues: usize, queue_size: u16, avail_features: u64) -> Self {
        VirtioDeviceState {
            device_type,
            queue_max_sizes: vec![queue_size; queues],
            avail_features,
            active: None,
        }
    }

    /// virtio device type (spec 5).
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue; its length is the number of queues.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    /// Features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Takes `ctx` as the live state if it has one queue per device queue and `setup` (the
    /// device's own set-up, such as registering its backend fds) succeeds; otherwise the
    /// device stays inactive.
    pub fn activate(
        &mut self,
        ctx: ActivateContext,
        setup: impl FnOnce(&ActivateContext) -> Result<(), ActivateError>,
    ) -> Result<&mut ActivateContext, ActivateError> {
        let want = self.queue_max_sizes.len();
        if ctx.queues.len() != want {
            return Err(ActivateError::QueueCount(ctx.queues.len(), want));
        }
        setup(&ctx)?;
        Ok(self.active.insert(ctx))
    }

    /// Whether [`VirtioDeviceState::activate`] succeeded and no reset happened since.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The live state, once activated.
    pub fn active(&self) -> Option<&ActivateContext> {
        self.active.as_ref()
    }

    /// The live state, once activated.
    pub fn active_mut(&mut self) -> Option<&mut ActivateContext> {
        self.active.as_mut()
    }

    /// The live queues (for snapshots); empty until activated.
    pub fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    /// Back to inactive. Returns the live state, if any, so that the device can unregister
    /// its fds from the event loop.
    pub fn reset(&mut self) -> Option<ActivateContext> {
        self.active.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{activate_ctx, memory, VirtQ};
    use crate::devices::virtio::TYPE_NET;

    #[test]
    fn activates_only_with_matching_queues_and_successful_setup() {
        let mem = memory();
        let mut state = VirtioDeviceState::new(TYPE_NET, 2, 16, 1 << 5);
        assert_eq!(state.device_type(), TYPE_NET);
        assert_eq!(state.queue_max_sizes(), &[16, 16]);
        assert_eq!(state.avail_features(), 1 << 5);

        let (ctx, _e) = activate_ctx(&mem, vec![VirtQ::new(&mem, 0x1000, 16).queue()]);
        let err = state.activate(ctx, |_| Ok(())).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount(1, 2)), "{err}");

        let two = || {
            vec![
                VirtQ::new(&mem, 0x1000, 16).queue(),
                VirtQ::new(&mem, 0x4000, 16).queue(),
            ]
        };
        let (ctx, _e) = activate_ctx(&mem, two());
        let failed = state.activate(ctx, |_| Err(ActivateError::Backend("no".into())));
        assert!(failed.is_err());
        assert!(!state.is_activated());
        assert!(state.queues().is_empty());

        let (ctx, _e) = activate_ctx(&mem, two());
        state.activate(ctx, |_| Ok(())).unwrap();
        assert!(state.is_activated());
        assert_eq!(state.queues().len(), 2);
        assert!(state.reset().is_some());
        assert!(!state.is_activated());
        assert!(state.reset().is_none());
    }
}
