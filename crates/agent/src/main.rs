//! vessel-agent: PID 1 of a Vessel sandbox VM.
//!
//! As PID 1 it sets up the guest (mounts, reaping), then serves the agent ttrpc
//! API on the channel named by `vessel.channel=` on the kernel command line
//! (vsock by default). Any fatal error is printed to the console and ends the VM
//! (reboot, which the host configures to terminate the VM) instead of hanging.
//!
//! Run as a normal process (not PID 1) it only serves the API on the address
//! given by `--listen` (for development on a host: `--listen unix:///tmp/a.sock`).

mod channel;
mod container;
mod health;
mod init;
mod journal;
mod kmsg;
mod logger;
mod metrics;
mod monitor;
mod network;
mod reaper;
mod server;
mod service;
mod stdio;
mod tripwire;
mod uevent;

use std::process::ExitCode;

use anyhow::Context;

/// Working directory of the agent: libcontainer state, bundles, console sockets.
const WORK_DIR: &str = "/run/vessel-agent";

fn main() -> ExitCode {
    // The helper's stderr is a container's stderr: it must not log there.
    let mut args = std::env::args().skip(1);
    if let (Some(a), Some(req)) = (args.next(), args.next()) {
        if a == container::helper::HELPER_ARG {
            return container::helper::main(&req);
        }
    }
    logger::init();
    let is_init = std::process::id() == 1;
    let result = if is_init {
        run_as_init()
    } else {
        run_standalone()
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("fatal: {e:#}");
            if is_init {
                init::power_off();
            }
            ExitCode::FAILURE
        }
    }
}

fn run_as_init() -> anyhow::Result<()> {
    init::setup().context("guest init")?;
    // The logger's level comes from `vessel.debug` on the kernel command line, which
    // PID 1 can read only now that /proc is mounted.
    logger::init();
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("read /proc/cmdline")?;
    let channel = channel::Channel::from_cmdline(&cmdline)?;
    log::info!(
        "vessel-agent {} starting as PID 1, channel {channel}",
        env!("CARGO_PKG_VERSION")
    );
    let rt = runtime()?;
    let res = rt.block_on(async {
        let net = network::connect().context("guest network")?;
        network::loopback_up(&net)
            .await
            .context("bring up the guest loopback")?;
        let reaper = reaper::spawn().context("start child reaper")?;
        kmsg::spawn();
        server::serve(channel, reaper, WORK_DIR.into()).await
    });
    // The server only returns on error.
    match res.context("agent server")? {}
}

fn run_standalone() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (channel, work) = match args[..] {
        ["--listen", addr] => (channel::Channel::Listen(addr.into()), WORK_DIR),
        ["--listen", addr, "--work-dir", work] => (channel::Channel::Listen(addr.into()), work),
        ["--version"] => {
            println!("vessel-agent {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        _ => anyhow::bail!(
            "vessel-agent runs as PID 1 in a Vessel guest; for development use \
             --listen unix://<path> [--work-dir <dir>] (stdio streams on <path>.stdio)"
        ),
    };
    // Container processes are re-parented to the agent (libcontainer's
    // as_sibling); be their reaper as PID 1 would be.
    nix::sys::prctl::set_child_subreaper(true).context("become child subreaper")?;
    let work = std::path::PathBuf::from(work);
    match runtime()?.block_on(async {
        let reaper = reaper::spawn().context("start child reaper")?;
        server::serve(channel, reaper, work).await
    })? {}
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("create tokio runtime")
}
