//! virtio-fs as a vhost-user frontend: the file system server is a separate, sandboxed
//! `virtiofsd` process; the VMM only negotiates, shares guest memory (memfd) with it and
//! relays queue kicks and interrupts.

mod device;
mod event_handler;

pub use device::{Fs, FsError};

/// virtio device type of virtio-fs.
pub const TYPE_FS: u32 = 26;
/// Request queues (plus one high-priority queue).
pub const NUM_REQUEST_QUEUES: usize = 1;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 1024;
/// Longest tag (the name the guest mounts: `mount -t virtiofs <tag> /mnt`).
pub const TAG_LEN: usize = 36;
