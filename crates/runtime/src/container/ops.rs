//! The OCI operations after `create`. Each one locks the container,
//! refreshes its status, checks the guard, acts through the agent, saves.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::stdio::Relays;
use super::supervisor::{self, Request};
use super::{hooks, share, AgentClient, Bundle, Container, ContainerError, Result, State, Status};
use crate::agent::ExitStatus;

/// How long `delete` waits for a supervisor to finish after asking it to stop.
const SUPERVISOR_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `start` waits for the supervisor to start init.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

pub async fn start(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    c.require("start", Status::can_start)?;
    // The supervisor starts init: it owns the pod and waits for the exit.
    supervisor::request(&c.dir, &Request::START, START_TIMEOUT)?;
    c.state.status = Status::Running;
    c.save()?;
    if let Ok(b) = Bundle::load(&c.state.bundle) {
        if let Err(e) = hooks::run(&b.spec, "poststart", &c.state.oci()) {
            log::warn!("{id}: {}", crate::chain(&e));
        }
    }
    Ok(())
}

pub async fn kill(root: &Path, id: &str, signal: u32, all: bool) -> Result<()> {
    let c = Container::open(root, id)?;
    c.require("kill", Status::can_kill)?;
    Ok(c.client().await?.signal(id, None, signal, all).await?)
}

pub async fn pause(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    c.require("pause", Status::can_pause)?;
    c.client().await?.pause(id).await?;
    c.state.status = Status::Paused;
    c.save()
}

pub async fn resume(root: &Path, id: &str) -> Result<()> {
    let mut c = Container::open(root, id)?;
    c.require("resume", Status::can_resume)?;
    c.client().await?.resume(id).await?;
    c.state.status = Status::Running;
    c.save()
}

/// Guest pids of the container's processes.
pub async fn processes(root: &Path, id: &str) -> Result<Vec<u32>> {
    let c = Container::open(root, id)?;
    c.require("list processes of", |s| {
        matches!(s, Status::Created | Status::Running | Status::Paused)
    })?;
    Ok(c.client().await?.processes(id).await?)
}

/// runc-style stats object (`events --stats` data).
pub async fn stats(root: &Path, id: &str) -> Result<Value> {
    let c = Container::open(root, id)?;
    c.require("get stats of", |s| {
        matches!(s, Status::Running | Status::Paused)
    })?;
    let s = c.client().await?.stats(id).await?;
    let (m, cpu, pids) = (
        s.memory.clone().unwrap_or_default(),
        s.cpu.clone().unwrap_or_default(),
        s.pids.clone().unwrap_or_default(),
    );
    let oom = std::fs::read_to_string(c.dir.join("oom"))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    Ok(serde_json::json!({
        "cpu": {"usage": {"total": cpu.usage_usec * 1000, "user": cpu.user_usec * 1000, "kernel": cpu.system_usec * 1000},
                "throttling": {"throttledPeriods": cpu.nr_throttled, "throttledTime": cpu.throttled_usec * 1000}},
        "memory": {"usage": {"usage": m.usage_bytes, "limit": m.limit_bytes},
                   "raw": {"anon": m.anon_bytes, "file": m.file_bytes, "oom": m.oom_events, "oom_kill": m.oom_kill_events.max(oom.unwrap_or(0))}},
        "pids": {"current": pids.current, "limit": pids.limit},
    }))
}

/// The OCI state of a container.
pub fn state(root: &Path, id: &str) -> Result<Value> {
    Ok(Container::peek(root, id)?.oci())
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
pub async fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let c = Container::open(root, id)?;
    let status = c.status();
    if !force && !status.can_delete() {
        c.require("delete (use --force)", Status::can_delete)?;
    }
    if c.state.supervisor_alive() {
        if c.state.exit_status.is_none() {
            if let Err(e) = supervisor::request(&c.dir, &Request::SHUTDOWN, Duration::from_secs(5))
            {
                log::warn!("{id}: asking the supervisor to stop: {}", crate::chain(&e));
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
    crate::network::remove_owned_netns(root, id);
    let spec = Bundle::load(&c.state.bundle).map(|b| b.spec).ok();
    let mut oci = c.state.oci();
    oci["status"] = "stopped".into();
    share::remove_container_dir(&c.dir)?;
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
    pub client: AgentClient,
    pub id: String,
    pub exec_id: String,
    pub pid: u32,
    pub relays: Relays,
}

/// Starts `process` (an OCI process object) in a running container.
/// Non-terminal: this process's fds 0-2 are relayed. Terminal: the pty master
/// goes to `console_socket`, or without one, fds 0/1 are relayed to the tty.
pub async fn exec(
    root: &Path,
    id: &str,
    process: &Value,
    console_socket: Option<&Path>,
) -> Result<Exec> {
    let c = Container::open(root, id)?;
    c.require("exec in", Status::can_exec)?;
    if let Ok(b) = Bundle::load(&c.state.bundle) {
        b.check_process(process)
            .map_err(|reason| ContainerError::BadBundle {
                bundle: c.state.bundle.display().to_string(),
                reason,
            })?;
    }
    let client = c.client().await?;
    drop(c);
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    );
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let json = serde_json::to_vec(process).expect("process serializes");
    let pid = client
        .exec(id, &exec_id, json, (!terminal, !terminal, !terminal))
        .await?;
    let mut relays = Relays::default();
    if terminal {
        let stream = client
            .open_stream(id, Some(&exec_id), vessel_protocol::stdio::StdioStream::Tty)
            .await?;
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
        supervisor::attach_host_stdio(&client, id, Some(&exec_id), &mut relays).await?;
    }
    Ok(Exec {
        client,
        id: id.to_string(),
        exec_id,
        pid,
        relays,
    })
}

impl Exec {
    /// Waits for the process and its output.
    pub async fn wait(mut self) -> Result<ExitStatus> {
        let st = self.client.wait(&self.id, Some(&self.exec_id)).await?;
        if !self.relays.drain(Duration::from_secs(10)) {
            log::warn!("{}: exec output still open after exit; cut", self.id);
        }
        Ok(st)
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
