//! The per-container supervisor: a process that outlives `vessel create`,
//! owns the sandbox VM, the agent connection, the stdio relays and init's
//! exit status, and EXITS WITH INIT'S EXIT STATUS once init has exited and
//! its output was delivered (callers such as containerd's runc shim and
//! conmon watch this pid, as they watch runc's container process).
//!
//! It reports readiness on an inherited pipe (`OK <guest pid>\n` or
//! `ERR <message>\n`) and serves typed JSON requests on
//! `<dir>/supervisor.sock`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use vessel_protocol::stdio::StdioStream;

use super::bundle::Bundle;
use super::console::HostPty;
use super::share::{self, Staging};
use super::stdio::Relays;
use super::{AgentClient, ContainerError, NewContainer, Result, CONTROL_SOCKET, EXIT_FILE};
use crate::network::PodNetwork;
use crate::sandbox::{hypervisor, SandboxSpec};
use crate::{Config, Sandbox};

/// How long output may still flow after init exited before it is cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a terminal's host window size is checked.
const RESIZE_POLL: Duration = Duration::from_millis(200);
/// How long an OOM event may trail a SIGKILL exit.
const OOM_GRACE: Duration = Duration::from_secs(2);
/// Exit status when the sandbox died under the container.
const SANDBOX_DIED: i32 = 255;
/// Exit status after a forced shutdown (as after SIGKILL).
const KILLED: i32 = 137;

/// A request on the control socket (one JSON line).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub op: Op,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Ping,
    /// Stop the VM now; the container ends with status 137.
    Shutdown,
}

impl Request {
    pub const SHUTDOWN: Request = Request { op: Op::Shutdown };
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Sends one request to the supervisor of `dir` (blocking, bounded).
pub fn request(dir: &Path, req: &Request, timeout: Duration) -> Result<()> {
    let path = dir.join(CONTROL_SOCKET);
    let io = |e| ContainerError::io(&path, e);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("request serializes");
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(s, 4096))
        .read_line(&mut reply)
        .map_err(io)?;
    let r: Response =
        serde_json::from_str(&reply).map_err(|e| ContainerError::Supervisor(e.to_string()))?;
    match r.error {
        None if r.ok => Ok(()),
        e => Err(ContainerError::Supervisor(e.unwrap_or_default())),
    }
}

/// What `vessel supervise` was started with.
#[derive(Debug, Clone)]
pub struct SuperviseArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// Write end of the readiness pipe.
    pub sync_fd: RawFd,
}

struct Running {
    sandbox: Sandbox,
    client: AgentClient,
    relays: Relays,
    /// A dup of the host pty slave, watched for window-size changes.
    tty: Option<File>,
    /// Taps and tc redirects in the bundle's network namespace.
    network: Option<PodNetwork>,
}

/// Runs the supervisor to the end; returns the process exit status.
pub async fn run(config: &Config, args: SuperviseArgs) -> i32 {
    // SAFETY: `create` passes the write end of its readiness pipe as this fd
    // and nothing else in this process owns it.
    let mut sync = unsafe { File::from_raw_fd(args.sync_fd) };
    set_cloexec(&sync);
    let dir = config.state_root.join(&args.id);
    let mut running = match setup(config, &args, &dir).await {
        Ok((r, guest_pid)) => {
            let _ = writeln!(sync, "OK {guest_pid}");
            detach_stdio();
            r
        }
        Err(e) => {
            let msg = crate::chain(&e).to_string().replace('\n', " | ");
            let _ = writeln!(sync, "ERR {msg}");
            return 1;
        }
    };
    drop(sync);
    let status = supervise(&args.id, &dir, &mut running).await;
    let Running {
        sandbox,
        mut relays,
        network,
        ..
    } = running;
    let mut sandbox = Some(sandbox);
    if status == KILLED || status == SANDBOX_DIED {
        // Init did not exit by itself: its streams close only with the VM.
        stop_sandbox(&args.id, sandbox.take()).await;
    }
    if !relays.drain(DRAIN_TIMEOUT) {
        log::warn!(
            "{}: output still open {DRAIN_TIMEOUT:?} after exit; cut",
            args.id
        );
    }
    if let Err(e) = std::fs::write(dir.join(EXIT_FILE), format!("{status}\n")) {
        log::error!(
            "{}: cannot record exit status: {}",
            args.id,
            crate::chain(&e)
        );
    }
    stop_sandbox(&args.id, sandbox).await;
    if let Some(mut network) = network {
        network.detach().await;
    }
    if let Err(e) = share::cleanup(&dir) {
        log::error!("{}: {}", args.id, crate::chain(&e));
    }
    let _ = std::fs::remove_file(dir.join(CONTROL_SOCKET));
    log::info!("{}: init exited with status {status}", args.id);
    status
}

async fn stop_sandbox(id: &str, sandbox: Option<Sandbox>) {
    if let Some(sb) = sandbox {
        if let Err(e) = sb.stop().await {
            log::warn!("{id}: stopping the sandbox: {}", crate::chain(&e));
        }
    }
}

async fn setup(config: &Config, args: &SuperviseArgs, dir: &Path) -> Result<(Running, u32)> {
    let bundle = Bundle::load(&args.bundle)?;
    let mut spec = bundle.spec.clone();
    let staging = Staging::prepare(dir, &bundle.rootfs, &mut spec)?;
    let res = boot_and_create(config, args, dir, &bundle, spec, &staging).await;
    if res.is_err() {
        if let Err(e) = share::cleanup(dir) {
            log::error!("{}: {}", args.id, crate::chain(&e));
        }
    }
    res
}

/// Wires the bundle's network namespace (if it names one), then boots the
/// VM with its NICs and creates the container. On error no tap or tc filter
/// is left.
async fn boot_and_create(
    config: &Config,
    args: &SuperviseArgs,
    dir: &Path,
    bundle: &Bundle,
    spec: serde_json::Value,
    staging: &Staging,
) -> Result<(Running, u32)> {
    let net_err =
        |e: crate::network::NetError| ContainerError::Network(crate::chain(&e).to_string());
    let mut network = match crate::network::netns_path(&bundle.spec).map_err(net_err)? {
        Some(path) => Some(PodNetwork::attach(&path).await.map_err(net_err)?),
        None => None,
    };
    match boot_and_create_in(config, args, dir, bundle, spec, staging, network.as_ref()).await {
        Ok((mut running, pid)) => {
            running.network = network;
            Ok((running, pid))
        }
        Err(e) => {
            if let Some(n) = network.as_mut() {
                n.detach().await;
            }
            Err(e)
        }
    }
}

async fn boot_and_create_in(
    config: &Config,
    args: &SuperviseArgs,
    dir: &Path,
    bundle: &Bundle,
    spec: serde_json::Value,
    staging: &Staging,
    network: Option<&PodNetwork>,
) -> Result<(Running, u32)> {
    let size = bundle.vm_size(config);
    let (vm_root, vm_id) = super::vm_location(dir);
    let mut vm_config = config.clone();
    vm_config.state_root = vm_root;
    // Init has exited when the VM is stopped: nothing left to shut down gracefully.
    vm_config.stop_grace_secs = 0;
    let hv = hypervisor(&vm_config)?;
    let sandbox = Sandbox::boot(
        &vm_config,
        hv.as_ref(),
        SandboxSpec {
            id: vm_id,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            shared_dirs: vec![staging.shared_dir()],
            nics: network.map(PodNetwork::nics).unwrap_or_default(),
        },
    )
    .await?;
    let created = async {
        if let Some(n) = network {
            sandbox.agent().set_network(n.guest_network()).await?;
        }
        create_in(args, bundle, spec, &sandbox).await
    };
    match created.await {
        Ok((client, relays, pid, tty)) => Ok((
            Running {
                sandbox,
                client,
                relays,
                tty,
                network: None,
            },
            pid,
        )),
        Err(e) => {
            let _ = sandbox.stop().await;
            Err(e)
        }
    }
}

async fn create_in(
    args: &SuperviseArgs,
    bundle: &Bundle,
    spec: serde_json::Value,
    sandbox: &Sandbox,
) -> Result<(AgentClient, Relays, u32, Option<File>)> {
    let id = &args.id;
    let client = sandbox.agent().clone();
    let terminal = bundle.terminal();
    let json = serde_json::to_vec(&spec).expect("spec serializes");
    let pid = client
        .create(NewContainer {
            id,
            spec_json: json,
            storages: vec![Staging::storage()],
            stdio: (!terminal, !terminal, !terminal),
            share_namespaces_with: None,
        })
        .await?;
    let mut relays = Relays::default();
    let mut tty = None;
    if terminal {
        let socket = args.console_socket.as_deref().ok_or_else(|| {
            ContainerError::Console("process.terminal is set but no --console-socket given".into())
        })?;
        let (rows, cols) = console_size(&spec);
        let pty = HostPty::open(rows, cols)?;
        pty.send_master(socket)?;
        let stream = client.open_stream(id, None, StdioStream::Tty).await?;
        tty = pty.slave.try_clone().ok();
        relays
            .terminal(pty.slave, stream)
            .map_err(|e| ContainerError::Console(crate::chain(&e).to_string()))?;
    } else {
        attach_host_stdio(&client, id, None, &mut relays).await?;
    }
    Ok((client, relays, pid, tty))
}

/// Relays this process's fds 0, 1 and 2 to the process's three streams, then
/// points 0-2 at /dev/null so that only the relays hold the caller's fds.
pub async fn attach_host_stdio(
    client: &AgentClient,
    id: &str,
    exec_id: Option<&str>,
    relays: &mut Relays,
) -> Result<()> {
    let dup = |fd: RawFd| -> Result<File> {
        // SAFETY: fds 0-2 are open for the process's lifetime; try_clone_to_owned dups.
        let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        b.try_clone_to_owned()
            .map(File::from)
            .map_err(|e| ContainerError::io(Path::new("stdio"), e))
    };
    let stdin = client.open_stream(id, exec_id, StdioStream::Stdin).await?;
    let stdout = client.open_stream(id, exec_id, StdioStream::Stdout).await?;
    let stderr = client.open_stream(id, exec_id, StdioStream::Stderr).await?;
    relays.input(dup(0)?, stdin);
    relays.output(stdout, dup(1)?);
    relays.output(stderr, dup(2)?);
    Ok(())
}

/// Keeps an inherited fd (the readiness pipe) out of the VM's processes:
/// the caller reads until EOF.
pub fn set_cloexec(f: &File) {
    // SAFETY: fcntl on an fd owned by `f`.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Points fds 0-2 at /dev/null (the relays own dups of the caller's fds).
pub fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds; `null` stays open for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn console_size(spec: &serde_json::Value) -> (u16, u16) {
    let c = &spec["process"]["consoleSize"];
    let get = |k: &str, d: u16| {
        c[k].as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(d)
    };
    (get("height", 24), get("width", 80))
}

async fn supervise(id: &str, dir: &Path, r: &mut Running) -> i32 {
    let sock = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener = match UnixListener::bind(&sock) {
        Ok(l) => Some(l),
        Err(e) => {
            log::error!(
                "{id}: control socket {}: {}",
                sock.display(),
                crate::chain(&e)
            );
            None
        }
    };
    let resize = r.tty.take().map(|tty| {
        let (client, id) = (r.client.clone(), id.to_string());
        tokio::spawn(watch_window_size(tty, client, id))
    });
    let oom_client = r.client.clone();
    let oom_dir = dir.to_path_buf();
    let oom_id = id.to_string();
    let (oom_tx, mut oom_rx) = tokio::sync::watch::channel(0u64);
    let oom = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(cid) = oom_client.oom_event().await {
            if cid == oom_id {
                n += 1;
                let _ = std::fs::write(oom_dir.join("oom"), format!("{n}\n"));
                let _ = oom_tx.send(n);
            }
        }
    });
    let wait = r.client.wait(id, None);
    tokio::pin!(wait);
    // SIGTERM to the supervisor: stop like `delete --force`, cleaning up.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async move {
        match term.as_mut() {
            Some(t) => t.recv().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(terminated);
    let status = loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            res = &mut wait => break match res {
                Ok(s) => s.status,
                Err(e) => {
                    log::error!("{id}: waiting for init: {}", crate::chain(&e));
                    SANDBOX_DIED
                }
            },
            exit = r.sandbox.vm().wait() => {
                log::error!("{id}: the sandbox VM ended ({exit}) before init exited");
                break SANDBOX_DIED;
            }
            _ = &mut terminated => {
                log::warn!("{id}: SIGTERM: stopping the sandbox");
                break KILLED;
            }
            conn = accept => {
                let Ok((conn, _)) = conn else { continue };
                if serve_one(conn).await == Some(Request::SHUTDOWN) {
                    log::info!("{id}: shutdown requested");
                    break KILLED;
                }
            }
        }
    };
    if status == KILLED && *oom_rx.borrow() == 0 {
        // The OOM event may trail the exit: give it a moment.
        let _ = tokio::time::timeout(OOM_GRACE, oom_rx.changed()).await;
    }
    if *oom_rx.borrow() > 0 {
        log::warn!(
            "{id}: OOM: the container's memory limit was hit and the OOM killer ran ({} kills)",
            *oom_rx.borrow()
        );
    }
    oom.abort();
    if let Some(r) = resize {
        r.abort();
    }
    status
}

/// Polls the host pty's window size (whoever holds the master resizes it;
/// the slave gets no notification without a session) and forwards changes.
async fn watch_window_size(tty: File, client: AgentClient, id: String) {
    let mut last = super::console::window_size(&tty);
    loop {
        tokio::time::sleep(RESIZE_POLL).await;
        let now = super::console::window_size(&tty);
        if now != last {
            if let Some((rows, cols)) = now {
                if let Err(e) = client.resize(&id, None, rows, cols).await {
                    log::warn!("{id}: resize: {}", crate::chain(&e));
                }
            }
            last = now;
        }
    }
}

/// Answers one request; returns it if it was valid.
async fn serve_one(conn: tokio::net::UnixStream) -> Option<Request> {
    let (rd, mut wr) = conn.into_split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, 4096));
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
    let req = match read {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()),
        _ => Err("no request".to_string()),
    };
    let resp = match &req {
        Ok(_) => Response {
            ok: true,
            error: None,
        },
        Err(e) => Response {
            ok: false,
            error: Some(e.clone()),
        },
    };
    let mut out = serde_json::to_string(&resp).expect("response serializes");
    out.push('\n');
    let _ = wr.write_all(out.as_bytes()).await;
    req.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_strict() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"shutdown"}"#).unwrap(),
            Request::SHUTDOWN
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"shutdown","x":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }
}
