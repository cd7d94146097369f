//! virtio devices on the virtio-mmio transport. Every device has the same shape: `mod.rs`
//! (constants, re-exports), `device.rs` (the `VirtioDevice` impl: features, config space,
//! activation, snapshot state), `event_handler.rs` (what it does when a queue or backend fd
//! fires), plus device-specific modules. What all devices keep (type, queue sizes, offered
//! features, and once activated the live queues and interrupt) is one [`VirtioDeviceState`].

pub mod balloon;
pub mod block;
mod device_state;
pub mod fs;
#[cfg(test)]
mod fuzz_tests;
pub mod net;
pub mod queue_util;
pub mod rng;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod transport;
pub mod vsock;

pub use device_state::{ActivateContext, VirtioDeviceState};

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// virtio 1.0 feature bit: the device is a modern (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Device types (virtio spec 5).
pub const TYPE_NET: u32 = 1;
/// Block device type.
pub const TYPE_BLOCK: u32 = 2;
/// Entropy device type.
pub const TYPE_RNG: u32 = 4;
/// Balloon device type.
pub const TYPE_BALLOON: u32 = 5;
/// vsock device type.
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_VRING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// Event tokens below this are queue notifications (token = queue index); devices number
/// their own fds from here.
pub const DEVICE_TOKEN_BASE: u32 = 16;

/// Errors while activating a device.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ActivateError {
    /// The driver set up {0} queues, the device needs {1}
    QueueCount(usize, usize),
    /// Cannot register a device fd with the event loop
    Epoll(#[source] std::io::Error),
    /// Device backend failed: {0}
    Backend(String),
}

/// The interrupt line of one device: the interrupt status register plus an irqfd.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger that raises `evt` (an irqfd registered with KVM, or a plain eventfd in
    /// tests).
    pub fn new(evt: EventFd) -> Self {
        IrqTrigger {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in the interrupt status and raises the interrupt.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            log::warn!("cannot raise virtio interrupt: {e}");
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register (snapshot restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The eventfd behind the interrupt (for tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A device's handle on the VMM's epoll loop: registers fds under device-local tokens.
#[derive(Debug, Clone)]
pub struct Poller {
    epoll: Arc<Epoll>,
    device: u32,
}

impl Poller {
    /// A handle that tags events as coming from device `device`.
    pub fn new(epoll: Arc<Epoll>, device: u32) -> Self {
        Poller { epoll, device }
    }

    /// The epoll data word for `token` of this device.
    pub fn data(&self, token: u32) -> u64 {
        (u64::from(self.device) << 32) | u64::from(token)
    }

    /// Watches `fd` for `events`, reported back as `token`.
    pub fn add(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, token: u32, events: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) {
        // Removing an fd that was already closed is harmless.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The state every device has: type, queue sizes, offered features, live queues.
    fn state(&self) -> &VirtioDeviceState;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the negotiated `features` (through
    /// [`VirtioDeviceState::activate`]).
    fn activate(&mut self, features: u64, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues (driver wrote 0 to the status register).
    fn reset(&mut self);
    /// An fd of the device, or queue `token` (< [`DEVICE_TOKEN_BASE`]), is ready.
    fn handle_event(&mut self, token: u32, events: EventSet);
    /// Device-specific state for a snapshot (none by default).
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes device-specific state from a snapshot, before the transport re-activates it.
    fn restore_state(&mut self, _state: &serde_json::Value) {}
}

/// Reads `data.len()` bytes at `offset` out of a config-space byte image; reads past its end
/// return zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}
