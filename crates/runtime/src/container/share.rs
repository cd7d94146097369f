//! Rootfs and bind-mount sources reach the guest through ONE virtio-fs share
//! per sandbox: a staging directory `<root>/<id>/shared/` (a private bind
//! mount of itself) into which the bundle rootfs and every host bind-mount
//! source are bind-mounted (files as files). config.json paths are rewritten
//! to the guest paths under [`GUEST_SHARED`].
//!
//! Cleanup detaches the whole staging tree in one `umount2(MNT_DETACH)` and
//! then removes only empty directories and mount-point files, never
//! recursively: a failed unmount can never delete container data.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::Value;
use vessel_hypervisor::SharedDir;
use vessel_protocol::agent::Storage;

use super::{ContainerError, Result};

/// virtio-fs tag of the staging share.
pub const SHARE_TAG: &str = "vessel";
/// Where the guest mounts the staging share.
pub const GUEST_SHARED: &str = "/run/vessel/shared";
pub const STAGING_DIR: &str = "shared";

/// The staging tree of one container.
pub struct Staging {
    dir: PathBuf,
}

fn mount_err(what: &str, path: &Path, e: nix::Error) -> ContainerError {
    ContainerError::Mount {
        what: what.to_string(),
        path: path.display().to_string(),
        source: e,
    }
}

impl Staging {
    /// Builds the staging tree for `spec` (rootfs at `rootfs`) and rewrites
    /// `spec` to guest paths. Everything is undone on error.
    pub fn prepare(container_dir: &Path, rootfs: &Path, spec: &mut Value) -> Result<Staging> {
        let dir = container_dir.join(STAGING_DIR);
        std::fs::create_dir(&dir).map_err(|e| ContainerError::io(&dir, e))?;
        let staging = Staging { dir };
        match staging.fill(rootfs, spec) {
            Ok(()) => Ok(staging),
            Err(e) => {
                if let Err(c) = cleanup(container_dir) {
                    log::warn!("cleanup after failed staging: {c}");
                }
                Err(e)
            }
        }
    }

    fn fill(&self, rootfs: &Path, spec: &mut Value) -> Result<()> {
        let dir = &self.dir;
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| mount_err("bind staging dir", dir, e))?;
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| mount_err("make staging dir private", dir, e))?;
        let readonly = spec["root"]["readonly"].as_bool().unwrap_or(false);
        bind(rootfs, &dir.join("rootfs"), true, readonly)?;
        spec["root"]["path"] = format!("{GUEST_SHARED}/rootfs").into();
        if let Some(mounts) = spec["mounts"].as_array_mut() {
            for (i, m) in mounts.iter_mut().enumerate() {
                let opts: Vec<String> = m["options"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| o.as_str().map(str::to_string))
                    .collect();
                let is_bind = m["type"].as_str() == Some("bind")
                    || opts.iter().any(|o| o == "bind" || o == "rbind");
                if !is_bind {
                    continue;
                }
                let Some(source) = m["source"].as_str().map(PathBuf::from) else {
                    continue;
                };
                let recursive = opts.iter().any(|o| o == "rbind");
                let ro = opts.iter().any(|o| o == "ro");
                let name = format!("m{i}");
                bind(&source, &dir.join(&name), recursive, ro)?;
                m["source"] = format!("{GUEST_SHARED}/{name}").into();
            }
        }
        Ok(())
    }

    /// The share for the VM.
    pub fn shared_dir(&self) -> SharedDir {
        SharedDir {
            tag: SHARE_TAG.into(),
            host_path: self.dir.clone(),
            read_only: false,
        }
    }

    /// The storage the agent mounts before creating the container.
    pub fn storage() -> Storage {
        let mut s = Storage::new();
        s.source = SHARE_TAG.into();
        s.fstype = "virtiofs".into();
        s.mount_point = GUEST_SHARED.into();
        s
    }
}

/// Bind-mounts `source` (directory or file) at `target`, creating `target`.
fn bind(source: &Path, target: &Path, recursive: bool, readonly: bool) -> Result<()> {
    let meta = std::fs::metadata(source).map_err(|e| ContainerError::io(source, e))?;
    if meta.is_dir() {
        std::fs::create_dir(target)
    } else {
        std::fs::File::create(target).map(drop)
    }
    .map_err(|e| ContainerError::io(target, e))?;
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
        .map_err(|e| mount_err("bind", source, e))?;
    if readonly {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| mount_err("remount read-only", target, e))?;
    }
    Ok(())
}

/// Whether anything is mounted at or below `dir` (from /proc/self/mountinfo).
fn has_mounts(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true; // cannot tell: assume mounted, delete nothing
    };
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|mp| Path::new(&mp).starts_with(dir))
    })
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts the staging tree of `container_dir` and removes it. Idempotent.
pub fn cleanup(container_dir: &Path) -> Result<()> {
    let dir = container_dir.join(STAGING_DIR);
    if !dir.exists() {
        return Ok(());
    }
    // Detach repeatedly: the staging dir may carry stacked mounts.
    for _ in 0..8 {
        if !has_mounts(&dir) {
            break;
        }
        match umount2(&dir, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(nix::Error::EINVAL) => {
                // Not a mount point itself: detach what is below it.
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let _ = umount2(&e.path(), MntFlags::MNT_DETACH);
                }
            }
            Err(e) => return Err(mount_err("unmount staging dir", &dir, e)),
        }
    }
    if has_mounts(&dir) {
        return Err(ContainerError::StillMounted(dir.display().to_string()));
    }
    for e in std::fs::read_dir(&dir).map_err(|e| ContainerError::io(&dir, e))? {
        let e = e.map_err(|e| ContainerError::io(&dir, e))?;
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| ContainerError::io(&p, e))?;
    }
    std::fs::remove_dir(&dir).map_err(|e| ContainerError::io(&dir, e))
}

/// Removes a container directory: staging first (safely), then the rest.
pub fn remove_container_dir(container_dir: &Path) -> Result<()> {
    cleanup(container_dir)?;
    match std::fs::remove_dir_all(container_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ContainerError::io(container_dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn stages_and_cleans_up_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for bind mounts");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (cdir, rootfs, src) = (
            d.path().join("c"),
            d.path().join("rootfs"),
            d.path().join("f"),
        );
        std::fs::create_dir_all(&cdir).unwrap();
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(&src, b"hi").unwrap();
        let mut spec = serde_json::json!({
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/f", "type": "bind", "source": src, "options": ["rbind", "ro"]},
            ]
        });
        let st = Staging::prepare(&cdir, &rootfs, &mut spec).unwrap();
        assert_eq!(spec["root"]["path"], "/run/vessel/shared/rootfs");
        assert_eq!(spec["mounts"][1]["source"], "/run/vessel/shared/m1");
        assert_eq!(spec["mounts"][0]["source"], "proc");
        let staged = st.shared_dir().host_path;
        assert_eq!(std::fs::read(staged.join("m1")).unwrap(), b"hi");
        assert!(
            std::fs::write(staged.join("rootfs/x"), b"").is_err(),
            "ro root"
        );
        assert!(has_mounts(&staged));
        remove_container_dir(&cdir).unwrap();
        assert!(!cdir.exists() && rootfs.join("etc").exists() && src.exists());
        // A missing bind source fails and leaves nothing mounted.
        std::fs::create_dir_all(&cdir).unwrap();
        let mut spec = serde_json::json!({"root": {"path": "r"}, "mounts": [
            {"destination": "/x", "type": "bind", "source": "/nonexistent-src", "options": ["bind"]}]});
        assert!(Staging::prepare(&cdir, &rootfs, &mut spec).is_err());
        assert!(!cdir.join(STAGING_DIR).exists());
    }
}
