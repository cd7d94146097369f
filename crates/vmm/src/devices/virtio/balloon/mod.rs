//! virtio-balloon with free page reporting: pages the guest gives back (inflate) or reports
//! free are dropped from the VMM's memory with `MADV_DONTNEED`.
//!
//! On a restored VM the guest memory is a private file mapping, so a dropped page reads back
//! as its snapshot content, not zeros; Linux's balloon does not depend on either.

mod device;
mod event_handler;

pub use device::{Balloon, BalloonControl};

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Feature: deflate when the guest runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature: free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// The balloon's page size (fixed by the spec).
pub const BALLOON_PAGE: u64 = 4096;
