//! `vessel monitor [--listen ADDR] [--state-root DIR]...`: every sandbox on the host
//! on one Prometheus endpoint (docs/monitoring.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use vessel_runtime::metrics::{http, monitor};

use crate::Ctx;

/// Longest time one request is served (a scrape takes at most
/// [`monitor::SCRAPE_TIMEOUT`]).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(clap::Args)]
pub struct Args {
    /// Address to serve /metrics on. Loopback by default: the metrics name every
    /// sandbox and container on the host.
    #[arg(long, default_value = monitor::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Another state root to look for sandboxes under (besides this CLI's, the
    /// shim's and /run/vessel-vm).
    #[arg(long = "state-root")]
    state_roots: Vec<PathBuf>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let mut roots = vec![ctx.root().to_path_buf()];
    // The shim reads the default configuration file.
    if let Ok((shim, _)) = vessel_runtime::Config::load(None) {
        roots.push(shim.state_root);
    }
    roots.push(vessel_runtime::container::VM_ROOT_FALLBACK.into());
    roots.extend(a.state_roots);
    roots.sort();
    roots.dedup();
    if !a.listen.ip().is_loopback() {
        log::warn!(
            "monitor: listening on {}: every sandbox's metrics are readable from the network",
            a.listen
        );
    }
    crate::block_on(serve(a.listen, roots))??;
    Ok(ExitCode::SUCCESS)
}

async fn serve(listen: SocketAddr, roots: Vec<PathBuf>) -> anyhow::Result<()> {
    use std::io::Write;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("listening on http://{}/metrics", listener.local_addr()?);
    std::io::stdout().flush()?;
    let roots = std::sync::Arc::new(roots);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => c?,
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let roots = roots.clone();
        tokio::spawn(async move {
            let served = http::answer(&mut conn, monitor::collect(&roots));
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, served).await;
        });
    }
}
