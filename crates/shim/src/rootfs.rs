//! containerd's rootfs mounts (an overlay of the snapshot), mounted at
//! `<bundle>/rootfs` as runc's shim does; the runtime stages that directory
//! into the pod's share. containerd removes the bundle after `delete`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_shim::protos::api::Mount;
use nix::mount::{umount2, MntFlags};

/// Mounts `mounts` at `<bundle>/rootfs`; returns that path.
pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<PathBuf> {
    let target = bundle.join("rootfs");
    std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
    for m in mounts {
        containerd_shim::mount::mount_rootfs(
            Some(m.type_.as_str()).filter(|t| !t.is_empty()),
            Some(m.source.as_str()).filter(|s| !s.is_empty()),
            &m.options,
            &target,
        )
        .with_context(|| format!("mount {} rootfs at {}", m.type_, target.display()))?;
    }
    Ok(target)
}

/// Undoes [`mount`]; removes nothing.
pub fn unmount(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
        if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
            log::error!("unmount {}: {e}", target.display());
        }
    }
}
