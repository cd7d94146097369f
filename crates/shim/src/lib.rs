//! The shim's task API mapping, as a library so that its tests live under
//! `tests/` (the binary is `main.rs`).

pub mod error;
pub mod rootfs;
pub mod service;
pub mod stats;
