//! Per-thread seccomp filters (placeholder until the filters land).

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The VMM event-loop thread (devices and API).
    Vmm,
}

/// Installs the filter for `kind` on the calling thread.
pub fn apply(_kind: ThreadKind) {}
