//! End-to-end: runc's seccomp.bats and hooks.bats (v1.1.5) for `vessel`,
//! with real guests (issue 16 item 4): `defaultErrnoRet`, ENOSYS for
//! syscalls newer than the profile, and hooks that are killed.

mod common;

use common::{env, text};

/// Prints the errno of raw syscalls (0: it succeeded), as runc's
/// seccomp_syscall_test programs check them: raw, so that the C library
/// does not turn an ENOSYS into something else.
const PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
static int err(long r) { return r < 0 ? errno : 0; }
int main(void) {
    int chdir_ = err(syscall(SYS_chdir, "/"));
    int unshare_ = err(syscall(SYS_unshare, 0));
    int s450 = err(syscall(450, 0, 0, 0, 0));
    int s1000 = err(syscall(1000, 0xdeadbeef, 0xcafe));
    int getppid_ = err(syscall(SYS_getppid));
    printf("chdir=%d unshare=%d 450=%d 1000=%d getppid=%d\n",
           chdir_, unshare_, s450, s1000, getppid_);
    return 0;
}
"#;

/// What the container's set-up after the filter is loaded, a static C
/// program and the probe need; the highest is faccessat2 (439 on x86_64).
/// Not listed: chdir, unshare, and everything numbered above 439.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "arch_prctl",
    "brk",
    "capget",
    "capset",
    "clock_gettime",
    "clock_nanosleep",
    "clone",
    "clone3",
    "close",
    "close_range",
    "connect",
    "dup",
    "dup2",
    "dup3",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fchdir",
    "fchown",
    "fcntl",
    "fstat",
    "fstatfs",
    "futex",
    "getcwd",
    "getdents64",
    "getegid",
    "geteuid",
    "getgid",
    "getgroups",
    "getpeername",
    "getpid",
    "getppid",
    "getrandom",
    "getrlimit",
    "getsockname",
    "getsockopt",
    "gettid",
    "getuid",
    "ioctl",
    "kill",
    "listen",
    "lseek",
    "lstat",
    "madvise",
    "memfd_create",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "newfstatat",
    "open",
    "openat",
    "pipe",
    "pipe2",
    "poll",
    "ppoll",
    "prctl",
    "pread64",
    "prlimit64",
    "read",
    "readlink",
    "readlinkat",
    "readv",
    "recvfrom",
    "recvmsg",
    "rseq",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "seccomp",
    "sendmsg",
    "sendto",
    "set_robust_list",
    "set_tid_address",
    "setgid",
    "setgroups",
    "setresgid",
    "setresuid",
    "setsid",
    "setsockopt",
    "setuid",
    "sigaltstack",
    "socket",
    "socketpair",
    "stat",
    "statfs",
    "statx",
    "sysinfo",
    "tgkill",
    "umask",
    "uname",
    "wait4",
    "waitid",
    "write",
    "writev",
];

#[test]
fn seccomp_default_errno_ret_and_enosys_for_newer_syscalls_like_runc() {
    let Some(e) = env() else { return };
    let profile = |errno: u32| {
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": errno,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ALLOWED, "action": "SCMP_ACT_ALLOW"}]
        })
    };
    // runc's "seccomp defaultErrnoRet=ENXIO" and "-ENOSYS handling": a
    // syscall the profile does not name gets defaultErrnoRet (ENXIO, 6),
    // one numbered above every named one gets ENOSYS (38): 450, which
    // libseccomp knows, and 1000, which nothing knows (no_new_privs is set,
    // as in `vessel spec`).
    let b = e.bundle("enxio", &["/probe"], |c| {
        c["linux"]["seccomp"] = profile(6);
        assert_eq!(c["process"]["noNewPrivileges"], true);
    });
    common::build_probe(&b.join("rootfs"), PROBE);
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "enxio"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "chdir=6 unshare=6 450=38 1000=38 getppid=0\n",
        "{}",
        text(&o)
    );
    e.assert_clean("enxio");
    // defaultErrnoRet ENOSYS: everything not allowed gets it.
    let b = e.bundle("enosys", &["/probe"], |c| {
        c["linux"]["seccomp"] = profile(38)
    });
    common::build_probe(&b.join("rootfs"), PROBE);
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "enosys"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "chdir=38 unshare=38 450=38 1000=38 getppid=0\n",
        "{}",
        text(&o)
    );
    e.assert_clean("enosys");
}

#[test]
fn a_killed_hook_fails_run_with_the_hook_named_and_leaves_nothing() {
    let Some(e) = env() else { return };
    // runc's seccomp.bats "startContainer hook": the hook runs in the
    // container under its filter, which kills it (SIGSYS) for mkdir.
    let b = e.bundle("sc", &["true"], |c| {
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_KILL"}]
        });
        c["process"]["rlimits"] =
            serde_json::json!([{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]);
        c["hooks"] = serde_json::json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "mkdir /tmp/foo"]}
        ]});
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "sc"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        err.contains("error running startContainer hook #0 (/bin/sh)")
            && err.contains("bad system call"),
        "{}",
        text(&o)
    );
    e.assert_clean("sc");
    // A startContainer hook that succeeds runs before the process, in the
    // container, with the state on stdin.
    let b = e.bundle("ok", &["cat", "/tmp/state"], |c| {
        c["hooks"] = serde_json::json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "cat > /tmp/state"]}
        ]});
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "ok"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let state: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (state["id"].as_str(), state["pid"].as_u64()),
        (Some("ok"), Some(1))
    );
    e.assert_clean("ok");
    // runc's hooks.bats: a prestart or createRuntime hook (on the host)
    // killed by a signal fails create, naming the hook; nothing is left.
    for kind in ["prestart", "createRuntime"] {
        let b = e.bundle(&format!("h-{kind}"), &["true"], |c| {
            c["hooks"] = serde_json::json!({kind: [
                {"path": "/bin/true"},
                {"path": "/bin/sh", "args": ["sh", "-c", "kill -KILL $$"]}
            ]});
        });
        let o = e.run(&["create", "--bundle", b.to_str().unwrap(), "hk"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            err.contains(&format!("error running {kind} hook #1 (/bin/sh)"))
                && err.contains("SIGKILL"),
            "{}",
            text(&o)
        );
        e.assert_clean("hk");
    }
}
