//! Emulated devices and the buses that route vCPU port-I/O and MMIO exits to them.

pub mod i8042;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// A device on a bus: accesses arrive as an offset into the device's range.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each owned by a device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r: Vec<_> = self.ranges.iter().map(|(b, l, _)| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &r).finish()
    }
}

impl Bus {
    /// Adds `device` at `[base, base + len)`. Returns false if the range overlaps another.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> bool {
        let end = base.saturating_add(len);
        if self
            .ranges
            .iter()
            .any(|(b, l, _)| base < b.saturating_add(*l) && *b < end)
        {
            return false;
        }
        self.ranges.push((base, len, device));
        self.ranges.sort_by_key(|(b, _, _)| *b);
        true
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| addr >= *b && addr - *b < *l)
            .map(|(b, _, d)| (addr - *b, d))
    }

    /// Dispatches a read; unclaimed addresses read as all ones, like an open bus.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((off, dev)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a write; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((off, dev)) = self.find(addr) {
            lock(dev).write(off, data)
        }
    }
}

/// Locks a device mutex, recovering the data if a thread panicked while holding it (a
/// device must stay usable by the other threads so the VMM can still shut down cleanly).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the VM stopped, and the eventfd that wakes the VMM thread when it does.
#[derive(Debug)]
pub struct ExitSignal {
    code: AtomicI32,
    set: AtomicBool,
    panicked: AtomicBool,
    evt: EventFd,
}

impl ExitSignal {
    /// A new, unset exit signal.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitSignal {
            code: AtomicI32::new(0),
            set: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Requests the VM to stop with `code`; the first request wins. A guest that reported a
    /// kernel panic on its console stops with [`crate::EXIT_GUEST_PANIC`] instead of 0.
    pub fn trigger(&self, code: i32) {
        if self.set.swap(true, Ordering::SeqCst) {
            return;
        }
        let code = if code == crate::EXIT_OK && self.panicked.load(Ordering::SeqCst) {
            crate::EXIT_GUEST_PANIC
        } else {
            code
        };
        self.code.store(code, Ordering::SeqCst);
        // Cannot fail short of the counter overflowing, which one write cannot do.
        let _ = self.evt.write(1);
    }

    /// Records that the guest kernel panicked (seen on its console).
    pub fn note_guest_panic(&self) {
        self.panicked.store(true, Ordering::SeqCst);
    }

    /// Whether the VM was asked to stop.
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    /// The exit code, once set.
    pub fn code(&self) -> i32 {
        self.code.load(Ordering::SeqCst)
    }

    /// The eventfd written when the VM stops.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(self.0)
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0 = d[0]
        }
    }

    #[test]
    fn bus_routes_and_rejects_overlaps() {
        let mut bus = Bus::default();
        assert!(bus.insert(0x10, 8, Arc::new(Mutex::new(Reg(1)))));
        assert!(!bus.insert(0x14, 8, Arc::new(Mutex::new(Reg(2)))));
        assert!(bus.insert(0x18, 8, Arc::new(Mutex::new(Reg(2)))));
        let mut b = [0u8; 1];
        bus.read(0x17, &mut b);
        assert_eq!(b[0], 1);
        bus.write(0x18, &[9]);
        bus.read(0x1f, &mut b);
        assert_eq!(b[0], 9);
        bus.read(0x20, &mut b);
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn first_exit_wins_and_panic_overrides_ok() {
        let e = ExitSignal::new().unwrap();
        e.note_guest_panic();
        e.trigger(crate::EXIT_OK);
        e.trigger(crate::EXIT_TRIPLE_FAULT);
        assert_eq!(e.code(), crate::EXIT_GUEST_PANIC);
    }
}
