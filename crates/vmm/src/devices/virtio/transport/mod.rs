//! virtio transports.

pub mod mmio;
