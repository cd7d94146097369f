//! virtio-net backed by a host tap device (or, in tests, any packet-preserving fd).
//!
//! Offloads: the guest may always hand us frames with a partial checksum or as one TSO
//! super-frame (VIRTIO_NET_F_CSUM, HOST_TSO4/6) when the tap has a vnet header, since the tap
//! takes those on write; the device offers GUEST_CSUM and GUEST_TSO4/6 (the tap handing such
//! frames to the guest) only if the tap accepted them at start-up, and sets the tap's
//! offloads (TUNSETOFFLOAD) to exactly what the guest acked. The vnet header passes through
//! unchanged in both directions; a tap without one gets a zeroed header added on receive and
//! stripped on send, and no offloads.

mod device;
mod event_handler;
pub mod tap;

pub use device::Net;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Feature: the device takes frames with a partial checksum.
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// Feature: the driver takes frames with a partial checksum.
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// Feature: the device reports the MTU in its config space.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// Feature: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// Feature: the driver takes TCPv4 super-frames.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// Feature: the driver takes TCPv6 super-frames.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// Feature: the device takes TCPv4 super-frames.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// Feature: the device takes TCPv6 super-frames.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// Feature: the driver posts small buffers that the device merges for one frame.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// `struct virtio_net_hdr_v1` size (virtio 1.x always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame plus header moved in one packet: a 64 KiB TSO super-frame with its
/// Ethernet header.
pub const MAX_PACKET: usize = VNET_HDR_LEN + 65550;
/// Longest rx chain of one frame (MRG_RXBUF: buffers merged for one frame), so a driver
/// that posts one-byte buffers cannot make one frame cost thousands of used entries.
pub const MAX_MERGED_BUFFERS: usize = 64;

/// The features a device over a tap with (`vnet_hdr`, `offloads`) offers.
pub fn offered_features(vnet_hdr: bool, offloads: bool, mtu: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MRG_RXBUF);
    if mtu {
        f |= 1 << VIRTIO_NET_F_MTU;
    }
    if vnet_hdr {
        f |= (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6);
        if offloads {
            f |= (1 << VIRTIO_NET_F_GUEST_CSUM)
                | (1 << VIRTIO_NET_F_GUEST_TSO4)
                | (1 << VIRTIO_NET_F_GUEST_TSO6);
        }
    }
    f
}

/// The tap offloads (TUN_F_*) that match the features the driver acked: what the guest
/// can receive.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= tap::TUN_F_CSUM;
        // TSO without checksum offload is meaningless (and refused by the tap).
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= tap::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= tap::TUN_F_TSO6;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_tap_and_the_guest() {
        let none = offered_features(false, false, false);
        assert_eq!(none & (1 << VIRTIO_NET_F_CSUM), 0);
        assert_eq!(none & (1 << VIRTIO_NET_F_GUEST_CSUM), 0);
        let host_only = offered_features(true, false, true);
        assert_ne!(host_only & (1 << VIRTIO_NET_F_HOST_TSO4), 0);
        assert_eq!(host_only & (1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_ne!(host_only & (1 << VIRTIO_NET_F_MTU), 0);
        let all = offered_features(true, true, false);
        assert_eq!(
            tap_offloads(all),
            tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6
        );
        // TSO acked without checksum: nothing.
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tap_offloads(0), 0);
    }
}
