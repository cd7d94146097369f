//! Control API: newline-delimited JSON over a Unix stream socket, typed in
//! `vessel-vmm-api`. The API only parses; the VMM acts ([`crate::vmm::Vmm`]).

pub mod server;

pub use vessel_vmm_api::{parse_request, Request, Response};
