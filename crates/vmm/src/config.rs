//! VM configuration: the types live in `vessel-vmm-api`, shared with the backend.

pub use vessel_vmm_api::config::*;
pub use vessel_vmm_api::kvm::{host_is_pvm, HostKvm};
