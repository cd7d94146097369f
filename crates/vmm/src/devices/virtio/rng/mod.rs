//! virtio-rng: fills guest buffers from the host's `getrandom`.

mod device;
mod event_handler;

pub use device::Rng;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request (a guest asking for more gets this much).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
