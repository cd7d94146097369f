//! Child processes of a VM: the hypervisor and its helper daemons.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::{Error, Result, VmConfig};

/// Interval for polling a file system condition that has no notification
/// (a socket created by another process).
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Spawns `cmd` with stdout and stderr to `log` (through a pipe into a
/// [`vessel_logcap::BoundedLog`] drained by a thread of this process, so the
/// log stays under `cfg.log_limits` whatever the child prints), stdin closed,
/// in its own process group, in the sandbox's host cgroup `cfg.cgroup` (it
/// joins before it execs: nothing of it runs outside), and with SIGKILL as
/// parent-death signal so that no helper outlives the process that
/// supervises the VM.
pub fn spawn(what: &'static str, cmd: Command, log: &Path, cfg: &VmConfig) -> Result<Child> {
    spawn_keeping(what, cmd, log, cfg, None)
}

/// Moves `file` to an fd number above stdio if it has one of 0..=2 (a
/// process started with stdio closed), so that a child can inherit it at its
/// own number ([`spawn_keeping`]) without a clash with the stdio the child
/// is given.
pub fn above_stdio(file: File) -> std::io::Result<File> {
    if file.as_raw_fd() > 2 {
        return Ok(file);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd (or -1).
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl just returned this fd and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// [`spawn`], and the child inherits `keep` (if any) at its own fd number
/// (see [`above_stdio`]). Every fd a child inherits keeps its number (the
/// tap fds of `crate::nic` too), so inherited fds cannot clash: they are
/// distinct open fds of this process.
pub fn spawn_keeping(
    what: &'static str,
    mut cmd: Command,
    log: &Path,
    cfg: &VmConfig,
    keep: Option<File>,
) -> Result<Child> {
    let procs = match &cfg.cgroup {
        Some(cg) => cg
            .procs_files()
            .map_err(|source| Error::Cgroup { what, source })?,
        None => Vec::new(),
    };
    let procs_fds = vessel_cgroup::raw_fds(&procs);
    let out = vessel_logcap::pipe_to(log, cfg.log_limits).map_err(|source| Error::Io {
        what: format!("create {}", log.display()),
        source,
    })?;
    let err = out.try_clone().map_err(|source| Error::Io {
        what: "dup log fd".into(),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let keep_fd = keep.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // write(2) (join_in_child, on fds `procs` keeps open until spawn returns),
    // prctl(2) and fcntl(2) on plain ints, which are async-signal-safe; it
    // reads only its own captured fd numbers.
    unsafe {
        cmd.pre_exec(move || {
            vessel_cgroup::join_in_child(&procs_fds)?;
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if keep_fd > 2 && libc::fcntl(keep_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|source| Error::Spawn { what, source })?;
    drop(keep);
    drop(procs);
    log::debug!("started {what} pid {:?}", child.id());
    Ok(child)
}

/// Moves the calling thread into the network namespace open at `ns`. Meant
/// for `pre_exec` (the child is single-threaded and then execs the VMM, which
/// keeps the namespace): only setns(2), which is async-signal-safe.
pub(crate) fn enter_netns(ns: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns on an fd number changes only this thread's namespace; a
    // bad fd or a non-namespace file is an error, no UB.
    if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until `path` exists, failing early if `child` exits.
pub async fn wait_for_path(
    path: &Path,
    child: &mut Child,
    what: &'static str,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::EarlyExit {
                what,
                status: status.to_string(),
                detail: exit_log_tail(log, 20),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("{what} to create {}", path.display()),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Sends SIGTERM, then SIGKILL after `grace`, and reaps `child`.
pub async fn terminate(child: &mut Child, grace: Duration) -> std::process::ExitStatus {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(status)) => status,
        _ => {
            let _ = child.start_kill();
            child
                .wait()
                .await
                .unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(9))
        }
    }
}

/// Waits until the first of `children` exits: its pid and status. Never returns when
/// there are none.
pub async fn first_exit(
    children: &mut [Child],
) -> (u32, std::io::Result<std::process::ExitStatus>) {
    use std::future::Future;
    use std::task::Poll;
    if children.is_empty() {
        return std::future::pending().await;
    }
    let mut waits: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let pid = c.id().unwrap_or(0);
            Box::pin(async move { (pid, c.wait().await) })
        })
        .collect();
    std::future::poll_fn(|cx| {
        for w in waits.iter_mut() {
            if let Poll::Ready(r) = w.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    })
    .await
}

/// How long [`terminate_all`] gives helpers to exit after SIGTERM, all together.
const HELPERS_GRACE: Duration = Duration::from_secs(2);

/// Stops every helper: SIGTERM to all at once, then SIGKILL to those still
/// there after one shared grace of [`HELPERS_GRACE`] (not one per helper).
pub async fn terminate_all(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = tokio::time::Instant::now() + HELPERS_GRACE;
    for c in children.iter_mut() {
        if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// Kills every helper at once (SIGKILL) and reaps them: for helpers whose VM is
/// already gone, which have nothing left to finish.
pub async fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        let _ = c.start_kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait().await;
    }
}

/// [`log_tail`] of the log of a process that has exited: first waits (at
/// most [`DRAIN_WAIT`]) for what it wrote last to leave the pipe that
/// [`spawn`] gave it, so the tail holds its last words.
pub fn exit_log_tail(path: &Path, lines: usize) -> String {
    vessel_logcap::wait_drained(path, DRAIN_WAIT);
    log_tail(path, lines)
}

/// How long [`exit_log_tail`] waits for a log's pipe to drain: a
/// descendant of an exited helper can keep the pipe open.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// The last `lines` lines of a log file (at most 16 KiB read), for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    // The logs live in the run directory, which a jailed VMM may write: never
    // follow a link planted there, and read nothing but a regular file (a FIFO
    // would block).
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return String::new();
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_exit_names_the_helper_that_died_first() {
        let mut children: Vec<Child> = ["sleep 100", "exit 3", "sleep 100"]
            .iter()
            .map(|s| {
                tokio::process::Command::new("sh")
                    .args(["-c", s])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let quitter = children[1].id().unwrap();
        let (pid, status) = first_exit(&mut children).await;
        assert_eq!(pid, quitter);
        assert_eq!(status.unwrap().code(), Some(3));
        terminate_all(&mut children).await;
        assert!(children.iter_mut().all(|c| c.try_wait().unwrap().is_some()));
    }

    /// `n` children that ignore SIGTERM (`sh` sets it ignored, which exec keeps).
    fn ignoring_sigterm(n: usize) -> Vec<Child> {
        (0..n)
            .map(|_| {
                tokio::process::Command::new("sh")
                    .args(["-c", "trap '' TERM; exec sleep 100"])
                    .spawn()
                    .unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn helpers_that_ignore_sigterm_share_one_grace() {
        let mut children = ignoring_sigterm(3);
        // Let the shells install their trap (an ignored signal stays ignored across exec).
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(5)
            && !children.iter().all(|c| {
                std::fs::read_to_string(format!("/proc/{}/status", c.id().unwrap())).is_ok_and(
                    |s| {
                        s.lines()
                            .find(|l| l.starts_with("SigIgn:"))
                            .and_then(|l| u64::from_str_radix(l[7..].trim(), 16).ok())
                            .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
                    },
                )
            })
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = std::time::Instant::now();
        terminate_all(&mut children).await;
        let took = t.elapsed();
        assert!(children.iter_mut().all(|c| c.try_wait().unwrap().is_some()));
        // One grace for all three, not one each (6 s).
        assert!(
            took >= HELPERS_GRACE && took < HELPERS_GRACE * 2,
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn kill_all_does_not_wait_for_a_grace() {
        let mut children = ignoring_sigterm(2);
        let t = std::time::Instant::now();
        kill_all(&mut children).await;
        assert!(children.iter_mut().all(|c| c.try_wait().unwrap().is_some()));
        assert!(t.elapsed() < HELPERS_GRACE, "{:?}", t.elapsed());
    }

    #[test]
    fn tail_of_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "c\nd");
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(log_tail(&link, 2), "", "a symlink is not followed");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(log_tail(&fifo, 2), "", "a FIFO is not read");
    }

    #[tokio::test]
    async fn early_exit_is_reported_with_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("h.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo helper failed: bad flag >&2; exit 3"]);
        let cfg = crate::tests::config(dir.path());
        let mut child = spawn("helper", cmd, &log, &cfg).unwrap();
        let err = wait_for_path(
            &dir.path().join("never"),
            &mut child,
            "helper",
            &log,
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("helper exited early") && msg.contains("bad flag"),
            "{msg}"
        );
    }
}
