//! The jailer's parent side: prepare the jail, fork, supervise the VMM, clean up.
//!
//! The parent stays small and single-threaded: it forks one child, which sets up the jail
//! ([`crate::child`]) and execs the VMM; the parent forwards SIGTERM, SIGINT and SIGHUP to
//! it, waits for it, removes the cgroup and the jail directory, and returns the VMM's
//! exit code (128 + signal if it was killed).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chown, fork, pipe2, ForkResult, Gid, Pid, Uid};

use crate::cgroup::{Cgroup, CgroupError, CGROUP_ROOT};
use crate::child::{ChildPlan, Mount};
use crate::elf::ElfError;
use crate::jail::{JailDir, JailError, Kind};
use crate::spec::{claim, Bind, JailSpec, SpecError, ENV_ALLOW_LIST};

/// Everything that can stop a jail from starting or from being cleaned up.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RunError {
    /// invalid jail request
    Spec(#[from] SpecError),
    /// finding the VMM's shared libraries
    Elf(#[from] ElfError),
    /// cgroup
    Cgroup(#[from] CgroupError),
    /// jail directory
    Jail(#[from] JailError),
    /// the jailer has {0} threads; it forks and must be single-threaded
    Threads(usize),
    /// {what}
    Sys {
        what: &'static str,
        source: nix::Error,
    },
    /// {what} {path:?}
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// argument {0:?} contains a NUL byte
    Nul(String),
    /// setting up the jail: {0}
    Child(String),
    /// the jailer's parent exited before the VMM started (--die-with-parent)
    ParentGone,
    /// the VMM exited with {code}, but cleaning up failed
    Cleanup { code: i32, source: Box<RunError> },
    /// {error}; cleaning up failed too: {cleanup}
    AndCleanup {
        error: Box<RunError>,
        cleanup: Box<RunError>,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> RunError {
    move |source| RunError::Sys { what, source }
}

/// The signals the parent forwards to the VMM (SIGCHLD tells it the VMM exited).
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// Runs the VMM jailed as `spec` says and returns its exit code. Nothing is left behind
/// on any path out: not the jail directory, not the cgroup.
pub fn run(spec: &JailSpec) -> Result<i32, RunError> {
    let cgroup_root = Path::new(CGROUP_ROOT);
    spec.check_host()?;
    ensure_single_threaded()?;
    ensure_stdio_open()?;
    // Blocked from the start, so none is lost (or kills the jailer before it can clean
    // up); they are taken with sigwait once the VMM runs, and unblocked in the child.
    let mut waited = SigSet::empty();
    for s in FORWARDED {
        waited.add(s);
    }
    waited.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), Some(&mut old_mask))
        .map_err(sys("blocking signals"))?;
    if spec.die_with_parent {
        let parent = nix::unistd::getppid();
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(sys("PR_SET_PDEATHSIG"))?;
        if nix::unistd::getppid() != parent {
            return Err(RunError::ParentGone);
        }
    }
    let libs = crate::elf::dependencies(&spec.exec)?;
    let netns = match &spec.netns {
        Some(p) => Some(OwnedFd::from(File::open(p).map_err(|source| {
            RunError::Io {
                what: "opening network namespace",
                path: p.clone(),
                source,
            }
        })?)),
        None => None,
    };
    // Changes nothing if a live jailer holds this id.
    let mut jail = JailDir::acquire(&spec.jail_root, &spec.id)?;
    let mut cgroup = None;
    let outcome = start_and_wait(
        spec,
        cgroup_root,
        &mut jail,
        &libs,
        netns,
        (&waited, old_mask),
        &mut cgroup,
    );
    // Both, even if the first fails.
    let cgroup_removed = cgroup
        .as_ref()
        .map_or(Ok(()), Cgroup::remove)
        .map_err(RunError::from);
    let jail_removed = jail.remove().map_err(RunError::from);
    match (outcome, cgroup_removed.and(jail_removed)) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(code), Err(e)) => Err(RunError::Cleanup {
            code,
            source: Box::new(e),
        }),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(cleanup)) => Err(RunError::AndCleanup {
            error: Box::new(e),
            cleanup: Box::new(cleanup),
        }),
    }
}

fn start_and_wait(
    spec: &JailSpec,
    cgroup_root: &Path,
    jail: &mut JailDir,
    libs: &[PathBuf],
    netns: Option<OwnedFd>,
    (waited, old_mask): (&SigSet, SigSet),
    cgroup: &mut Option<Cgroup>,
) -> Result<i32, RunError> {
    // A jailer that was SIGKILLed left these; its VMM died with it (PR_SET_PDEATHSIG).
    if spec.limits.is_some() {
        Cgroup::remove_stale(cgroup_root, &spec.id)?;
    }
    if jail.is_stale() {
        jail.clear_stale()?;
    }
    let plan = prepare(spec, jail, libs, netns, old_mask)?;
    if let Some(limits) = spec.limits {
        *cgroup = Some(Cgroup::create(cgroup_root, &spec.id, limits)?);
    }
    supervise(spec, plan, waited, cgroup.as_ref())
}

/// Fills the jail directory and computes the child's plan.
fn prepare(
    spec: &JailSpec,
    jail: &JailDir,
    libs: &[PathBuf],
    netns: Option<OwnedFd>,
    sigmask: SigSet,
) -> Result<ChildPlan, RunError> {
    let root = jail.create_root(spec.uid, spec.gid, spec.tun)?;
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let mut mounts = Vec::new();
    let mut add = |bind: &Bind, kind, flags| -> Result<(), RunError> {
        let target = jail.create_target(bind, kind)?;
        mounts.push(Mount {
            source: bind.host.clone(),
            target,
            flags,
        });
        Ok(())
    };
    add(
        &Bind {
            host: spec.exec.clone(),
            jail: spec.exec_in_jail.clone(),
        },
        Kind::File,
        ro,
    )?;
    // The libraries go where the loader looks for them: their host paths.
    let mut taken = spec.jail_paths_in_use();
    for lib in libs {
        claim(&mut taken, lib)?;
        let bind = Bind {
            host: lib.clone(),
            jail: lib.clone(),
        };
        add(&bind, Kind::File, ro)?;
    }
    for b in &spec.ro_binds {
        add(b, kind_of(&b.host)?, ro | MsFlags::MS_NOEXEC)?;
    }
    if let Some(b) = &spec.rw_bind {
        // The VMM creates its sockets and the serial log here.
        chown(
            &b.host,
            Some(Uid::from_raw(spec.uid)),
            Some(Gid::from_raw(spec.gid)),
        )
        .map_err(sys("chown of the --rw-bind directory"))?;
        add(
            b,
            Kind::Dir,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        )?;
    }
    let exec = cstring(spec.exec_in_jail.as_os_str())?;
    let mut argv = vec![exec.clone()];
    for a in &spec.vmm_args {
        argv.push(cstring(a)?);
    }
    let mut envp = Vec::new();
    for key in ENV_ALLOW_LIST {
        if let Some(v) = std::env::var_os(key) {
            let mut kv = format!("{key}=").into_bytes();
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstring(OsStr::from_bytes(&kv))?);
        }
    }
    Ok(ChildPlan {
        root,
        mounts,
        netns,
        uid: spec.uid,
        gid: spec.gid,
        rlimit_nofile: spec.rlimit_nofile,
        rlimit_fsize: spec.rlimit_fsize,
        keep_fds: spec.keep_fds.clone(),
        exec,
        argv,
        envp,
        sigmask,
    })
}

/// Forks the child, lets it into the cgroup, and waits for the VMM while forwarding signals.
fn supervise(
    spec: &JailSpec,
    plan: ChildPlan,
    waited: &SigSet,
    cgroup: Option<&Cgroup>,
) -> Result<i32, RunError> {
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
    if spec.new_pid_ns {
        // The next child becomes PID 1 of a new PID namespace.
        unshare(CloneFlags::CLONE_NEWPID).map_err(sys("unshare(CLONE_NEWPID)"))?;
    }
    // SAFETY: the process is single-threaded (checked in `run`), so the child is a full
    // copy in which allocation and locking are safe until it execs or `_exit`s.
    let child = match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Child => {
            drop(go_w);
            drop(err_r);
            let msg = crate::child::setup_and_exec(&plan, &go_r, err_w.as_raw_fd());
            let _ = nix::unistd::write(&err_w, msg.as_bytes());
            // SAFETY: _exit ends the child without running the parent's atexit handlers
            // or flushing its copied stdio buffers.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(go_r);
    drop(err_w);
    if let Err(e) = cgroup.map_or(Ok(()), |c| c.add(child.as_raw())) {
        let _ = kill(child, Signal::SIGKILL);
        let _ = waitpid(child, None);
        return Err(e.into());
    }
    // `go_w` stays open until we return: the child checks it to know we are alive.
    nix::unistd::write(&go_w, b"g").map_err(sys("starting the child"))?;
    let mut msg = String::new();
    let _ = File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        let _ = waitpid(child, None);
        return Err(RunError::Child(msg));
    }
    loop {
        let sig = waited.wait().map_err(sys("sigwait"))?;
        if sig == Signal::SIGCHLD {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)).map_err(sys("waitpid"))? {
                WaitStatus::Exited(_, code) => return Ok(code),
                WaitStatus::Signaled(_, s, _) => return Ok(128 + s as i32),
                _ => continue,
            }
        }
        let _ = kill(child, forwarded_as(child, sig, spec.new_pid_ns));
    }
}

/// The signal to send for `sig`. As PID 1 of its own namespace the VMM would never see a
/// signal it has no handler for (the kernel drops it), so it gets SIGKILL instead.
fn forwarded_as(child: Pid, sig: Signal, pid_ns_init: bool) -> Signal {
    if pid_ns_init && !catches(child, sig) {
        Signal::SIGKILL
    } else {
        sig
    }
}

/// Whether `pid` has a handler for `sig` (the `SigCgt` mask in /proc/PID/status).
fn catches(pid: Pid, sig: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    sig_mask(&status, "SigCgt").is_some_and(|m| m & (1 << (sig as u32 - 1)) != 0)
}

/// A hex mask line of /proc/PID/status, e.g. `SigCgt: 0000000000004002`.
fn sig_mask(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn ensure_single_threaded() -> Result<(), RunError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| RunError::Io {
        what: "reading",
        path: "/proc/self/status".into(),
        source,
    })?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if threads == 1 {
        Ok(())
    } else {
        Err(RunError::Threads(threads))
    }
}

/// Opens /dev/null on any of 0-2 that is closed, so that no pipe or lock file of the
/// jailer lands there and is passed to the VMM as its stdio.
fn ensure_stdio_open() -> Result<(), RunError> {
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF) {
            // The lowest free descriptor is `fd` itself; keep it open for the process.
            let null = File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|source| RunError::Io {
                    what: "opening",
                    path: "/dev/null".into(),
                    source,
                })?;
            let got = std::os::fd::IntoRawFd::into_raw_fd(null);
            if got != fd {
                return Err(RunError::Sys {
                    what: "reopening a closed stdio descriptor",
                    source: nix::errno::Errno::EBADF,
                });
            }
        }
    }
    Ok(())
}

fn kind_of(p: &Path) -> Result<Kind, RunError> {
    let m = std::fs::metadata(p).map_err(|source| RunError::Io {
        what: "reading",
        path: p.to_owned(),
        source,
    })?;
    Ok(if m.is_dir() { Kind::Dir } else { Kind::File })
}

fn cstring(s: &OsStr) -> Result<CString, RunError> {
    CString::new(s.as_bytes()).map_err(|_| RunError::Nul(s.to_string_lossy().into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_their_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let p = || PathBuf::from("/x");
        let errors = [
            RunError::Spec(SpecError::BadId("a/b".into())),
            RunError::Elf(ElfError::Read {
                path: p(),
                source: io(),
            }),
            RunError::Cgroup(CgroupError::Io {
                what: "create",
                path: p(),
                source: io(),
            }),
            RunError::Jail(JailError::Io {
                what: "create",
                path: p(),
                source: io(),
            }),
            RunError::Jail(JailError::NoDevice {
                path: "/dev/kvm",
                source: io(),
            }),
            RunError::Sys {
                what: "fork",
                source: nix::Error::EAGAIN,
            },
            RunError::Io {
                what: "write",
                path: p(),
                source: io(),
            },
            RunError::Cleanup {
                code: 0,
                source: Box::new(RunError::Sys {
                    what: "rmdir",
                    source: nix::Error::EBUSY,
                }),
            },
        ];
        for e in &errors {
            vessel_testutil::assert_cause_printed_once(e);
        }
    }

    #[test]
    fn signal_masks() {
        let status = "Name:\tx\nSigBlk:\t0000000000000000\nSigCgt:\t0000000000004002\n";
        let m = sig_mask(status, "SigCgt").unwrap();
        // Bit n-1 for signal n: SIGINT (2) and SIGTERM (15).
        assert_ne!(m & (1 << (Signal::SIGINT as u32 - 1)), 0);
        assert_ne!(m & (1 << (Signal::SIGTERM as u32 - 1)), 0);
        assert_eq!(m & (1 << (Signal::SIGHUP as u32 - 1)), 0);
        assert_eq!(sig_mask("nothing", "SigCgt"), None);
    }

    #[test]
    fn not_pid_ns_init_forwards_as_is() {
        let me = Pid::this();
        assert_eq!(forwarded_as(me, Signal::SIGHUP, false), Signal::SIGHUP);
        // This test process has no SIGHUP handler.
        assert_eq!(forwarded_as(me, Signal::SIGHUP, true), Signal::SIGKILL);
    }
}
