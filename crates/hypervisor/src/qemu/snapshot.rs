//! QEMU snapshots: the VM's migration stream saved to a file, and loaded back
//! into a new QEMU started with the same command line and `-incoming defer`.
//!
//! The stream file is handed to QEMU as a descriptor (`getfd` over QMP), so
//! QEMU runs no shell and opens no path. vhost-user devices (vhost-user-vsock,
//! vhost-user-fs) cannot be migrated by QEMU, so only VMs on the virtio-serial
//! agent channel without shared directories can be snapshotted.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Child;

use super::qmp::Session;
use crate::process::exit_log_tail;
use crate::{AgentChannel, Error, Result, VmConfig};

/// The migration stream inside a snapshot directory.
pub const STREAM: &str = "qemu-migration";
/// Name of the stream descriptor in QEMU's monitor.
const FD_NAME: &str = "vessel-snapshot";
/// Migration bandwidth cap (QEMU's default, 32 MiB/s, would make a snapshot
/// of a 256 MiB guest take seconds).
const MAX_BANDWIDTH: u64 = 16 << 30;
/// Longest a save or load may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// Interval for polling migration progress (QMP has events, but polling one
/// status keeps the client small).
const POLL: Duration = Duration::from_millis(10);
/// How long to wait for a QEMU that closed its monitor to exit.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Why this VM cannot be snapshotted by QEMU, if it cannot.
pub(crate) fn blocker(cfg: &VmConfig) -> Option<&'static str> {
    if cfg.channel == AgentChannel::Vsock {
        Some("snapshot of a VM with vhost-user-vsock (QEMU cannot migrate vhost-user devices); use channel = \"serial\"")
    } else if !cfg.shared_dirs.is_empty() {
        Some("snapshot of a VM with virtio-fs shares (QEMU cannot migrate vhost-user-fs)")
    } else if !cfg.nics.is_empty() {
        Some("snapshot of a VM with network devices (their taps belong to one sandbox)")
    } else {
        None
    }
}

/// Writes the paused VM's migration stream to `dir/qemu-migration`.
pub(crate) async fn save(qmp: &Path, dir: &Path) -> Result<()> {
    let path = dir.join(STREAM);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| Error::Io {
            what: format!("create {}", path.display()),
            source,
        })?;
    let mut s = Session::connect(qmp).await?;
    s.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    )
    .await?;
    s.execute_with_fd("getfd", json!({ "fdname": FD_NAME }), Some(file.as_fd()))
        .await?;
    s.execute("migrate", json!({ "uri": format!("fd:{FD_NAME}") }))
        .await?;
    let start = Instant::now();
    loop {
        let m = s.execute("query-migrate", json!({})).await?;
        match m.get("status").and_then(|v| v.as_str()).unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(Error::Qmp {
                    command: "migrate".into(),
                    reason: m
                        .get("error-desc")
                        .and_then(|v| v.as_str())
                        .unwrap_or("migration failed")
                        .to_string(),
                })
            }
            _ if start.elapsed() > TRANSFER_TIMEOUT => {
                let _ = s.execute("migrate_cancel", json!({})).await;
                return Err(Error::Timeout {
                    what: "QEMU to write the snapshot".into(),
                    after: TRANSFER_TIMEOUT,
                });
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
    file.sync_all().map_err(|source| Error::Io {
        what: format!("sync {}", path.display()),
        source,
    })
}

/// Opens the migration stream of the snapshot in `dir`.
pub(crate) fn open_stream(dir: &Path) -> Result<File> {
    let path = dir.join(STREAM);
    File::open(&path).map_err(|source| Error::Io {
        what: format!("open snapshot stream {}", path.display()),
        source,
    })
}

/// Feeds `stream` to a QEMU started with `-incoming defer`, waits until it is
/// loaded and resumes the VM. A stream QEMU cannot load makes QEMU exit: reported with
/// its log.
pub(crate) async fn load(qmp: &Path, stream: &File, qemu: &mut Child, log: &Path) -> Result<()> {
    let mut s = Session::connect(qmp).await?;
    s.execute_with_fd("getfd", json!({ "fdname": FD_NAME }), Some(stream.as_fd()))
        .await?;
    s.execute(
        "migrate-incoming",
        json!({ "uri": format!("fd:{FD_NAME}") }),
    )
    .await?;
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(Error::EarlyExit {
                what: "QEMU (loading the snapshot)",
                status: status.to_string(),
                detail: exit_log_tail(log, 20),
            });
        }
        // QEMU exits when a load fails, closing the monitor: check the
        // process again before reporting the QMP error.
        let m = match s.execute("query-migrate", json!({})).await {
            Ok(m) => m,
            Err(e) => {
                if let Ok(Ok(status)) = tokio::time::timeout(EXIT_WAIT, qemu.wait()).await {
                    return Err(Error::EarlyExit {
                        what: "QEMU (loading the snapshot)",
                        status: status.to_string(),
                        detail: exit_log_tail(log, 20),
                    });
                }
                return Err(e);
            }
        };
        match m.get("status").and_then(|v| v.as_str()).unwrap_or("") {
            // The snapshot was taken of a paused VM, so it loads paused.
            "completed" => {
                s.execute("cont", json!({})).await?;
                return Ok(());
            }
            "failed" => {
                return Err(Error::Qmp {
                    command: "migrate-incoming".into(),
                    reason: m
                        .get("error-desc")
                        .and_then(|v| v.as_str())
                        .unwrap_or("loading the snapshot failed")
                        .to_string(),
                })
            }
            _ if start.elapsed() > TRANSFER_TIMEOUT => {
                return Err(Error::Timeout {
                    what: "QEMU to load the snapshot".into(),
                    after: TRANSFER_TIMEOUT,
                })
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}
