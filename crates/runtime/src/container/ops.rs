//! The OCI operations after `create`. Each one locks the container,
//! refreshes its status, checks the guard, acts through the agent, saves.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vessel_hypervisor::AgentEndpoint;

use super::control::{Call, Reply, Request};
use super::stdio::Relays;
use super::{
    hooks, share, Bundle, Container, ContainerError, ContainerLock, Result, State, Status,
};

/// How long `delete` waits for a supervisor to finish after asking it to stop.
const SUPERVISOR_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an operation waits for the supervisor's reply (the pod's agent
/// RPCs are bounded by 30 s each).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(10);

pub async fn start(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    // The supervisor starts init: it owns the pod and waits for the exit.
    c.act("start", &Request::Start).await?;
    c.state.status = Status::Running;
    c.save()?;
    if let Ok(b) = Bundle::load(&c.state.bundle) {
        if let Err(e) = hooks::run(&b.spec, "poststart", &c.state.oci()) {
            log::warn!("{id}: {}", crate::chain(&e));
        }
    }
    Ok(())
}

/// Signal 0 sends nothing: it succeeds when the container could be signalled.
pub async fn kill(root: &Path, id: &str, signal: u32, all: bool) -> Result<()> {
    let c = Container::open(root, id)?;
    if signal == 0 {
        return c.act("kill", &Request::Ping).await;
    }
    c.act("kill", &Request::Kill { signal, all }).await
}

pub async fn pause(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    c.act("pause", &Request::Pause).await?;
    c.state.status = Status::Paused;
    c.save()
}

pub async fn resume(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    c.act("resume", &Request::Resume).await?;
    c.state.status = Status::Running;
    c.save()
}

/// Sets the window size of the terminal of init (`exec_id` None) or an exec.
pub async fn resize(
    root: &Path,
    id: &str,
    exec_id: Option<&str>,
    rows: u16,
    cols: u16,
) -> Result<()> {
    let c = Container::open(root, id)?;
    let req = Request::Resize {
        exec_id: exec_id.map(str::to_string),
        rows,
        cols,
    };
    c.act("resize the terminal of", &req).await
}

/// Applies OCI `linux.resources` to the container's cgroup in the guest
/// (the VM keeps the vCPUs and memory it booted with).
pub async fn update(root: &Path, id: &str, resources: Value) -> Result<()> {
    let c = Container::open(root, id)?;
    c.act("update", &Request::Update { resources }).await
}

/// Guest pids of the container's processes.
pub async fn processes(root: &Path, id: &str) -> Result<Vec<u32>> {
    let c = Container::open(root, id)?;
    match c.call("list processes of", &Request::Processes).await? {
        (Reply::Pids { pids }, _) => Ok(pids),
        (other, _) => Err(unexpected(&other)),
    }
}

/// runc-style stats object (`events --stats` data).
pub async fn stats(root: &Path, id: &str) -> Result<Value> {
    let c = Container::open(root, id)?;
    match c.call("get stats of", &Request::Stats).await? {
        (Reply::Stats { stats }, _) => Ok(stats),
        (other, _) => Err(unexpected(&other)),
    }
}

fn unexpected(reply: &Reply) -> ContainerError {
    ContainerError::Supervisor(format!("unexpected reply {reply:?}"))
}

impl Container {
    /// Sends `req` to the container's supervisor (its pod acts, with its
    /// status guards); `op` names the operation in errors. A container whose
    /// supervisor no longer serves is stopped (init has exited).
    pub async fn call(&self, op: &'static str, req: &Request) -> Result<(Reply, Call)> {
        let wrong = |status| ContainerError::WrongState {
            id: self.id().to_string(),
            status,
            op,
        };
        let status = self.status();
        if matches!(status, Status::Creating | Status::Stopped) {
            return Err(wrong(status));
        }
        log::debug!("{}: {op}: request {req:?}", self.id());
        let (reply, call) = match Call::send(&self.dir, req, REQUEST_TIMEOUT).await {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return Err(wrong(Status::Stopped))
            }
            Err(e) => return Err(ContainerError::io(&self.dir.join(super::CONTROL_SOCKET), e)),
        };
        match reply {
            Reply::Refused { status } => Err(wrong(status)),
            Reply::Failed { error } => Err(ContainerError::Supervisor(error)),
            r => Ok((r, call)),
        }
    }

    /// [`Container::call`] for an operation that replies [`Reply::Done`].
    pub async fn act(&self, op: &'static str, req: &Request) -> Result<()> {
        match self.call(op, req).await? {
            (Reply::Done, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

/// The OCI state of a container.
pub fn state(root: &Path, id: &str) -> Result<Value> {
    Ok(Container::peek(root, id)?.oci())
}

/// The OCI state of a container, in runc's field order.
pub fn oci_state(root: &Path, id: &str) -> Result<super::state::OciState> {
    Ok(Container::peek(root, id)?.oci_state())
}

/// States of every container under `root` (unreadable entries skipped).
pub fn list(root: &Path) -> Vec<State> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if super::validate_id(&id).is_err() {
            continue;
        }
        if let Ok(mut s) = Container::peek(root, &id) {
            s.status = s.refreshed_status();
            out.push(s);
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Deletes a stopped container (`force`: any container), its VM and state.
/// Safe to run concurrently: deletes of one id serialize on its lock, and
/// the losers find the container gone (`NotFound`, which `delete --force`
/// treats as success). A directory without state.json (an aborted create)
/// is removed too.
pub async fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let dir = super::container_dir(root, id)?;
    let lock = ContainerLock::acquire(root, id)?;
    let mut state = match State::load(&dir, id) {
        Ok(s) => s,
        Err(ContainerError::NotFound(_)) => {
            if dir.exists() {
                super::create::undo(&dir);
                if dir.exists() {
                    return Err(ContainerError::StillMounted(dir.display().to_string()));
                }
            }
            lock.remove();
            return Err(ContainerError::NotFound(id.to_string()));
        }
        Err(e) => return Err(e),
    };
    if state.exit_status.is_none() {
        state.exit_status = super::read_exit(&dir);
    }
    let c = Container {
        dir,
        state,
        _lock: lock,
    };
    let status = c.status();
    if !force && !status.can_delete() {
        c.require("delete (use --force)", Status::can_delete)?;
    }
    if c.state.supervisor_alive() {
        if c.state.exit_status.is_none() {
            let stop = Call::send(&c.dir, &Request::Shutdown, Duration::from_secs(5)).await;
            if let Err(e) = stop {
                log::warn!("{id}: asking the supervisor to stop: {e}");
            }
        }
        wait_gone(&c.state, SUPERVISOR_EXIT_TIMEOUT);
        if c.state.supervisor_alive() {
            log::warn!("{id}: supervisor {} did not stop; killing it", c.state.pid);
            // SAFETY: kill(2) on a pid whose start time we just checked.
            unsafe { libc::kill(c.state.pid as i32, libc::SIGKILL) };
            wait_gone(&c.state, SUPERVISOR_EXIT_TIMEOUT);
        }
    }
    if !c.state.vm_root.starts_with(&c.dir) {
        let _ = std::fs::remove_dir_all(&c.state.vm_dir);
    }
    // A supervisor that was killed left the sandbox's host cgroup.
    crate::limits::remove_stale(&c.state.vm_dir);
    // A supervisor that was killed left its tc qdiscs on the namespace's links.
    crate::network::undo_recorded(root, id).await;
    crate::network::remove_owned_netns(root, id);
    let spec = Bundle::load(&c.state.bundle).map(|b| b.spec).ok();
    let mut oci = c.state.oci();
    oci["status"] = "stopped".into();
    share::remove_container_dir(&c.dir)?;
    c._lock.remove();
    if let Some(spec) = spec {
        if let Err(e) = hooks::run(&spec, "poststop", &oci) {
            log::warn!("{id}: {}", crate::chain(&e));
        }
    }
    Ok(())
}

fn wait_gone(state: &State, timeout: Duration) {
    let start = Instant::now();
    while state.supervisor_alive() && start.elapsed() < timeout {
        std::thread::sleep(POLL);
    }
}

/// A process started by `exec`, with its stdio relayed.
pub struct Exec {
    /// The supervisor's connection: the exit comes on it.
    call: Call,
    pub id: String,
    pub exec_id: String,
    pub pid: u32,
    pub relays: Relays,
}

/// Starts `process` (an OCI process object) in a running container, through
/// its supervisor; this process relays the stdio streams. Non-terminal: this
/// process's fds 0-2 are relayed. Terminal: the pty master goes to
/// `console_socket`, or without one, fds 0/1 are relayed to the tty.
pub async fn exec(
    root: &Path,
    id: &str,
    process: &Value,
    console_socket: Option<&Path>,
) -> Result<Exec> {
    let c = Container::open(root, id)?;
    if let Ok(b) = Bundle::load(&c.state.bundle) {
        b.check_process(process)
            .map_err(|reason| ContainerError::BadBundle {
                bundle: c.state.bundle.display().to_string(),
                reason,
            })?;
    }
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    );
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let req = Request::Exec {
        exec_id: exec_id.clone(),
        process: process.clone(),
        terminal,
    };
    let (pid, call) = match c.call("exec in", &req).await? {
        (Reply::Started { pid }, call) => (pid, call),
        (other, _) => return Err(unexpected(&other)),
    };
    let endpoint = AgentEndpoint::HybridVsock {
        uds: crate::sandbox::agent_socket(&c.state.vm_dir),
    };
    drop(c);
    let open = |stream| crate::agent::container::open_stream(&endpoint, id, Some(&exec_id), stream);
    let mut relays = Relays::default();
    if terminal {
        let stream = open(vessel_protocol::stdio::StdioStream::Tty).await?;
        let host = match console_socket {
            Some(sock) => {
                let pty = super::console::HostPty::open(24, 80)?;
                pty.send_master(sock)?;
                pty.slave
            }
            None => {
                // SAFETY: fd 1 is open for the process's lifetime; dup it.
                let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(1) };
                std::fs::File::from(
                    b.try_clone_to_owned()
                        .map_err(|e| ContainerError::io(Path::new("stdout"), e))?,
                )
            }
        };
        if console_socket.is_none() {
            // Input from fd 0, output to fd 1.
            let stream_in = stream
                .try_clone()
                .map_err(|e| ContainerError::io(Path::new("tty"), e))?;
            // SAFETY: fd 0 is open for the process's lifetime; dup it.
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
            let stdin = std::fs::File::from(
                b.try_clone_to_owned()
                    .map_err(|e| ContainerError::io(Path::new("stdin"), e))?,
            );
            relays.tty_input(stdin, stream_in);
            relays.output(stream, host);
        } else {
            relays
                .terminal(host, stream)
                .map_err(|e| ContainerError::Console(crate::chain(&e).to_string()))?;
        }
    } else {
        super::supervisor::attach_host_stdio(&endpoint, id, Some(&exec_id), &mut relays).await?;
    }
    Ok(Exec {
        call,
        id: id.to_string(),
        exec_id,
        pid,
        relays,
    })
}

impl Exec {
    /// Waits for the process (its exit status, shell convention) and its output.
    pub async fn wait(mut self) -> Result<i32> {
        let status = match self.call.next().await {
            Ok(Reply::Exited { status }) => status,
            Ok(other) => return Err(unexpected(&other)),
            Err(e) => {
                return Err(ContainerError::Supervisor(format!(
                    "{}: exec {} lost: {e}",
                    self.id, self.exec_id
                )))
            }
        };
        if !self.relays.drain(Duration::from_secs(10)) {
            log::warn!("{}: exec output still open after exit; cut", self.id);
        }
        Ok(status)
    }
}

/// The OCI process for `exec` from CLI flags, based on the container's own
/// process (env, user, cwd) as runc does.
pub fn exec_process(
    bundle_spec: &Value,
    args: &[String],
    env: &[String],
    cwd: Option<&str>,
    user: Option<(u32, u32)>,
    tty: bool,
) -> Value {
    let mut p = bundle_spec["process"].clone();
    if !p.is_object() {
        p = serde_json::json!({"cwd": "/", "user": {"uid": 0, "gid": 0}});
    }
    p["args"] = args.into();
    p["terminal"] = tty.into();
    if let Some(cwd) = cwd {
        p["cwd"] = cwd.into();
    }
    if let Some((uid, gid)) = user {
        p["user"] = serde_json::json!({"uid": uid, "gid": gid});
    }
    let mut all: Vec<Value> = p["env"].as_array().cloned().unwrap_or_default();
    all.extend(env.iter().map(|e| Value::from(e.as_str())));
    p["env"] = all.into();
    if let Some(o) = p.as_object_mut() {
        o.remove("consoleSize");
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_process_from_flags() {
        let spec = serde_json::json!({"process": {"args": ["sh"], "env": ["A=1"], "cwd": "/", "terminal": true, "user": {"uid": 0, "gid": 0}}});
        let p = exec_process(
            &spec,
            &["ls".into()],
            &["B=2".into()],
            Some("/tmp"),
            Some((5, 6)),
            false,
        );
        assert_eq!(p["args"], serde_json::json!(["ls"]));
        assert_eq!(p["env"], serde_json::json!(["A=1", "B=2"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"]["uid"], 5);
        assert_eq!(p["terminal"], false);
    }
}
