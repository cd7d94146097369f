//! The agent's ttrpc server on the configured channel.

use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::Server;
use vessel_protocol::ports::{
    AGENT_VSOCK_PORT, HOST_CID, READY_MAGIC, READY_VSOCK_PORT, STDIO_VSOCK_PORT,
};

use crate::channel::Channel;
use crate::container::{cgroup, Containers};
use crate::health::HealthService;
use crate::reaper::Reaper;
use crate::service::AgentService;
use crate::stdio::server::StdioListener;

/// Pending OOM events kept for a host that is not calling GetOOMEvent.
const OOM_QUEUE: usize = 64;

/// Serves the agent API and the stdio streams until the process ends.
/// `work` is the agent's working directory (libcontainer state, bundles).
pub async fn serve(
    channel: Channel,
    reaper: Reaper,
    work: std::path::PathBuf,
) -> anyhow::Result<std::convert::Infallible> {
    crate::container::prepare_work_dir(&work)
        .with_context(|| format!("create {}", work.display()))?;
    let (oom_tx, oom_rx) = tokio::sync::mpsc::channel(OOM_QUEUE);
    let oom = Arc::new(cgroup::OomWatcher::new(oom_tx));
    let monitor = Arc::new(crate::monitor::Monitor::default());
    crate::monitor::serve(monitor.clone(), &work).context("listen for seccomp notify fds")?;
    let tripwires = crate::tripwire::Tripwires::start(&work).context("watch sysrq tripwires")?;
    let containers = Arc::new(Containers::new(
        reaper,
        work,
        oom.clone(),
        monitor,
        tripwires,
    ));
    let stdio = stdio_listener(&channel)?;
    let lookup: Arc<dyn crate::stdio::server::ProcessLookup> = containers.clone();
    match stdio {
        Some(l) => {
            tokio::spawn(crate::stdio::server::serve(l, lookup));
        }
        None => log::warn!("no vsock: process stdio streams are unavailable"),
    }
    tokio::spawn(cgroup::watch_oom(containers.clone(), oom));
    let service = Arc::new(AgentService::new(containers, oom_rx));
    let agent = vessel_protocol::agent_ttrpc::create_agent(service.clone());

    let listener = match &channel {
        Channel::Vsock => Listener::bind(format!("vsock://-1:{AGENT_VSOCK_PORT}"))
            .with_context(|| format!("listen on vsock port {AGENT_VSOCK_PORT}"))?,
        Channel::Serial => crate::channel::serial::listener()?,
        Channel::Listen(addr) => {
            if let Some(path) = addr.strip_prefix("unix://") {
                let _ = std::fs::remove_file(path);
            }
            Listener::bind(addr).with_context(|| format!("listen on {addr}"))?
        }
    };
    let health = vessel_protocol::health_ttrpc::create_health(Arc::new(HealthService));
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(health)
        .register_service(agent);
    server.start().await.context("start ttrpc server")?;
    log::info!("agent API ready on {channel}");
    // Kept for the life of PID 1 (a dropped server stops serving).
    let mut _vsock_server = None;
    match channel {
        Channel::Vsock => announce_ready().await,
        // A VM whose vhost-user devices come later (a template, or a clone
        // before its devices are plugged in): the API on vsock too, for when
        // the vsock device appears, and the announcement once it has.
        Channel::Serial => match Listener::bind(format!("vsock://-1:{AGENT_VSOCK_PORT}")) {
            Ok(listener) => {
                let health = vessel_protocol::health_ttrpc::create_health(Arc::new(HealthService));
                let agent = vessel_protocol::agent_ttrpc::create_agent(service);
                let mut server = Server::new()
                    .add_listener(listener)
                    .register_service(health)
                    .register_service(agent);
                server
                    .start()
                    .await
                    .context("start ttrpc server on vsock")?;
                _vsock_server = Some(server);
                tokio::spawn(announce_when_vsock_appears());
            }
            Err(e) => log::warn!("listen on vsock port {AGENT_VSOCK_PORT}: {e}"),
        },
        Channel::Listen(_) => {}
    }
    // The server runs on its own tasks; PID 1 lives until the VM ends.
    std::future::pending().await
}

/// Announces readiness on vsock once a vsock device exists: tries at once,
/// then again after every kernel uevent (a hot-plugged device's probe sends
/// them), until the host's ready port answers. Idle (no polling) in a VM that
/// never gets a vsock device.
async fn announce_when_vsock_appears() {
    let uevents = match crate::uevent::Listener::open() {
        Ok(u) => u,
        Err(e) => {
            log::warn!("no kernel uevents ({e}): a vsock device plugged in later is not announced");
            return;
        }
    };
    loop {
        if connect_ready().await.is_ok() {
            log::info!("vsock is up: announced readiness on host port {READY_VSOCK_PORT}");
            return;
        }
        if let Err(e) = uevents.next().await {
            log::warn!("reading kernel uevents: {e}");
            return;
        }
    }
}

async fn connect_ready() -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(HOST_CID, READY_VSOCK_PORT);
    let line = format!("{READY_MAGIC} {}\n", env!("CARGO_PKG_VERSION"));
    let mut s = tokio_vsock::VsockStream::connect(addr).await?;
    s.write_all(line.as_bytes()).await?;
    s.shutdown(std::net::Shutdown::Write)
}

/// The stdio listener: vsock port 1026 in a VM (also with a virtio-serial API
/// channel, when the VM has vsock), `<path>.stdio` next to a `unix://<path>` API.
fn stdio_listener(channel: &Channel) -> anyhow::Result<Option<StdioListener>> {
    match channel {
        Channel::Vsock | Channel::Serial => {
            let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, STDIO_VSOCK_PORT);
            match tokio_vsock::VsockListener::bind(addr) {
                Ok(l) => Ok(Some(StdioListener::Vsock(l))),
                Err(e) if *channel == Channel::Serial => {
                    log::warn!("listen on vsock port {STDIO_VSOCK_PORT}: {e}");
                    Ok(None)
                }
                Err(e) => {
                    Err(e).with_context(|| format!("listen on vsock port {STDIO_VSOCK_PORT}"))
                }
            }
        }
        Channel::Listen(addr) => {
            let Some(path) = addr.strip_prefix("unix://") else {
                log::warn!("stdio streams need a unix:// listen address, got {addr}");
                return Ok(None);
            };
            let path = format!("{path}.stdio");
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("listen on {path}"))?;
            Ok(Some(StdioListener::Unix(l)))
        }
    }
}

/// Tells the host that the API is up by connecting to the host's ready port.
/// Some vsock backends lock up when the host connects before the guest's vsock
/// driver is ready, so the host waits for this before its first `CONNECT`.
async fn announce_ready() {
    match connect_ready().await {
        Ok(()) => log::debug!("announced readiness on host vsock port {READY_VSOCK_PORT}"),
        // Not fatal: a host may poll the API instead of listening for readiness.
        Err(e) => log::warn!("could not announce readiness on host port {READY_VSOCK_PORT}: {e}"),
    }
}
