//! The virtio-vsock packet header and operations (virtio spec 5.10.6).

use vm_memory::ByteValued;

/// `struct virtio_vsock_hdr`, little-endian, packed.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (1 = stream).
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (shutdown bits).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

// SAFETY: `Header` is `repr(C, packed)` of plain integers: every bit pattern is valid and
// there is no padding.
unsafe impl ByteValued for Header {}

/// Header size on the wire.
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();
/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted in one packet from the guest.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Orderly shutdown.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit update.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit request.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flags: no more receives / no more sends.
pub const SHUTDOWN_BOTH: u32 = 3;

/// Event queue: transport reset (sent after a restore: all connections are gone).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// A header from `src` to `dst`, for the given op.
pub fn header(src: (u64, u32), dst: (u64, u32), op: u16) -> Header {
    Header {
        src_cid: src.0,
        dst_cid: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        type_: TYPE_STREAM,
        op,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(HEADER_LEN, 44);
    }
}
