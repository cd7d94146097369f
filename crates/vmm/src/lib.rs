//! vessel-vmm: Vessel's built-in microVM monitor on KVM and the rust-vmm crates.
//!
//! One process per sandbox. Threads: one per vCPU (runs `KVM_RUN`, handles port-I/O and
//! MMIO exits against the device buses), one VMM thread (epoll loop over device eventfds,
//! vsock sockets and the control API). See `docs/vmm.md`.
#![deny(clippy::undocumented_unsafe_blocks)]
#![deny(missing_debug_implementations)]

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod seccomp;
pub mod snapshot;
pub mod stop_signal;
pub mod vmm;
pub mod vstate;

/// Process exit status when the guest reset itself (i8042 reset, the normal shutdown).
pub const EXIT_OK: i32 = 0;
/// Process exit status for a VMM-side error (bad config, KVM failure, ...).
pub const EXIT_VMM_ERROR: i32 = 1;
/// Process exit status when the guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
pub const EXIT_TRIPLE_FAULT: i32 = 2;
/// Process exit status when the guest kernel reported a panic before stopping.
pub const EXIT_GUEST_PANIC: i32 = 3;
/// Process exit status when KVM could not run the guest (internal error, failed entry).
pub const EXIT_KVM_INTERNAL: i32 = 4;
