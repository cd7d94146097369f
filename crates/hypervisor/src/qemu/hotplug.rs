//! The vhost-user devices of a VM started with its devices deferred
//! ([`crate::VmConfig::deferred_devices`]), plugged in over QMP.
//!
//! The VM has one empty PCIe root port for the vsock device and one per share
//! (see `super::cmdline`). Attaching starts the back ends (one virtiofsd per
//! share, vhost-device-vsock), then for each: `chardev-add` (a client socket to
//! the back end) and `device_add` into its port. Network devices: the tap's
//! fd handed over with `getfd`, `netdev_add`, `device_add` with the sandbox's
//! own MAC. The guest's PCIe hot-plug
//! driver (pciehp) probes the device; the agent mounts a share once its tag
//! exists and announces itself on vsock once the vsock device is up, so the
//! caller waits for that announcement, as after a cold boot.

use std::path::PathBuf;

use serde_json::json;
use tokio::process::Child;

use super::cmdline::{nic_port, share_port, Paths, VSOCK_PORT};
use super::qmp::Session;
use crate::{AgentChannel, AgentEndpoint, Result, VmConfig};

/// What [`attach`] needs: the VM's configuration and the back ends' binaries.
pub struct Pending {
    pub(crate) cfg: VmConfig,
    pub(crate) vhost_vsock: PathBuf,
    pub(crate) virtiofsd: PathBuf,
}

/// What [`attach`] started.
pub struct Attached {
    /// The back ends, which the VM now depends on.
    pub helpers: Vec<Child>,
    /// The agent's endpoint once the vsock device is in (`None`: unchanged).
    pub endpoint: Option<AgentEndpoint>,
}

/// Starts the back ends and plugs their devices in. On error the back ends
/// started so far are stopped; devices already added stay (the VM is broken:
/// the caller stops it).
pub async fn attach(p: &Pending) -> Result<Attached> {
    let mut helpers = Vec::new();
    match plug(p, &mut helpers).await {
        Ok(endpoint) => Ok(Attached { helpers, endpoint }),
        Err(e) => {
            crate::process::terminate_all(&mut helpers).await;
            Err(e)
        }
    }
}

async fn plug(p: &Pending, helpers: &mut Vec<Child>) -> Result<Option<AgentEndpoint>> {
    let cfg = &p.cfg;
    let paths = Paths::new(&cfg.run_dir);
    crate::virtiofs::start(&p.virtiofsd, cfg, helpers).await?;
    let vsock = cfg.channel == AgentChannel::Vsock;
    if vsock {
        super::start_vhost_vsock(&p.vhost_vsock, cfg, &paths, helpers).await?;
    }
    let mut s = Session::connect(&paths.qmp).await?;
    for (i, share) in cfg.shared_dirs.iter().enumerate() {
        let sock = crate::virtiofs::socket(&cfg.run_dir, i);
        let chardev = format!("fs{i}");
        add_chardev(&mut s, &chardev, &sock).await?;
        s.execute(
            "device_add",
            json!({
                "driver": "vhost-user-fs-pci",
                "id": format!("fsdev{i}"),
                "bus": share_port(i),
                "chardev": chardev,
                "tag": share.tag,
            }),
        )
        .await?;
    }
    let shares = cfg.shared_dirs.len();
    for (i, nic) in cfg.nics.iter().enumerate() {
        match nic {
            crate::Nic::VirtioTap(tap) => {
                use std::os::fd::AsFd;
                let fdname = format!("tapfd{i}");
                s.execute_with_fd("getfd", json!({ "fdname": fdname }), Some(tap.fd.as_fd()))
                    .await?;
                // vhost=off: no /dev/vhost-net (as at a cold boot, see cmdline).
                s.execute(
                    "netdev_add",
                    json!({ "type": "tap", "id": format!("net{i}"), "fd": fdname, "vhost": false }),
                )
                .await?;
                let mut dev = json!({
                    "driver": "virtio-net-pci",
                    "id": format!("nic{i}"),
                    "bus": nic_port(shares, i),
                    "netdev": format!("net{i}"),
                    "mac": tap.mac.to_string(),
                    "romfile": "",
                });
                if let Some(mtu) = tap.mtu {
                    dev["host_mtu"] = json!(mtu);
                }
                s.execute("device_add", dev).await?;
            }
        }
    }
    if !vsock {
        return Ok(None);
    }
    add_chardev(&mut s, "vsock", &paths.vhost_vsock).await?;
    s.execute(
        "device_add",
        json!({
            "driver": "vhost-user-vsock-pci",
            "id": "vsockdev",
            "bus": VSOCK_PORT,
            "chardev": "vsock",
        }),
    )
    .await?;
    log::debug!(
        "qemu {}: plugged in {} share(s), {} network device(s) and the vsock device",
        cfg.id,
        cfg.shared_dirs.len(),
        cfg.nics.len()
    );
    Ok(Some(AgentEndpoint::HybridVsock {
        uds: cfg.vsock_uds.clone(),
    }))
}

/// `chardev-add` of a client socket to a back end's vhost-user socket.
async fn add_chardev(s: &mut Session, id: &str, path: &std::path::Path) -> Result<()> {
    s.execute(
        "chardev-add",
        json!({
            "id": id,
            "backend": { "type": "socket", "data": {
                "addr": { "type": "unix", "data": { "path": path } },
                "server": false,
            }},
        }),
    )
    .await
    .map(|_| ())
}
