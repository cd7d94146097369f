//! libcontainer runs in a short-lived child process of the agent.
//!
//! libcontainer forks with raw `clone3`, which skips the atfork handlers that
//! make fork safe in a multi-threaded process (the allocator lock of another
//! tokio thread could be held in the child forever). So the agent re-executes
//! itself as `vessel-agent --libcontainer-helper <request json>`: a
//! single-threaded process that builds the container (or the exec process) with
//! `as_sibling`, so the container's processes become children of the agent
//! (the helper's parent) and the agent's reaper gets their exit statuses.
//! The helper's stdin/stdout/stderr are the process's stdio; it reports the
//! pid or an error in a result file.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use super::executor::{self, VesselExecutor};
use crate::reaper::Reaper;
use crate::stdio::ChildStdio;

/// How long creating a container or an exec process may take.
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// First argument that selects helper mode.
pub const HELPER_ARG: &str = "--libcontainer-helper";

#[derive(Debug, Serialize, Deserialize)]
pub enum HelperOp {
    /// Create a container from `<bundle>/config.json`; its init runs the
    /// `startContainer` hooks before the payload (see [`super::executor`]).
    Create {
        bundle: PathBuf,
        start_hooks: Vec<oci_spec::runtime::Hook>,
    },
    /// Run the process in `process_json` in the running container, whose
    /// init is `init_pid` (its user namespace is joined first).
    Exec {
        process_json: PathBuf,
        init_pid: i32,
    },
    /// Remount `path` read-only in the mount namespace of process `pid`
    /// (a created container's init, waiting for start). Result: pid 0.
    RemountReadOnly { pid: i32, path: PathBuf },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HelperRequest {
    /// libcontainer state root.
    pub root: PathBuf,
    pub container_id: String,
    pub op: HelperOp,
    /// Where libcontainer sends the pty master of a terminal process.
    pub console_socket: Option<PathBuf>,
    /// Where the helper writes its [`HelperResult`].
    pub result: PathBuf,
    /// Where libcontainer's own log goes (the console in the guest), and
    /// whether to include debug lines.
    pub log: Option<PathBuf>,
    pub debug: bool,
    /// Whether the helper has the write end of a start report pipe at
    /// [`executor::REPORT_FD`] for the container's init.
    pub report: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum HelperResult {
    Pid(i32),
    Error(String),
}

/// Runs the helper for `req` and returns the pid of the created process.
/// `report`: the write end of the start report pipe, given to the helper at
/// [`executor::REPORT_FD`] (`req.report` must say so).
pub async fn run(
    reaper: &Reaper,
    req: &HelperRequest,
    stdio: ChildStdio,
    report: Option<&OwnedFd>,
) -> Result<i32, String> {
    let arg = serde_json::to_string(req).map_err(|e| format!("encode helper request: {e}"))?;
    let _ = std::fs::remove_file(&req.result);
    let to_stdio = |fd: Option<OwnedFd>| fd.map_or_else(Stdio::null, Stdio::from);
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG)
        .arg(arg)
        .stdin(to_stdio(stdio.stdin))
        .stdout(to_stdio(stdio.stdout))
        .stderr(to_stdio(stdio.stderr));
    if let Some(fd) = report {
        let fd = fd.as_raw_fd();
        // SAFETY: between fork and exec only dup2/fcntl, which are
        // async-signal-safe; `fd` stays open in the agent until spawn returns.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let target = executor::REPORT_FD;
                let rc = if fd == target {
                    libc::fcntl(fd, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, target)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("start libcontainer helper: {e}"))?;
    // The reaper keeps statuses of pids nobody subscribed to yet.
    let pid = child.id() as i32;
    let mut exit = reaper.subscribe(pid);
    let status = match tokio::time::timeout(HELPER_TIMEOUT, &mut exit).await {
        Ok(status) => status,
        Err(_) => {
            log::error!("libcontainer helper {pid} hangs; killing it");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = exit.await;
            return Err(format!(
                "libcontainer did not finish within {}s",
                HELPER_TIMEOUT.as_secs()
            ));
        }
    };
    let result = std::fs::read(&req.result);
    let _ = std::fs::remove_file(&req.result);
    match result
        .ok()
        .and_then(|b| serde_json::from_slice::<HelperResult>(&b).ok())
    {
        Some(HelperResult::Pid(pid)) => Ok(pid),
        Some(HelperResult::Error(e)) => Err(e),
        None => Err(format!(
            "libcontainer helper ended without a result ({status:?})"
        )),
    }
}

/// Entry point of the helper process.
pub fn main(arg: &str) -> ExitCode {
    let req: HelperRequest = match serde_json::from_str(arg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vessel-agent helper: bad request: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &req.log {
        init_tracing(path, req.debug);
    }
    if req.report {
        // Inherited by the container's init (a fork), closed by its exec
        // and by the hooks' exec.
        // SAFETY: fcntl on the fd the agent passed us; no memory involved.
        unsafe { libc::fcntl(executor::REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // Opened first: an operation may leave the agent's mount namespace.
    let Ok(mut out) = std::fs::File::create(&req.result) else {
        eprintln!(
            "vessel-agent helper: cannot create {}",
            req.result.display()
        );
        return ExitCode::FAILURE;
    };
    let result = match build(&req) {
        Ok(pid) => HelperResult::Pid(pid),
        Err(e) => HelperResult::Error(e),
    };
    let ok = matches!(result, HelperResult::Pid(_));
    let json = serde_json::to_vec(&result).unwrap_or_default();
    if std::io::Write::write_all(&mut out, &json).is_err() || !ok {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Sends libcontainer's tracing output to `path` (opened once: the container's
/// init process keeps logging through the fd after pivot_root).
fn init_tracing(path: &Path, debug: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
    else {
        return;
    };
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::WARN
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_max_level(level)
        .with_ansi(false)
        .without_time()
        .try_init();
}

fn build(req: &HelperRequest) -> Result<i32, String> {
    let builder = ContainerBuilder::new(req.container_id.clone(), SyscallType::Linux)
        .with_root_path(&req.root)
        .map_err(|e| format!("libcontainer root {}: {e}", req.root.display()))?
        .with_console_socket(req.console_socket.as_deref());
    match &req.op {
        HelperOp::Create {
            bundle,
            start_hooks,
        } => {
            let executor = VesselExecutor::new(
                req.container_id.clone(),
                bundle.clone(),
                start_hooks.clone(),
                req.report.then_some(executor::REPORT_FD),
            );
            let container = builder
                .with_executor(executor)
                .validate_id()
                .map_err(|e| format!("container id {:?}: {e}", req.container_id))?
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| format!("create container {}: {e}", req.container_id))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer created the container but reports no pid".into())
        }
        HelperOp::RemountReadOnly { pid, path } => remount_read_only(*pid, path).map(|()| 0),
        HelperOp::Exec {
            process_json,
            init_pid,
        } => {
            join_user_namespace(*init_pid)?;
            builder
                .with_executor(VesselExecutor::new(
                    req.container_id.clone(),
                    PathBuf::new(),
                    Vec::new(),
                    None,
                ))
                .as_tenant()
                .with_detach(true)
                .as_sibling(true)
                .with_process(Some(process_json))
                .build()
                .map(|p| p.as_raw())
                .map_err(|e| format!("exec in container {}: {e}", req.container_id))
        }
    }
}

/// Enters the user namespace of process `pid` if it has its own.
/// libcontainer 0.7's exec joins the container's other namespaces but not
/// its user namespace (its tenant builder leaves "user" out), so the
/// process would run as the VM's root; from here it inherits this one.
/// The helper keeps full capabilities in it (it is the namespace's
/// parent's root) and its file accesses keep its VM ids.
fn join_user_namespace(pid: i32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/proc/{pid}/ns/user");
    let theirs = std::fs::metadata(&path).map_err(|e| format!("{path}: {e}"))?;
    let ours =
        std::fs::metadata("/proc/self/ns/user").map_err(|e| format!("own user namespace: {e}"))?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Ok(());
    }
    let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("enter the user namespace of {pid}: {e}"))
}

/// Enters the mount namespace of `pid` (its root: the container's, after
/// pivot_root) and remounts `path` read-only, keeping its other flags.
fn remount_read_only(pid: i32, path: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sys::statvfs::{statvfs, FsFlags};
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| format!("mount namespace of {pid}: {e}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("enter the mount namespace of {pid}: {e}"))?;
    let st = statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (f, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(f) {
            flags |= m;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("remount {} read-only: {e}", path.display()))
}

/// Receives the pty master that libcontainer sends on the console socket.
pub async fn receive_console(listener: &tokio::net::UnixListener) -> Result<OwnedFd, String> {
    let accept = tokio::time::timeout(std::time::Duration::from_secs(10), listener.accept());
    let (stream, _) = accept
        .await
        .map_err(|_| "no console connection from libcontainer".to_string())?
        .map_err(|e| format!("accept console connection: {e}"))?;
    let stream = stream
        .into_std()
        .map_err(|e| format!("console socket: {e}"))?;
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(std::time::Duration::from_secs(10))))
        .map_err(|e| format!("console socket: {e}"))?;
    tokio::task::spawn_blocking(move || recv_fd(stream.as_raw_fd()))
        .await
        .map_err(|e| format!("console receive task: {e}"))?
}

fn recv_fd(sock: std::os::fd::RawFd) -> Result<OwnedFd, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| format!("receive pty master: {e}"))?;
    for c in msg
        .cmsgs()
        .map_err(|e| format!("receive pty master: {e}"))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed `fd` in this process; nothing
                // else owns it, and extra fds (none expected) are closed below.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                for &extra in &fds[1..] {
                    // SAFETY: as above, freshly received and otherwise unowned.
                    drop(unsafe { OwnedFd::from_raw_fd(extra) });
                }
                return Ok(owned);
            }
        }
    }
    Err("console socket message carried no fd".into())
}

/// Removes a file if it exists (console sockets, results).
pub fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}
