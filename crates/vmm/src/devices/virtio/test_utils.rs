//! A guest-memory fixture for device tests: a split virtqueue laid out in test memory that
//! tests fill with arbitrary (also malformed) descriptors.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, IrqTrigger, Poller};

/// Guest memory size of the fixture.
pub const MEM_SIZE: u64 = 16 << 20;
/// Where test data buffers may go.
pub const DATA_BASE: u64 = 0x10_0000;

/// Virtqueue descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;

/// One split virtqueue in guest memory.
#[derive(Debug)]
pub struct VirtQ {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

impl VirtQ {
    /// A queue of `size` at ring base `base` in `mem`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        VirtQ {
            mem: mem.clone(),
            desc: base,
            avail: base + 16 * u64::from(size),
            used: (base + 16 * u64::from(size) + 6 + 2 * u64::from(size) + 4095) & !4095,
            size,
        }
    }

    /// A configured, ready `Queue` for this layout.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Publishes chain `head` in the available ring.
    pub fn publish(&self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(idx % self.size));
        self.mem.write_obj(head, slot).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Sets the available index directly (to fake a broken driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// Fresh fixture memory.
pub fn memory() -> GuestMemoryMmap {
    crate::vstate::memory::create(MEM_SIZE >> 20).unwrap()
}

/// An activation context with `queues`.
pub fn activate_ctx(mem: &GuestMemoryMmap, queues: Vec<Queue>) -> (ActivateContext, Arc<Epoll>) {
    let epoll = Arc::new(Epoll::new().unwrap());
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    (
        ActivateContext {
            mem: mem.clone(),
            queues,
            irq,
            poller: Poller::new(epoll.clone(), 0),
        },
        epoll,
    )
}
