//! containerd-shim-vessel-v2: the containerd shim v2 front-end of Vessel.
//!
//! containerd runs `start` once per container; containers of one Kubernetes pod
//! (same `io.kubernetes.cri.sandbox-id` annotation) get the address of one
//! shim, which owns the pod's VM. The sandbox (pause) container boots the VM,
//! later containers join it, deleting the sandbox stops it.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use containerd_shim::asynchronous::{publisher::RemotePublisher, spawn, ExitSignal};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::create_task;
use containerd_shim::protos::ttrpc::r#async::transport::Listener;
use containerd_shim::protos::ttrpc::r#async::Server;
use containerd_shim::{Flags, StartOpts, Task};
use containerd_shim_vessel_v2::{rootfs, service};
use tokio::io::AsyncWriteExt;
use vessel_runtime::pod::{self, Pod};

/// `start` as containerd 1.6 speaks it: flags in, the bare `unix://` address
/// out (the library's own start answers with the JSON of newer containerds).
async fn start(flags: Flags) -> anyhow::Result<()> {
    let bundle = std::env::current_dir()?;
    let group = pod::pod_of(&flags.id, &bundle);
    let opts = StartOpts {
        id: flags.id,
        publish_binary: flags.publish_binary,
        address: flags.address,
        ttrpc_address: std::env::var("TTRPC_ADDRESS").unwrap_or_default(),
        namespace: flags.namespace,
        debug: flags.debug,
        ..StartOpts::default()
    };
    // A later container of a running pod: the server child finds the socket
    // alive and exits at once; the address is the pod's.
    let address = spawn(opts, &group, Vec::new()).await?;
    std::fs::write(bundle.join("address"), &address).context("write address")?;
    let mut out = tokio::io::stdout();
    out.write_all(address.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// `delete`: the shim server is gone (crashed or killed); clean what it left
/// and answer with a protobuf DeleteResponse.
async fn delete(flags: Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        flags.bundle.into()
    };
    if let Ok((config, _)) = vessel_runtime::Config::load(None) {
        Pod::cleanup_after_crash(&config, &flags.id);
        // The VM is gone: the tc qdiscs it left on the namespace's links go too.
        vessel_runtime::network::undo_recorded(&config.state_root, &flags.id).await;
    }
    rootfs::unmount(&bundle);
    remove_dead_socket(&bundle).await;
    let resp = DeleteResponse {
        exit_status: 128 + libc::SIGKILL as u32,
        exited_at: Some(containerd_shim::util::timestamp()?).into(),
        ..Default::default()
    };
    let mut out = tokio::io::stdout();
    out.write_all(&resp.write_to_bytes()?).await?;
    out.flush().await?;
    Ok(())
}

/// Removes the shim socket `start` recorded in the bundle when no server answers on it
/// any more: a killed server could not remove it itself (its shutdown does), and nothing
/// else would. A socket another server answers on (the pod's shim, still alive, for a
/// container that was deleted on its own) is kept.
async fn remove_dead_socket(bundle: &Path) {
    let Ok(address) = std::fs::read_to_string(bundle.join("address")) else {
        return;
    };
    let address = address.trim();
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return;
    }
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_socket())
    {
        match std::fs::remove_file(path) {
            Ok(()) => log::info!("removed the dead shim's socket {}", path.display()),
            Err(e) => log::warn!("removing the dead shim's socket {}: {e}", path.display()),
        }
    }
}

/// Binds the shim socket. `None`: another server already answers there.
async fn listen(address: &str) -> anyhow::Result<Option<std::os::unix::net::UnixListener>> {
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Ok(None);
            }
            if path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_socket())
            {
                std::fs::remove_file(path)?;
            }
            Ok(Some(std::os::unix::net::UnixListener::bind(path)?))
        }
        Err(e) => Err(e).with_context(|| format!("bind {}", path.display())),
    }
}

/// Tells `start` (which reads our stdout) that the server is up.
fn signal_started() {
    // SAFETY: dup2 on the process's own standard descriptors; no Rust object
    // owns fd 1 (tokio's stdout handle is not in use in the server).
    unsafe {
        libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
    }
}

/// The long-lived shim server of one pod.
async fn serve(flags: Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("-socket is required");
    }
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)?;
    let Some(listener) = listen(&flags.socket).await? else {
        std::fs::write("address", &flags.socket).context("write address")?;
        signal_started();
        return Ok(());
    };
    let (config, _) = vessel_runtime::Config::load(None)?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let exit = Arc::new(ExitSignal::default());
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service::TaskService::new(
        config,
        &flags.namespace,
        publisher,
        exit.clone(),
        service::Backend::real(),
    ));
    // containerd 1.6 calls containerd.task.v2.Task; the protos name it v3
    // (same messages). Serve both.
    let mut services = create_task(task.clone());
    for (name, svc) in create_task(task) {
        services.insert(name.replace(".v3.", ".v2."), svc);
    }
    let listener = Listener::try_from(listener)?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    signal_started();
    log::info!("shim for pod {} serving on {}", flags.id, flags.socket);
    exit.wait().await;
    server.shutdown().await.ok();
    let path = flags.socket.trim_start_matches("unix://");
    let _ = std::fs::remove_file(path);
    Ok(())
}

#[tokio::main]
async fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    let res = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => match flags.action.as_str() {
            "start" => start(flags).await,
            "delete" => delete(flags).await,
            _ => serve(flags).await,
        },
        Err(e) => Err(e.into()),
    };
    if let Err(e) = res {
        eprintln!("containerd-shim-vessel-v2: {e:#}");
        std::process::exit(1);
    }
}
