//! The per-container supervisor: a process that outlives `vessel create`,
//! runs a pod of one container ([`crate::pod::Pod`], the model the shim
//! uses too) with its stdio relays and init's exit status, and EXITS WITH INIT'S EXIT STATUS once init has exited and
//! its output was delivered (callers such as containerd's runc shim and
//! conmon watch this pid, as they watch runc's container process).
//!
//! It reports readiness on an inherited pipe (`OK <guest pid>\n` or
//! `ERR <message>\n`) and serves the [`super::control`] socket at
//! `<dir>/supervisor.sock`: every operation on the container goes through it.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use vessel_hypervisor::AgentEndpoint;
use vessel_protocol::stdio::StdioStream;

use super::bundle::Bundle;
use super::console::HostPty;
use super::control::{serve_one, Served};
use super::share::Staging;
use super::stdio::Relays;
use super::{AgentClient, ContainerError, Result, CONTROL_SOCKET, EXIT_FILE, OOM_FILE};
use crate::guest_events;
use crate::network::NetnsNetwork;
use crate::pod::{CreateRequest, Pod, PodError, PodEvent, PodKind, PodSetup, Stdio};
use crate::sandbox::hypervisor;
use crate::Config;

/// How long output may still flow after init exited before it is cut.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a terminal's host window size is checked.
const RESIZE_POLL: Duration = Duration::from_millis(200);
/// How long an OOM event may trail a SIGKILL exit.
const OOM_GRACE: Duration = Duration::from_secs(2);
/// How long a container whose VM died waits for the VM's crash report.
const VM_REPORT_GRACE: Duration = Duration::from_secs(3);
/// How long requests in flight when init exited still get their replies.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);
/// Exit status when the sandbox died under the container.
const SANDBOX_DIED: i32 = crate::pod::LOST_EXIT_STATUS as i32;
/// Exit status after a forced shutdown (as after SIGKILL).
const KILLED: i32 = 137;

/// What `vessel supervise` was started with.
#[derive(Debug, Clone)]
pub struct SuperviseArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// (rows, cols) replacing `process.consoleSize`: the size of the
    /// caller's terminal when `vessel run` relays on its own stdio.
    pub console_size: Option<(u16, u16)>,
    /// Write end of the readiness pipe.
    pub sync_fd: RawFd,
}

struct Running {
    pod: Pod,
    relays: Relays,
    /// A dup of the host pty slave, watched for window-size changes.
    tty: Option<File>,
}

/// Runs the supervisor to the end; returns the process exit status.
pub async fn run(config: &Config, args: SuperviseArgs) -> i32 {
    // SAFETY: `create` passes the write end of its readiness pipe as this fd
    // and nothing else in this process owns it.
    let mut sync = unsafe { File::from_raw_fd(args.sync_fd) };
    set_cloexec(&sync);
    // SIGTERM: stop like `delete --force`, cleaning up. Handled from before
    // OK is sent: `create` stops a supervisor whose hooks failed this way.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async move {
        match term.as_mut() {
            Some(t) => drop(t.recv().await),
            None => std::future::pending().await,
        }
    };
    let dir = config.state_root.join(&args.id);
    let (tx, mut events) = mpsc::unbounded_channel();
    let listener;
    let mut running = match setup(config, &args, &dir, tx).await {
        Ok((r, guest_pid)) => {
            // Listening before the caller hears OK: its `start` comes next.
            listener = listen(&args.id, &dir);
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
    let resize = running.tty.take().map(|tty| {
        let (client, id) = (running.pod.agent().clone(), args.id.clone());
        tokio::spawn(watch_window_size(tty, client, id))
    });
    let status = serve(
        &args.id,
        &dir,
        listener,
        &running.pod,
        &mut events,
        terminated,
    )
    .await;
    if let Some(r) = resize {
        r.abort();
    }
    let Running {
        pod, mut relays, ..
    } = running;
    let mut pod = Some(pod);
    if status == KILLED || status == SANDBOX_DIED {
        // Init did not exit by itself: its streams close only with the VM.
        if let Some(pod) = pod.take() {
            pod.stop().await;
        }
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
    // Stops the VM, detaches the network and removes the share.
    if let Some(pod) = pod {
        pod.stop().await;
    }
    let _ = std::fs::remove_file(dir.join(CONTROL_SOCKET));
    log::info!("{}: init exited with status {status}", args.id);
    status
}

/// Boots a pod of one container: the VM (with the bundle's network, its
/// share at `<dir>/shared`, its run directory at [`super::vm_location`]) and
/// the container in it, with this process's stdio or a terminal relayed.
/// On error nothing is left.
async fn setup(
    config: &Config,
    args: &SuperviseArgs,
    dir: &Path,
    events: mpsc::UnboundedSender<PodEvent>,
) -> Result<(Running, u32)> {
    let bundle = Bundle::load(&args.bundle)?;
    // `create` made the namespace if the spec asks for a new one, and
    // started this process in it.
    let network =
        NetnsNetwork::made_for_spec(&bundle.spec, &config.state_root, &args.id).map_err(pod_err)?;
    let mut spec = bundle.spec.clone();
    let (vm_root, vm_id) = super::vm_location(dir);
    // Init has exited when the VM is stopped: nothing left to shut down gracefully.
    let vm_config = Config {
        stop_grace_secs: 0,
        ..config.clone()
    };
    let hv = hypervisor(&vm_config)?;
    // Staged before the VM boots, at <dir>/shared; removed with the pod.
    let staging = Staging::prepare(dir, &bundle.rootfs, &mut spec)?;
    let setup = PodSetup {
        id: args.id.clone(),
        kind: PodKind::One,
        vm_root,
        vm_id,
        staging: Box::new(staging),
        pids_file: None,
        network,
    };
    let pod = Pod::boot_with(&vm_config, hv.as_ref(), setup, &bundle.spec, events)
        .await
        .map_err(pod_err)?;
    match create_in(args, &bundle, spec, &pod).await {
        Ok((relays, tty)) => {
            let guest_pid = pod.process(&args.id, None).map_err(pod_err)?.guest_pid;
            Ok((Running { pod, relays, tty }, guest_pid))
        }
        Err(e) => {
            pod.stop().await;
            Err(e)
        }
    }
}

fn pod_err(e: PodError) -> ContainerError {
    ContainerError::Pod(Box::new(e))
}

/// Creates the container (`spec`: its staged spec) and relays its stdio.
async fn create_in(
    args: &SuperviseArgs,
    bundle: &Bundle,
    mut spec: serde_json::Value,
    pod: &Pod,
) -> Result<(Relays, Option<File>)> {
    let id = &args.id;
    let terminal = bundle.terminal();
    let (rows, cols) = args
        .console_size
        .unwrap_or_else(|| console_size(&bundle.spec));
    if terminal {
        // The guest pty starts at the host pty's size.
        spec["process"]["consoleSize"] = serde_json::json!({"height": rows, "width": cols});
    }
    pod.create(CreateRequest {
        id,
        bundle: &args.bundle,
        rootfs: &bundle.rootfs,
        spec,
        stdio: Stdio::Caller { terminal },
    })
    .await
    .map_err(pod_err)?;
    let client = pod.agent();
    let mut relays = Relays::default();
    let mut tty = None;
    if terminal {
        let socket = args.console_socket.as_deref().ok_or_else(|| {
            ContainerError::Console("process.terminal is set but no --console-socket given".into())
        })?;
        let pty = HostPty::open(rows, cols)?;
        pty.send_master(socket)?;
        let stream = client.open_stream(id, None, StdioStream::Tty).await?;
        tty = pty.slave.try_clone().ok();
        relays
            .terminal(pty.slave, stream)
            .map_err(|e| ContainerError::Console(crate::chain(&e).to_string()))?;
    } else {
        attach_host_stdio(client.endpoint(), id, None, &mut relays).await?;
    }
    Ok((relays, tty))
}

/// Relays this process's fds 0, 1 and 2 to the process's three streams, then
/// points 0-2 at /dev/null so that only the relays hold the caller's fds.
pub async fn attach_host_stdio(
    agent: &AgentEndpoint,
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
    let open = |stream| crate::agent::container::open_stream(agent, id, exec_id, stream);
    let stdin = open(StdioStream::Stdin).await?;
    let stdout = open(StdioStream::Stdout).await?;
    let stderr = open(StdioStream::Stderr).await?;
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

/// Binds the control socket (without it, the container can still run and
/// exit, but not be started or shut down through the supervisor).
fn listen(id: &str, dir: &Path) -> Option<UnixListener> {
    let sock = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&sock);
    match super::sockpath::SocketPath::new(&sock).and_then(|a| UnixListener::bind(a.as_path())) {
        Ok(l) => Some(l),
        Err(e) => {
            log::error!(
                "{id}: control socket {}: {}",
                sock.display(),
                crate::chain(&e)
            );
            None
        }
    }
}

/// How [`serve`] stopped following the pod.
enum End {
    /// Init exited with this status.
    Init(i32),
    /// The pod's VM died.
    Died,
    /// A shutdown request or `stop`.
    Stopped,
}

/// Serves the control socket for container `id` of `pod` and follows the
/// pod's events until init exits (its status), the VM dies
/// ([`crate::pod::LOST_EXIT_STATUS`]), a shutdown request or `stop` (137).
/// Requests are served concurrently (an exec's connection lasts as long as
/// the exec).
pub async fn serve(
    id: &str,
    dir: &Path,
    listener: Option<UnixListener>,
    pod: &Pod,
    events: &mut mpsc::UnboundedReceiver<PodEvent>,
    stop: impl Future<Output = ()>,
) -> i32 {
    let mut ooms = 0u64;
    let mut security_events = 0u64;
    let oom = |n: &mut u64| {
        *n += 1;
        let _ = std::fs::write(dir.join(OOM_FILE), format!("{n}\n"));
    };
    tokio::pin!(stop);
    let (mut requests, mut execs) = (FuturesUnordered::new(), FuturesUnordered::new());
    let end = loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.recv() => match event {
                // The pod reports a VM that died as LOST_EXIT_STATUS.
                Some(PodEvent::Exit { container_id, exec_id: None, exit, .. })
                    if container_id == id => break End::Init(exit.status as i32),
                Some(PodEvent::Oom { container_id }) if container_id == id => oom(&mut ooms),
                Some(PodEvent::GuestLog { sandbox, line }) => {
                    guest_events::log_guest_line(&sandbox, &line)
                }
                Some(PodEvent::Security { sandbox, event }) => {
                    guest_events::log_security_event(&sandbox, &event);
                    guest_events::record(dir, &event, &mut security_events);
                }
                Some(_) => {}
                None => break End::Died,
            },
            _ = &mut stop => {
                log::warn!("{id}: SIGTERM: stopping the sandbox");
                break End::Stopped;
            }
            conn = accept => {
                if let Ok((conn, _)) = conn {
                    requests.push(serve_one(conn, pod, id, dir));
                }
            }
            Some(served) = requests.next(), if !requests.is_empty() => match served {
                Served::Shutdown => {
                    log::info!("{id}: shutdown requested");
                    break End::Stopped;
                }
                Served::Exec(exit) => execs.push(exit),
                Served::Done => {}
            },
            Some(()) = execs.next(), if !execs.is_empty() => {}
        }
    };
    // New callers find no socket: the container has stopped. Callers in
    // flight get their replies (a kill that ended init, say), and, if init
    // exited by itself (its processes went with it), execs their exits.
    drop(listener);
    let _ = std::fs::remove_file(dir.join(CONTROL_SOCKET));
    let finish = async {
        while let Some(served) = requests.next().await {
            if let Served::Exec(exit) = served {
                execs.push(exit);
            }
        }
        if matches!(end, End::Init(_)) {
            while execs.next().await.is_some() {}
        }
    };
    let _ = tokio::time::timeout(IN_FLIGHT_GRACE, finish).await;
    let status = match end {
        End::Init(status) => status,
        End::Died => SANDBOX_DIED,
        // A forced stop ends the container as SIGKILL would.
        End::Stopped => KILLED,
    };
    if status == SANDBOX_DIED {
        // The VM died (or its agent is gone): init's exit came from the broken agent
        // connection, and what the VM's console showed (a kernel crash) comes after
        // it, from the VM's watcher. Give it a moment.
        let trailing = async {
            while let Some(e) = events.recv().await {
                match e {
                    PodEvent::Security { sandbox, event } => {
                        guest_events::log_security_event(&sandbox, &event);
                        guest_events::record(dir, &event, &mut security_events);
                    }
                    PodEvent::VmExited => return,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(VM_REPORT_GRACE, trailing).await;
    }
    if status == KILLED && ooms == 0 {
        // The OOM event may trail the exit: give it a moment.
        let trailing = async {
            while let Some(e) = events.recv().await {
                if matches!(&e, PodEvent::Oom { container_id } if container_id == id) {
                    return true;
                }
            }
            false
        };
        if let Ok(true) = tokio::time::timeout(OOM_GRACE, trailing).await {
            oom(&mut ooms);
        }
    }
    if ooms > 0 {
        log::warn!(
            "{id}: OOM: the container's memory limit was hit and the OOM killer ran ({ooms} kills)"
        );
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
