//! virtio-vsock implemented in the VMM as Firecracker-style hybrid vsock: the host side of
//! every guest connection is a Unix stream.
//!
//! - Host-initiated: a host process connects to the `uds` socket and writes
//!   `CONNECT <port>\n`; the VMM opens a connection to guest port `<port>` and answers
//!   `OK <host port>\n` once the guest accepts.
//! - Guest-initiated: a guest connection to host (CID 2) port P is connected to the Unix
//!   socket `<uds>_<P>`.
//!
//! Flow control is virtio-vsock's credit scheme: the VMM never sends a guest connection more
//! than the guest's advertised buffer space, and advertises its own buffer (per connection)
//! so a guest that ignores it is reset instead of growing VMM memory.

mod connection;
mod device;
mod event_handler;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod muxer;
pub mod packet;

pub use device::{Vsock, VsockError};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Queue size of all three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Buffer space the VMM advertises per connection (bytes from the guest not yet written
/// to the host stream).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Most connections at once per VM.
pub const MAX_CONNECTIONS: usize = 1024;
