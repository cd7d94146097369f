//! Container file systems on the host, shared with the guest.
//!
//! Each pod has one staging directory exported to its VM by one virtiofsd
//! (tag [`SHARE_TAG`], mounted at [`GUEST_SHARED_DIR`] in the guest). The
//! staging directory is a shared mount point, so mounts made under it after the
//! VM booted propagate into virtiofsd's (slave) mount namespace. A container's
//! rootfs (the overlay containerd passes in CreateTaskRequest) is mounted at
//! `<staging>/<id>/rootfs`, and host files the spec bind-mounts (CRI's
//! /etc/hosts, resolv.conf, ...) are bind-mounted at `<staging>/<id>/mounts/<n>`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_shim::protos::api::Mount as TaskMount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, MountBuilder, Spec};

pub use vessel_runtime::container::share::{GUEST_SHARED as GUEST_SHARED_DIR, SHARE_TAG};

/// Makes `dir` a shared mount point of its own (bind onto itself, rshared).
pub fn make_shared_mount(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {} onto itself", dir.display()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("make {} shared", dir.display()))?;
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Unmounts everything at or below `dir` and removes it.
pub fn remove_tree(dir: &Path) {
    for m in mounts_below(dir) {
        if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
            log::warn!("umount {}: {e}", m.display());
        }
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", dir.display());
        }
    }
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// Mounts the container's rootfs and host bind sources under `<staging>/<id>`
/// and rewrites `spec` to the guest paths. On error the caller removes the tree.
pub fn prepare(
    staging: &Path,
    id: &str,
    bundle: &Path,
    rootfs: &[TaskMount],
    spec: &mut Spec,
) -> Result<()> {
    let dir = staging.join(id);
    let target = dir.join("rootfs");
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    if rootfs.is_empty() {
        // A bundle with a ready rootfs (ctr run --rootfs, plain OCI bundles).
        let src = spec
            .root()
            .as_ref()
            .map(|r| bundle.join(r.path()))
            .unwrap_or_else(|| bundle.join("rootfs"));
        bind(&src, &target)?;
    }
    for m in rootfs {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            &target,
        )
        .with_context(|| format!("mount {} rootfs at {}", m.type_, target.display()))?;
    }
    let guest_dir = Path::new(GUEST_SHARED_DIR).join(id);
    if let Some(root) = spec.root_mut() {
        root.set_path(guest_dir.join("rootfs"));
    }

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (i, m) in mounts.iter_mut().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let Some(src) = m.source().clone() else {
            continue;
        };
        if src.starts_with("/dev/shm") || m.destination() == Path::new("/dev/shm") {
            // The pod's shm is a host tmpfs; the guest gets its own.
            *m = MountBuilder::default()
                .destination("/dev/shm")
                .typ("tmpfs")
                .source("shm")
                .options(vec![
                    "nosuid".into(),
                    "noexec".into(),
                    "nodev".into(),
                    "mode=1777".into(),
                    "size=65536k".into(),
                ])
                .build()?;
            continue;
        }
        let meta = match std::fs::metadata(&src) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("bind source {} of {id}: {e}; left as is", src.display());
                continue;
            }
        };
        let name = format!("mounts/{i}");
        let host = dir.join(&name);
        std::fs::create_dir_all(dir.join("mounts"))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&host)?;
        } else {
            std::fs::write(&host, b"")?;
        }
        bind(&src, &host)?;
        m.set_source(Some(guest_dir.join(&name)));
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

fn bind(src: &Path, target: &Path) -> Result<()> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {} to {}", src.display(), target.display()))
}
