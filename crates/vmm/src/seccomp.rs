//! Per-thread seccomp filters (seccompiler). Each thread kind gets the system calls it needs
//! and nothing else; anything else kills the process. `VESSEL_VMM_SECCOMP=off` disables the
//! filters (debugging only), `VESSEL_VMM_SECCOMP=log` logs violations to the audit log
//! instead of killing.
//!
//! vCPU threads may only run `KVM_RUN` (and `KVM_GET_REGS` to report an internal error),
//! write eventfds and the console log (truncating it at its cap), and manage memory and
//! locks: device activation and all back-end I/O happen on the VMM thread. Known gap: on the VMM thread `ioctl` is
//! allowed with any request (KVM `GET_*` for snapshots, `FIONBIO`, tap set-up).

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The VMM event-loop thread (devices and the control API).
    Vmm,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SeccompError {
    /// Cannot build the seccomp filter
    Build(#[source] seccompiler::BackendError),
    /// Cannot compile the seccomp filter
    Compile(#[source] seccompiler::BackendError),
    /// Cannot install the seccomp filter
    Apply(#[source] seccompiler::Error),
}

/// `KVM_RUN`.
const KVM_RUN: u64 = 0xae80;
/// `KVM_GET_REGS` (logging the rip of an internal error).
const KVM_GET_REGS: u64 = 0x8090_ae81;

/// System calls both thread kinds make: memory, locks, signals, eventfd and log writes,
/// exit. A vCPU thread needs nothing else: MMIO/PIO handlers only touch device registers,
/// write eventfds (interrupts, queue kicks, deferred activation) and the console log.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // The serial log's size cap truncates it (on the vCPU thread that writes it).
    libc::SYS_ftruncate,
];

/// Additional calls of the VMM thread: the event loop, device activation and back ends
/// (block file I/O, vsock and API sockets, tap, vhost-user), kicking vCPUs, snapshots.
const VMM_ONLY: &[libc::c_long] = &[
    libc::SYS_readv,
    libc::SYS_close,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_tgkill,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_ioctl,
];

fn ioctl_rule(request: u64) -> Result<SeccompRule, SeccompError> {
    let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
        .map_err(SeccompError::Build)?;
    SeccompRule::new(vec![cond]).map_err(SeccompError::Build)
}

/// The compiled filter for `kind`.
pub fn filter(kind: ThreadKind, log_only: bool) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|s| (*s, vec![])).collect();
    match kind {
        ThreadKind::Vmm => rules.extend(VMM_ONLY.iter().map(|s| (*s, vec![]))),
        ThreadKind::Vcpu => {
            let ioctls = [KVM_RUN, KVM_GET_REGS]
                .into_iter()
                .map(ioctl_rule)
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
    }
    let mismatch = if log_only {
        SeccompAction::Log
    } else {
        SeccompAction::KillProcess
    };
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    f.try_into().map_err(SeccompError::Compile)
}

/// Installs the filter for `kind` on the calling thread, unless disabled by
/// `VESSEL_VMM_SECCOMP=off`. Failure to install is logged, not fatal, so that the VMM still
/// runs where seccomp is unavailable.
pub fn apply(kind: ThreadKind) {
    let mode = std::env::var("VESSEL_VMM_SECCOMP").unwrap_or_default();
    if mode == "off" {
        return;
    }
    match filter(kind, mode == "log").and_then(|p| apply_filter(&p).map_err(SeccompError::Apply)) {
        Ok(()) => log::debug!("seccomp filter installed for {kind:?} thread"),
        Err(e) => log::warn!("no seccomp filter for {kind:?} thread: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!filter(ThreadKind::Vcpu, false).unwrap().is_empty());
        assert!(!filter(ThreadKind::Vmm, true).unwrap().is_empty());
    }

    #[test]
    fn vcpu_filter_blocks_file_opens() {
        let prog = filter(ThreadKind::Vcpu, false).unwrap();
        // Run in a child thread: the filter stays on that thread only. KillProcess would end
        // the test binary, so check with an Errno filter built from the same rule set.
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            COMMON.iter().map(|s| (*s, vec![])).collect();
        rules.insert(libc::SYS_ioctl, vec![ioctl_rule(KVM_RUN).unwrap()]);
        let errno_prog: BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap();
        assert!(!prog.is_empty());
        let res = std::thread::spawn(move || {
            apply_filter(&errno_prog).unwrap();
            std::fs::File::open("/etc/hostname").map(|_| ())
        })
        .join()
        .unwrap();
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EPERM));
    }
}
