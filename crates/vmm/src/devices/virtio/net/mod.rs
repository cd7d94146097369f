//! virtio-net backed by a host tap device (or, in tests, any packet-preserving fd).

mod device;
mod event_handler;
pub mod tap;

pub use device::Net;

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Feature: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// `struct virtio_net_hdr_v1` size (virtio 1.x always has `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame plus header moved in one packet (no TSO/GSO is offered).
pub const MAX_PACKET: usize = VNET_HDR_LEN + 65550;
