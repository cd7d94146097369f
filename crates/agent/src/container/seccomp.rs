//! ENOSYS for syscalls newer than a seccomp profile, as runc answers.
//!
//! A profile lists the syscalls its author knew; a program that probes a
//! newer one (glibc tries `clone3`, `faccessat2`, `fchmodat2` and falls back
//! only on ENOSYS) would get the profile's default errno (EPERM) instead and
//! fail. runc patches its filter so that, unless the default action allows
//! or `defaultErrnoRet` is already ENOSYS, any syscall numbered above the
//! highest one the profile names returns ENOSYS. libcontainer has no such
//! stub, so the agent gets the same answers in two parts:
//! - [`add_enosys_rules`]: one ERRNO(ENOSYS) rule in the profile for every
//!   syscall the agent's libseccomp knows that is numbered above the profile's
//!   highest (libseccomp 2.5.4 knows up to 456 on x86_64, every syscall of the
//!   guest kernel);
//! - [`load_enosys_filter`]: numbers above what libseccomp knows have no name
//!   to put in a rule; the executor loads a small second filter for them just
//!   before exec. Of two filters the kernel takes the newer one's errno, but
//!   loading one needs no_new_privs or CAP_SYS_ADMIN at that point, so
//!   without them these numbers keep the default action (see
//!   docs/oci-cli.md).

use libseccomp::ScmpSyscall;
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSyscallBuilder, Spec};

/// Highest syscall number (this architecture) that libseccomp scans for.
const SCAN_LIMIT: i32 = 1024;

/// Whether the profile's syscalls above its highest named one should get
/// ENOSYS (runc: not for permissive defaults, nor when the default errno is
/// ENOSYS already).
pub fn wants_enosys(seccomp: &LinuxSeccomp) -> bool {
    let permissive = matches!(
        seccomp.default_action(),
        LinuxSeccompAction::ScmpActAllow
            | LinuxSeccompAction::ScmpActLog
            | LinuxSeccompAction::ScmpActTrace
    );
    !permissive && seccomp.default_errno_ret() != Some(libc::ENOSYS as u32)
}

/// The highest syscall number the agent's libseccomp has a name for.
pub fn highest_known() -> i32 {
    (0..SCAN_LIMIT)
        .rev()
        .find(|&n| ScmpSyscall::from(n).get_name().is_ok())
        .unwrap_or(0)
}

/// Adds to the spec's profile an ERRNO(ENOSYS) rule for the syscalls
/// libseccomp knows that are numbered above the highest one the profile
/// names. Returns how many it added.
pub fn add_enosys_rules(spec: &mut Spec) -> usize {
    let Some(seccomp) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.seccomp_mut().as_mut())
    else {
        return 0;
    };
    if !wants_enosys(seccomp) {
        return 0;
    }
    let highest_named = seccomp
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|s| s.names())
        .filter_map(|n| ScmpSyscall::from_name(n).ok().map(i32::from))
        .max()
        .unwrap_or(-1);
    let newer: Vec<String> = (highest_named + 1..=highest_known())
        .filter_map(|n| ScmpSyscall::from(n).get_name().ok())
        .collect();
    if newer.is_empty() {
        return 0;
    }
    let count = newer.len();
    let rule = LinuxSyscallBuilder::default()
        .names(newer)
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::ENOSYS as u32)
        .build()
        .expect("names and action are set");
    let mut syscalls = seccomp.syscalls().clone().unwrap_or_default();
    syscalls.push(rule);
    seccomp.set_syscalls(Some(syscalls));
    count
}

/// Loads a filter that answers ENOSYS to x86_64 syscalls numbered above
/// `above` and allows the rest (the container's own filter decides those).
/// Fails without no_new_privs or CAP_SYS_ADMIN, or when the profile denies
/// seccomp(2).
#[cfg(target_arch = "x86_64")]
pub fn load_enosys_filter(above: u32) -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    /// x32 syscalls carry this bit; the container's filter decides them.
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const JGT: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at offset 0, arch at 4.
    let mut prog = [
        op(LD_ABS, 0, 0, 4),
        op(JEQ, 0, 3, AUDIT_ARCH_X86_64),
        op(LD_ABS, 0, 0, 0),
        op(JGE, 1, 0, X32_SYSCALL_BIT),
        op(JGT, 1, 0, above),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads the program that
    // `fprog` points to, which lives until the call returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
pub fn load_enosys_filter(_above: u32) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seccomp: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "/r"}},
                "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}},
                "linux": {{"seccomp": {seccomp}}}}}"#
        ))
        .unwrap()
    }

    fn enosys_names(s: &Spec) -> Vec<String> {
        let sc = s.linux().as_ref().unwrap().seccomp().as_ref().unwrap();
        sc.syscalls()
            .iter()
            .flatten()
            .filter(|r| r.errno_ret() == Some(38))
            .flat_map(|r| r.names().clone())
            .collect()
    }

    #[test]
    fn syscalls_above_the_highest_named_get_enosys() {
        // faccessat2 is 439 on x86_64, process_madvise 440, clone3 435.
        let mut s = spec(
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 6,
                "syscalls": [{"names": ["read", "faccessat2", "no_such_call"], "action": "SCMP_ACT_ALLOW"}]}"#,
        );
        let added = add_enosys_rules(&mut s);
        let names = enosys_names(&s);
        assert_eq!(added, names.len());
        assert!(names.contains(&"process_madvise".to_string()), "{names:?}");
        assert!(
            names.contains(&"set_mempolicy_home_node".to_string()),
            "{names:?}"
        );
        assert!(!names.contains(&"clone3".to_string()), "{names:?}");
        assert!(!names.contains(&"faccessat2".to_string()), "{names:?}");
        assert!(highest_known() >= 450);
    }

    #[test]
    fn permissive_or_enosys_defaults_get_no_rules() {
        for profile in [
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO"}]}"#,
            r#"{"defaultAction": "SCMP_ACT_LOG"}"#,
            r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38, "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}"#,
        ] {
            let mut s = spec(profile);
            assert_eq!(add_enosys_rules(&mut s), 0, "{profile}");
            assert!(enosys_names(&s).is_empty(), "{profile}");
        }
        // No profile at all: nothing to do.
        let mut s: Spec = serde_json::from_str(
            r#"{"ociVersion": "1.0.2", "root": {"path": "/r"},
                "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
        )
        .unwrap();
        assert_eq!(add_enosys_rules(&mut s), 0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_filter_answers_enosys_above_its_limit_only() {
        // In a child: the filter stays with the process that loads it.
        // SAFETY: the child makes only raw syscalls and _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: raw syscalls with integer arguments; _exit ends the child.
                unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    // pidfd_open (434) works without the filter.
                    let code = if load_enosys_filter(300).is_err() {
                        2
                    } else if libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) != -1
                        || *libc::__errno_location() != libc::ENOSYS
                    {
                        3
                    } else if libc::syscall(libc::SYS_getppid) <= 0 {
                        4
                    } else {
                        0
                    };
                    libc::_exit(code)
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
