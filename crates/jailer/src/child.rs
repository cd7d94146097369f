//! What the forked child does before it becomes the VMM: namespaces, mounts, pivot_root,
//! rlimits, file descriptors, privileges, exec.
//!
//! It runs in a copy of the single-threaded jailer (see [`crate::run`]), so allocating
//! and formatting errors is safe here. Everything it needs is prepared by the parent in
//! a [`ChildPlan`]. A failure is written to the error pipe and the child `_exit`s; a
//! successful exec closes that pipe (close-on-exec), which is how the parent knows.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::prctl;
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{chdir, execve, pivot_root, setgroups, setresgid, setresuid, setsid, Gid, Uid};

/// One bind mount: `source` (host path) onto `target` (host path inside the jail root),
/// then a remount with `flags` (MS_RDONLY, MS_NOSUID, ...).
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub flags: MsFlags,
}

/// Everything the child needs, prepared before the fork.
#[derive(Debug)]
pub struct ChildPlan {
    /// Host path of the jail's root directory.
    pub root: PathBuf,
    pub mounts: Vec<Mount>,
    pub netns: Option<OwnedFd>,
    pub uid: u32,
    pub gid: u32,
    pub rlimit_nofile: Option<u64>,
    pub rlimit_fsize: Option<u64>,
    /// Descriptors the VMM inherits (kept open, close-on-exec cleared).
    pub keep_fds: Vec<RawFd>,
    /// In-jail path of the VMM.
    pub exec: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// The signal mask to restore before exec (the parent blocks the ones it forwards).
    pub sigmask: SigSet,
}

/// Runs in the child: waits for the parent's go (it is then in its cgroup), sets up the
/// jail and execs the VMM. Returns only on failure, with what failed.
pub fn setup_and_exec(plan: &ChildPlan, go: &OwnedFd, err: RawFd) -> String {
    match setup(plan, go, err) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

type Step<T = ()> = Result<T, String>;

fn step<T>(what: &str, r: nix::Result<T>) -> Step<T> {
    r.map_err(|e| format!("{what}: {e}"))
}

fn setup(plan: &ChildPlan, go: &OwnedFd, err: RawFd) -> Step<std::convert::Infallible> {
    let mut byte = [0u8; 1];
    match nix::unistd::read(go.as_raw_fd(), &mut byte) {
        Ok(1) => {}
        other => return Err(format!("waiting for the jailer's go: {other:?}")),
    }
    // Own session: a terminal's ^C reaches the jailer, which forwards it.
    step("setsid", setsid())?;
    if let Some(ns) = &plan.netns {
        step(
            "joining the network namespace (setns)",
            setns(ns, CloneFlags::CLONE_NEWNET),
        )?;
    }
    step("unshare(CLONE_NEWNS)", unshare(CloneFlags::CLONE_NEWNS))?;
    // Nothing mounted from here on propagates back to the host.
    step(
        "making / private (MS_PRIVATE|MS_REC)",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    // pivot_root needs the new root to be a mount point.
    step(
        &format!("bind-mounting the jail {:?} onto itself", plan.root),
        mount(
            Some(&plan.root),
            &plan.root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    for m in &plan.mounts {
        step(
            &format!("bind-mounting {:?} onto {:?}", m.source, m.target),
            mount(
                Some(&m.source),
                &m.target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        )?;
        step(
            &format!("remounting {:?} with {:?}", m.target, m.flags),
            mount(
                None::<&str>,
                &m.target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | m.flags,
                None::<&str>,
            ),
        )?;
    }
    // pivot_root(".", "."): the old root ends up stacked on "/", then is detached.
    step("chdir into the jail", chdir(&plan.root))?;
    step("pivot_root", pivot_root(".", "."))?;
    step(
        "unmounting the old root",
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    step("chdir /", chdir("/"))?;
    // Read-only and nosuid, but not nodev: /dev/kvm lives on it.
    step(
        "remounting the jail root read-only",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
            None::<&str>,
        ),
    )?;
    if let Some(n) = plan.rlimit_nofile {
        set_rlimit(libc::RLIMIT_NOFILE, n, "RLIMIT_NOFILE")?;
    }
    if let Some(n) = plan.rlimit_fsize {
        set_rlimit(libc::RLIMIT_FSIZE, n, "RLIMIT_FSIZE")?;
    }
    let mut keep = vec![go.as_raw_fd(), err];
    keep.extend(&plan.keep_fds);
    close_fds_except(&keep)?;
    for fd in &plan.keep_fds {
        let flags = step("--keep-fd (F_GETFD)", fcntl(*fd, FcntlArg::F_GETFD))?;
        let flags = FdFlag::from_bits_truncate(flags) - FdFlag::FD_CLOEXEC;
        step("--keep-fd (F_SETFD)", fcntl(*fd, FcntlArg::F_SETFD(flags)))?;
    }
    step("PR_SET_NO_NEW_PRIVS", prctl::set_no_new_privs())?;
    drop_capability_bounding_set()?;
    step("dropping supplementary groups", setgroups(&[]))?;
    let (uid, gid) = (Uid::from_raw(plan.uid), Gid::from_raw(plan.gid));
    step(&format!("setresgid({gid})"), setresgid(gid, gid, gid))?;
    step(&format!("setresuid({uid})"), setresuid(uid, uid, uid))?;
    // After setuid (a credential change clears it): die with the jailer. If the jailer
    // already died, the go pipe's write end is closed and poll reports a hang-up.
    step("PR_SET_PDEATHSIG", prctl::set_pdeathsig(Signal::SIGKILL))?;
    let mut fds = [PollFd::new(go.as_fd(), PollFlags::POLLIN)];
    if step(
        "polling the jailer's pipe",
        poll(&mut fds, PollTimeout::ZERO),
    )? > 0
    {
        return Err("the jailer exited before the VMM started".into());
    }
    step(
        "restoring the signal mask",
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&plan.sigmask), None),
    )?;
    let e = execve(&plan.exec, &plan.argv, &plan.envp).unwrap_err();
    Err(format!("exec {:?} in the jail: {e}", plan.exec))
}

/// Empties the capability bounding set (and the ambient set): even a bug that let the
/// VMM exec something could not gain a capability back.
fn drop_capability_bounding_set() -> Step {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        let e = std::io::Error::last_os_error();
        return Err(format!("clearing the ambient capabilities: {e}"));
    }
    for cap in 0..64 {
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(format!(
                "dropping capability {cap} from the bounding set: {e}"
            ));
        }
    }
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64, name: &str) -> Step {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the rlimit struct we pass by reference and nothing else.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "setting {name} to {value}: {e} (above the hard limit needs CAP_SYS_RESOURCE)"
        ));
    }
    Ok(())
}

/// Closes every descriptor above 2 except `keep` (which are close-on-exec or closed by
/// exec's success). Uses close_range(2), or a loop up to RLIMIT_NOFILE without it.
fn close_fds_except(keep: &[RawFd]) -> Step {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for k in keep.iter().map(|k| *k as u32).chain([u32::MAX]) {
        if k < from {
            continue;
        }
        if k > from {
            close_range(from, k - 1)?;
        }
        from = k.saturating_add(1);
    }
    Ok(())
}

fn close_range(first: u32, last: u32) -> Step {
    // SAFETY: close_range only closes descriptors of this process; the ones the child
    // still uses (the pipes) are outside the range by construction.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(format!("close_range({first}, {last}): {e}"));
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = u64::from(last).min(lim.rlim_cur.saturating_sub(1));
    for fd in u64::from(first)..=end {
        // SAFETY: as above; closing a descriptor that is not open just fails with EBADF.
        unsafe { libc::close(fd as RawFd) };
    }
    Ok(())
}
