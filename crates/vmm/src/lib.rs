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
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
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

/// `e` and its sources joined by ": " (as anyhow's `{:#}`): what the API
/// answers and the logs print. Error messages never repeat their source.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::vmm::VmmError;

    #[test]
    fn errors_print_their_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let errors = [
            VmmError::Setup("epoll", io()),
            VmmError::Snapshot(crate::snapshot::SnapshotError::Io("f".into(), io())),
            VmmError::Vcpu(crate::vstate::vcpu::VcpuError::Msrs(1, 2)),
            VmmError::Boot(crate::arch::boot::BootError::CmdlineBuild(
                linux_loader::cmdline::Error::InvalidAscii,
            )),
            VmmError::Block(
                "/img".into(),
                crate::devices::virtio::block::BlockError::Open("/img".into(), io()),
            ),
            VmmError::Fs(
                "/fs.sock".into(),
                crate::devices::virtio::fs::FsError::Connect(
                    "/fs.sock".into(),
                    vhost::Error::InvalidOperation,
                ),
            ),
            VmmError::Vsock(crate::devices::virtio::vsock::VsockError::Listen(
                "/v.sock".into(),
                io(),
            )),
            VmmError::Tap(
                "tap fd 9".into(),
                crate::devices::virtio::net::tap::TapError::NotATap(9, io()),
            ),
        ];
        let activate = crate::devices::virtio::ActivateError::Epoll(io());
        vessel_testutil::assert_cause_printed_once(&activate);
        for e in &errors {
            vessel_testutil::assert_cause_printed_once(e);
        }
        assert_eq!(
            super::error_chain(&VmmError::Setup("epoll", io())),
            "Cannot set up epoll: entity not found"
        );
    }
}
