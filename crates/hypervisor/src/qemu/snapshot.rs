//! QEMU snapshots: the VM's migration stream saved to a file, and loaded back
//! into a new QEMU started with the same command line and `-incoming defer`.
//!
//! The stream file is handed to QEMU as a descriptor (`getfd` over QMP), so
//! QEMU runs no shell and opens no path. vhost-user devices (vhost-user-vsock,
//! vhost-user-fs) cannot be migrated by QEMU, so a VM can be snapshotted when it
//! has none: a VM on the virtio-serial agent channel without shared
//! directories, or a q35 VM started with its vhost-user devices deferred
//! ([`crate::VmConfig::deferred_devices`]), before they are plugged in.
//!
//! A deferred VM's RAM is a memfd the backend made: its snapshot leaves the RAM
//! out of the stream (QEMU's `x-ignore-shared` capability: the stream holds the
//! device state only) and copies the memfd's data extents into [`MEMORY`], a
//! sparse file. A restore copies them into a new memfd that the clone's QEMU
//! maps (`cp --sparse=always`, run in the sandbox's cgroup so that the clone's
//! memory is charged to it), and loads the stream with the same capability. A
//! memfd loaded from a full stream would not do: QEMU reads every zero page of
//! the stream to check it, and a read fault on shared memory allocates the page,
//! so every clone would hold all its guest RAM.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Child;

use super::cmdline::{defers_devices, Machine};
use super::qmp::Session;
use crate::process::exit_log_tail;
use crate::{AgentChannel, Error, Result, VmConfig};

/// The migration stream inside a snapshot directory.
pub const STREAM: &str = "qemu-migration";
/// A deferred VM's guest RAM inside a snapshot directory (sparse).
pub const MEMORY: &str = "memory";
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
pub(crate) fn blocker(cfg: &VmConfig, machine: Machine) -> Option<&'static str> {
    if defers_devices(cfg, machine) {
        None
    } else if !cfg.nics.is_empty() {
        Some("snapshot of a VM with network devices (their taps belong to one sandbox)")
    } else if cfg.deferred_devices {
        Some("snapshot of a microvm VM with vhost-user devices (microvm has no PCIe hot-plug to add them after a restore); use machine = \"q35\"")
    } else if cfg.channel == AgentChannel::Vsock {
        Some("snapshot of a VM with vhost-user-vsock (QEMU cannot migrate vhost-user devices); use channel = \"serial\"")
    } else if !cfg.shared_dirs.is_empty() {
        Some("snapshot of a VM with virtio-fs shares (QEMU cannot migrate vhost-user-fs)")
    } else if !cfg.nics.is_empty() {
        Some("snapshot of a VM with network devices (their taps belong to one sandbox)")
    } else {
        None
    }
}

/// Writes the paused VM's migration stream to `dir/qemu-migration`, and, for a
/// VM whose RAM is the memfd `ram`, the RAM to `dir/memory`.
pub(crate) async fn save(qmp: &Path, dir: &Path, ram: Option<&File>) -> Result<()> {
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
    if ram.is_some() {
        ignore_shared(&mut s).await?;
    }
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
    })?;
    if let Some(ram) = ram {
        let path = dir.join(MEMORY);
        let io = |source| Error::Io {
            what: format!("write guest memory to {}", path.display()),
            source,
        };
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let len = ram.metadata().map_err(io)?.len();
        copy_data(ram, &out, len).map_err(io)?;
        out.sync_all().map_err(io)?;
    }
    Ok(())
}

/// Leaves shared RAM (a deferred VM's memfd) out of the migration stream:
/// the snapshot keeps it in [`MEMORY`]. Set on both ends.
async fn ignore_shared(s: &mut Session) -> Result<()> {
    s.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
    )
    .await
    .map(|_| ())
}

/// Page size of the data copy: all-zero pages are left as holes.
const PAGE: usize = 4096;

/// Copies the data extents of `src` (`SEEK_DATA`/`SEEK_HOLE`; all-zero pages
/// skipped too) to the same offsets in `dst` and sets `dst`'s length to `len`:
/// `dst` is as sparse as `src`.
pub(crate) fn copy_data(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor `src` owns; it only moves its offset.
        let r = unsafe { libc::lseek(src.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `off`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        } else {
            Ok(Some(r as u64))
        }
    };
    let mut buf = vec![0u8; 256 * PAGE];
    let mut off = 0u64;
    while off < len {
        let Some(start) = seek(off, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = start;
        while at < end {
            let n = buf.len().min((end - at) as usize);
            src.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    dst.write_all_at(page, at + (i * PAGE) as u64)?;
                }
            }
            at += n as u64;
        }
        off = end;
    }
    dst.set_len(len)
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
/// its log. `ram_outside`: the VM's RAM is a memfd already filled from the
/// snapshot's [`MEMORY`] (the stream does not hold it).
pub(crate) async fn load(
    qmp: &Path,
    stream: &File,
    qemu: &mut Child,
    log: &Path,
    ram_outside: bool,
) -> Result<()> {
    let mut s = Session::connect(qmp).await?;
    if ram_outside {
        ignore_shared(&mut s).await?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn copy_data_keeps_holes_and_zero_pages_out() {
        let dir = tempfile::tempdir().unwrap();
        let new = |name: &str| {
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let src = new("src");
        let len = 64 * PAGE as u64;
        src.set_len(len).unwrap();
        src.write_all_at(b"first", 0).unwrap();
        src.write_all_at(&[0u8; PAGE], 8 * PAGE as u64).unwrap(); // data, but zero
        src.write_all_at(b"last", len - 4).unwrap();
        let dst = new("dst");
        copy_data(&src, &dst, len).unwrap();
        let mut a = vec![0u8; len as usize];
        let mut b = vec![0u8; len as usize];
        src.read_exact_at(&mut a, 0).unwrap();
        dst.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "same bytes");
        use std::os::unix::fs::MetadataExt;
        // Two pages of data (512-byte blocks).
        assert_eq!(dst.metadata().unwrap().blocks() * 512, 2 * PAGE as u64);
    }
}
