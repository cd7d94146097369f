//! The agent's ttrpc server on the configured channel.

use std::sync::Arc;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::Server;
use vessel_protocol::ports::{AGENT_VSOCK_PORT, HOST_CID, READY_MAGIC, READY_VSOCK_PORT};

use crate::channel::Channel;
use crate::health::HealthService;

/// Serves the agent API until the process ends.
pub async fn serve(channel: Channel) -> anyhow::Result<std::convert::Infallible> {
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
        .register_service(health);
    server.start().await.context("start ttrpc server")?;
    log::info!("agent API ready on {channel}");
    if channel == Channel::Vsock {
        announce_ready().await;
    }
    // The server runs on its own tasks; PID 1 lives until the VM ends.
    std::future::pending().await
}

/// Tells the host that the API is up by connecting to the host's ready port.
/// Some vsock backends lock up when the host connects before the guest's vsock
/// driver is ready, so the host waits for this before its first `CONNECT`.
async fn announce_ready() {
    let addr = tokio_vsock::VsockAddr::new(HOST_CID, READY_VSOCK_PORT);
    let line = format!("{READY_MAGIC} {}\n", env!("CARGO_PKG_VERSION"));
    let res = async {
        let mut s = tokio_vsock::VsockStream::connect(addr).await?;
        s.write_all(line.as_bytes()).await?;
        s.shutdown(std::net::Shutdown::Write)
    }
    .await;
    match res {
        Ok(()) => log::debug!("announced readiness on host vsock port {READY_VSOCK_PORT}"),
        // Not fatal: a host may poll the API instead of listening for readiness.
        Err(e) => log::warn!("could not announce readiness on host port {READY_VSOCK_PORT}: {e}"),
    }
}
