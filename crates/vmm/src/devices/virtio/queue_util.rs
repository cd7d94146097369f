//! Helpers shared by device queue handlers.

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use vm_memory::GuestMemoryMmap;

use super::{IrqTrigger, INT_VRING};

/// Upper bound on chains handled per queue event, so that a guest that keeps refilling a
/// queue cannot starve the other devices on the VMM thread.
pub const MAX_CHAINS_PER_EVENT: usize = 1024;

/// Marks a chain used and notifies the driver if it asked for it. A used ring outside guest
/// memory is logged and ignored: the driver broke its own queue.
pub fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, irq: &IrqTrigger, head: u16, len: u32) {
    if let Err(e) = queue.add_used(mem, head, len) {
        log::warn!("cannot add used descriptor {head}: {e}");
        return;
    }
    match queue.needs_notification(mem) {
        Ok(true) => irq.trigger(INT_VRING),
        Ok(false) => {}
        Err(_) => irq.trigger(INT_VRING),
    }
}

/// Pops the next available chain, or None if the ring is empty or broken.
pub fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>> {
    if !queue.ready() {
        return None;
    }
    queue.pop_descriptor_chain(mem)
}

/// Puts a chain popped with [`pop`] back, so it is seen again next time.
pub fn undo_pop(queue: &mut Queue) {
    queue.go_to_previous_position();
}

/// Whether `chain` ends where the driver said it ends. virtio-queue stops walking a chain
/// silently at the queue size (a loop), at a descriptor outside guest memory or past 4 GiB in
/// total; a device that then used the truncated part would act on a chain the driver never
/// built. A complete chain's last descriptor has no NEXT flag.
pub fn chain_is_complete<M>(chain: &virtio_queue::DescriptorChain<M>) -> bool
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    chain.clone().last().is_some_and(|d| !d.has_next())
}
