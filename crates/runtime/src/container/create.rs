//! `create`: checks the bundle, claims the id, and launches the supervisor
//! (a detached re-exec of the CLI) that boots the VM and creates the
//! container. Every failure removes everything that was created.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::bundle::Bundle;
use super::state::{now_rfc3339, process_start_time};
use super::{container_dir, hooks, share, ContainerError, ContainerLock, Result, State, Status};
use crate::network::SandboxNetns;
use crate::Config;

/// Fd number at which a supervisor finds its readiness pipe.
pub const SYNC_FD: i32 = 3;

pub struct CreateOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// The supervisor command (`vessel ... supervise ...`), without the fd.
    pub supervisor: Command,
}

/// Creates the container; returns the supervisor's pid.
pub fn create(config: &Config, mut opts: CreateOptions) -> Result<u32> {
    let dir = container_dir(&config.state_root, &opts.id)?;
    let bundle = Bundle::load(&opts.bundle)?;
    if bundle.spec.get("process").is_none() {
        return Err(ContainerError::BadBundle {
            bundle: opts.bundle.display().to_string(),
            reason: "config.json has no process".into(),
        });
    }
    if config.channel != vessel_hypervisor::AgentChannel::Vsock {
        return Err(ContainerError::NeedsVsock { id: opts.id });
    }
    // The supervisor builds the backend; a backend that cannot run on this host
    // fails here, before anything is created.
    crate::backend::preflight(config)?;
    if bundle.terminal() && opts.console_socket.is_none() {
        return Err(ContainerError::Console(
            "process.terminal is set: pass --console-socket (as with runc)".into(),
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&config.state_root)
        .map_err(|e| ContainerError::io(&config.state_root, e))?;
    // The whole creation runs under the id's lock: a concurrent `delete`
    // sees either nothing or a complete state.json.
    let lock = ContainerLock::acquire(&config.state_root, &opts.id)?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ContainerError::Exists(opts.id))
        }
        Err(e) => return Err(ContainerError::io(&dir, e)),
    }
    let res = create_in(config, &mut opts, &bundle, &dir);
    if res.is_err() {
        crate::network::remove_owned_netns(&config.state_root, &opts.id);
        undo(&dir);
        lock.remove();
    }
    res
}

/// Removes what a failed or aborted create left in `dir` (caller holds the lock).
pub(super) fn undo(dir: &Path) {
    let (vm_root, vm_id) = super::vm_location(dir);
    if !vm_root.starts_with(dir) {
        let _ = std::fs::remove_dir_all(vm_root.join(vm_id));
    }
    if let Err(e) = share::remove_container_dir(dir) {
        log::error!("cleanup of {}: {}", dir.display(), crate::chain(&e));
    }
}

fn create_in(
    config: &Config,
    opts: &mut CreateOptions,
    bundle: &Bundle,
    dir: &Path,
) -> Result<u32> {
    // The supervisor (the container's pid) and the VMM live in the
    // sandbox's network namespace: host tools that configure the container's
    // network through its pid (CNI via /proc/<pid>/ns/net) reach it.
    let netns = SandboxNetns::for_spec(&bundle.spec, &config.state_root, &opts.id)
        .map_err(|e| ContainerError::Network(crate::chain(&e).to_string()))?;
    let (vm_root, vm_id) = super::vm_location(dir);
    let mut state = State {
        id: opts.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        status: Status::Creating,
        pid: 0,
        pid_start_time: 0,
        guest_pid: 0,
        created: now_rfc3339(),
        annotations: bundle.annotations(),
        exit_status: None,
        vm_dir: vm_root.join(vm_id),
        vm_root,
        execs: Vec::new(),
    };
    state.save(dir)?;
    let stdio = !bundle.terminal();
    let netns_fd = netns.as_ref().map(|n| n.fd().as_raw_fd());
    log::debug!(
        "{}: starting the supervisor: {:?}",
        opts.id,
        opts.supervisor
    );
    let (mut child, reply) = spawn_supervisor(&mut opts.supervisor, stdio, netns_fd)?;
    drop(netns);
    log::debug!(
        "{}: supervisor {} replied {:?}",
        opts.id,
        child.id(),
        reply.trim_end()
    );
    let guest_pid = match parse_reply(&reply) {
        Ok(pid) => pid,
        Err(msg) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ContainerError::Supervisor(msg));
        }
    };
    state.pid = child.id();
    state.pid_start_time = process_start_time(state.pid).unwrap_or(0);
    state.guest_pid = guest_pid;
    state.status = Status::Created;
    state.save(dir)?;
    let oci = state.oci();
    for kind in ["prestart", "createRuntime", "createContainer"] {
        if let Err(e) = hooks::run(&bundle.spec, kind, &oci) {
            kill_and_reap(&mut child);
            return Err(e);
        }
    }
    if let Some(p) = &opts.pid_file {
        if let Err(e) = write_pid_file(p, state.pid) {
            kill_and_reap(&mut child);
            return Err(e);
        }
    }
    Ok(state.pid)
}

/// Stops the supervisor (SIGTERM: as `delete --force`, it stops the VM and
/// cleans up) and reaps it.
fn kill_and_reap(child: &mut Child) {
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

/// Writes `pid` to `path` atomically, as runc does.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let tmp = path.with_extension("vessel-tmp");
    std::fs::write(&tmp, pid.to_string()).map_err(|e| ContainerError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ContainerError::io(path, e))
}

fn parse_reply(reply: &str) -> std::result::Result<u32, String> {
    let line = reply.lines().next().unwrap_or_default();
    if let Some(pid) = line.strip_prefix("OK ") {
        return pid
            .parse()
            .map_err(|_| format!("bad readiness line {line:?}"));
    }
    if let Some(msg) = line.strip_prefix("ERR ") {
        return Err(msg.to_string());
    }
    Err("the supervisor exited before the container was created (see the log)".into())
}

/// Starts `cmd` in its own session with the write end of a pipe at fd
/// [`SYNC_FD`], in the network namespace open at `netns` if given; waits
/// for its readiness line (or EOF). With `inherit_stdio` the caller's fds
/// 0-2 are passed on; else /dev/null.
pub fn spawn_supervisor(
    cmd: &mut Command,
    inherit_stdio: bool,
    netns: Option<RawFd>,
) -> Result<(Child, String)> {
    let (rd, wr): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Supervisor(e.to_string()))?;
    let w = wr.as_raw_fd();
    if !inherit_stdio {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only async-signal-safe functions (setsid, setns, dup2, fcntl) on plain
    // ints; the namespace fd stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = netns {
                if libc::setns(ns, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let rc = if w == SYNC_FD {
                libc::fcntl(w, libc::F_SETFD, 0)
            } else {
                libc::dup2(w, SYNC_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| ContainerError::Supervisor(format!("cannot start: {e}")))?;
    drop(wr);
    // One line: a process that inherited the pipe by mistake must not keep us waiting.
    let mut reply = String::new();
    let _ = BufReader::new(std::fs::File::from(rd).take(64 * 1024)).read_line(&mut reply);
    Ok((child, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_replies() {
        assert_eq!(parse_reply("OK 42\n"), Ok(42));
        assert_eq!(parse_reply("ERR boom\n"), Err("boom".into()));
        assert!(parse_reply("").unwrap_err().contains("exited"));
        assert!(parse_reply("OK x\n").is_err());
    }

    #[test]
    fn sync_pipe_reaches_child() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo 'OK 7' >&3"]);
        let (mut child, reply) = spawn_supervisor(&mut cmd, false, None).unwrap();
        assert_eq!(parse_reply(&reply), Ok(7));
        assert!(child.wait().unwrap().success());
    }
}
