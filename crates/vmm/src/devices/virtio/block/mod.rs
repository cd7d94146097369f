//! virtio-blk backed by a host file, optionally read-only.

mod device;
mod event_handler;
pub mod request;

pub use device::{Block, BlockError};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature: the device supports flush.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
