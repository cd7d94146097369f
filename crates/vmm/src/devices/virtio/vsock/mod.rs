//! vsock (placeholder)
mod device;
pub use device::Vsock;
