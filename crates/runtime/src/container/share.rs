//! Rootfs and bind-mount sources reach the guest through ONE virtio-fs share
//! per sandbox, into which the bundle rootfs and every host bind-mount source
//! are bind-mounted (files as files). config.json paths are rewritten to the
//! guest paths under [`GUEST_SHARED`].
//!
//! - A `vessel` container (a pod of one) stages before its VM boots:
//!   [`Staging::prepare`] fills `<root>/<id>/shared/`.
//! - A pod stages each container after its VM booted: [`PodShare::stage`]
//!   fills `<share>/<container id>/`, seen by the guest under
//!   `GUEST_SHARED/<container id>/`. The pod's top is a shared mount of its
//!   own peer group, so binds made after virtiofsd started (in its own mount
//!   namespace, a slave of ours) reach it.
//!
//! The guest is hostile and writes the share. Both kinds are one
//! implementation:
//! - The top of a share is a small tmpfs ([`TOP_TMPFS_OPTIONS`]), not host
//!   state: what the guest writes beside the rootfs is bounded, and it all
//!   goes away with one unmount. The writable parts are the container's own
//!   rootfs and bind sources, as with runc.
//! - Every host-side step inside a share is race-free ([`crate::beneath`]):
//!   mount points (and a pod container's directory) are created and opened
//!   beneath the share's root without following symlinks, and binds are
//!   placed on those file descriptors (`open_tree` + `move_mount`), never on
//!   a path resolved again. A guest that moves a directory only moves where
//!   a mount lands inside the share.
//! - A pod's container is unstaged by file descriptor: each of its binds is
//!   detached through the fd of its mount, wherever the guest moved it, and
//!   only the (then empty) mount points made for it are removed, one name
//!   at a time, never recursively.
//!
//! Cleanup of a whole share ([`cleanup_tree`]) detaches its top with
//! `umount2(MNT_DETACH | UMOUNT_NOFOLLOW)` (a host path, never one beneath
//! the guest's tree), checks that nothing is mounted below it any more and
//! only then removes what is left (never following a link): a failed unmount
//! can never delete host data or container data, and nothing the guest left
//! in the tmpfs can stop a delete.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::Value;
use vessel_hypervisor::SharedDir;
use vessel_protocol::agent::Storage;

use super::{ContainerError, Result};
use crate::beneath::{self, Tree};

/// virtio-fs tag of the staging share.
pub const SHARE_TAG: &str = "vessel";
/// Where the guest mounts the staging share.
pub const GUEST_SHARED: &str = "/run/vessel/shared";
pub const STAGING_DIR: &str = "shared";
/// The top of a share: a tmpfs of at most 1 MiB and 1024 inodes (host RAM
/// the guest can fill, bounded), with no devices, set-id or executables.
pub const TOP_TMPFS_OPTIONS: &str = "size=1m,nr_inodes=1024,mode=0755";

/// The staging tree of one container.
pub struct Staging {
    dir: PathBuf,
    tree: Tree,
}

fn mount_err(what: &str, path: &Path, e: nix::Error) -> ContainerError {
    ContainerError::Mount {
        what: what.to_string(),
        path: path.display().to_string(),
        source: e,
    }
}

/// Mounts the share's top on `dir` (which exists): a size-limited tmpfs,
/// private, or with `shared` a shared mount of its own peer group (not a
/// peer of the host's mounts). Returns its root for race-free work beneath
/// it.
fn mount_top(dir: &Path, shared: bool) -> Result<Tree> {
    let at = Tree::open(dir).map_err(ContainerError::Staging)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let target = beneath::fd_path(at.fd());
    mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        flags,
        Some(TOP_TMPFS_OPTIONS),
    )
    .map_err(|e| mount_err("mount the share's tmpfs on", dir, e))?;
    // The tmpfs root, reached through the host-only parent directory.
    let tree = Tree::open(dir).map_err(ContainerError::Staging)?;
    mount(
        None::<&str>,
        &beneath::fd_path(tree.fd()),
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| mount_err("make staging dir private", dir, e))?;
    if shared {
        mount(
            None::<&str>,
            &beneath::fd_path(tree.fd()),
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| mount_err("make staging dir shared", dir, e))?;
    }
    Ok(tree)
}

impl Staging {
    /// Builds the staging tree for `spec` (rootfs at `rootfs`) and rewrites
    /// `spec` to guest paths. Everything is undone on error.
    pub fn prepare(container_dir: &Path, rootfs: &Path, spec: &mut Value) -> Result<Staging> {
        let staging = Staging::create(&container_dir.join(STAGING_DIR))?;
        // The binds go with the top (one detach): their fds are not kept.
        match fill(&staging.tree, GUEST_SHARED, rootfs, spec, &mut Vec::new()) {
            Ok(()) => Ok(staging),
            Err(e) => {
                if let Err(c) = cleanup(container_dir) {
                    log::warn!("cleanup after failed staging: {c}");
                }
                Err(e)
            }
        }
    }

    /// Creates the share's top at `dir` (which must not exist): a
    /// size-limited private tmpfs. [`cleanup_tree`] of `dir` undoes it.
    pub fn create(dir: &Path) -> Result<Staging> {
        std::fs::create_dir(dir).map_err(|e| ContainerError::io(dir, e))?;
        match mount_top(dir, false) {
            Ok(tree) => Ok(Staging {
                dir: dir.to_path_buf(),
                tree,
            }),
            Err(e) => {
                if let Err(c) = cleanup_tree(dir) {
                    log::warn!("cleanup after failed staging: {c}");
                }
                Err(e)
            }
        }
    }

    /// Bind-mounts host `source` at `rel` in the share; see [`bind`].
    pub fn bind(&self, source: &Path, rel: &Path, recursive: bool, readonly: bool) -> Result<()> {
        bind(&self.tree, source, rel, recursive, readonly).map(drop)
    }
}

/// Stages `rootfs` and the bind sources of `spec` at the top of `tree`,
/// pushing each bind to `bound` as it is made, and rewrites `spec` to their
/// guest paths under `guest_dir`.
fn fill(
    tree: &Tree,
    guest_dir: &str,
    rootfs: &Path,
    spec: &mut Value,
    bound: &mut Vec<Bound>,
) -> Result<()> {
    rewrite_spec(
        guest_dir,
        rootfs,
        spec,
        |source, name, recursive, readonly| {
            bound.push(bind(tree, source, Path::new(name), recursive, readonly)?);
            Ok(())
        },
    )
}

/// Rewrites `spec`'s root and bind mounts to guest paths under `guest_dir`,
/// staging each source (the rootfs as `rootfs`, mount `i` as `m<i>`) with
/// `stage(source, name, recursive, readonly)`; a bind of the host's /dev/shm
/// becomes the guest's own tmpfs.
///
/// The rootfs is staged read-write even for `root.readonly`: the guest's
/// libcontainer first creates the spec's missing mount points in the rootfs
/// (a CRI sandbox binds /etc/resolv.conf, absent from its image; a bundle
/// may lack /proc or /sys) and then makes the container's root read-only
/// itself, as runc does on the host. A bind made read-only before it is
/// attached is read-only in virtiofsd too, so the guest could not create
/// them. Binds marked `ro` stay read-only on the host.
fn rewrite_spec(
    guest_dir: &str,
    rootfs: &Path,
    spec: &mut Value,
    mut stage: impl FnMut(&Path, &str, bool, bool) -> Result<()>,
) -> Result<()> {
    stage(rootfs, "rootfs", true, false)?;
    spec["root"]["path"] = format!("{guest_dir}/rootfs").into();
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
            if source.starts_with("/dev/shm") || m["destination"] == "/dev/shm" {
                // A host tmpfs (CRI's pod shm) cannot be shared with a VM:
                // the guest gets its own.
                *m = serde_json::json!({"destination": "/dev/shm", "type": "tmpfs",
                    "source": "shm", "options": GUEST_SHM_OPTIONS});
                continue;
            }
            let recursive = opts.iter().any(|o| o == "rbind");
            let ro = opts.iter().any(|o| o == "ro");
            let name = format!("m{i}");
            stage(&source, &name, recursive, ro)?;
            m["source"] = format!("{guest_dir}/{name}").into();
        }
    }
    Ok(())
}

/// Mount options of the guest's own /dev/shm when the spec binds the host's.
const GUEST_SHM_OPTIONS: [&str; 5] = ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"];

impl Staging {
    /// The container directory the staging is in.
    pub fn container_dir(&self) -> &Path {
        self.dir
            .parent()
            .expect("the staging dir is <container dir>/shared")
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

/// One bind staged in a tree: the name of its mount point and the fd of
/// the mount (see [`beneath::detach`]).
struct Bound {
    name: PathBuf,
    dir: bool,
    mount: OwnedFd,
}

/// Bind-mounts host `source` (directory or file) at `rel` in `tree`,
/// creating the mount point; all by file descriptor. `rel` may be changed by
/// the guest meanwhile: the mount lands on the object created (wherever in
/// the share the guest moved it) or fails.
fn bind(tree: &Tree, source: &Path, rel: &Path, recursive: bool, readonly: bool) -> Result<Bound> {
    let src = beneath::open_source(source).map_err(|e| ContainerError::io(source, e))?;
    let meta = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&src))
        .map_err(|e| mount_err("stat", source, e))?;
    let dir = nix::sys::stat::SFlag::from_bits_truncate(meta.st_mode)
        .contains(nix::sys::stat::SFlag::S_IFDIR);
    let target = if dir {
        tree.mkdir(rel, 0o755)
    } else {
        tree.create_file(rel, 0o644)
    }
    .map_err(ContainerError::Staging)?;
    let mount = beneath::bind_fd(src.as_fd(), target.as_fd(), recursive, readonly)
        .map_err(|e| mount_err("bind", source, e))?;
    Ok(Bound {
        name: rel.to_path_buf(),
        dir,
        mount,
    })
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
    cleanup_tree(&container_dir.join(STAGING_DIR))
}

/// Unmounts `dir` (a share's top: a host path, whose last component is
/// never followed) with everything mounted below it, then removes `dir` and
/// what is left in it without following links. If anything is still
/// mounted below `dir`, fails with [`ContainerError::StillMounted`] (or the
/// unmount's error) and removes nothing. Idempotent.
pub fn cleanup_tree(dir: &Path) -> Result<()> {
    let dir = dir.to_path_buf();
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(());
    }
    // Detach repeatedly: the staging dir may carry stacked mounts. Only
    // `dir` itself is unmounted by path: a path beneath it is the guest's to
    // change (a component swapped for a symlink would aim the unmount at a
    // host mount).
    for _ in 0..8 {
        if !has_mounts(&dir) {
            break;
        }
        match umount2(&dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(nix::Error::EINVAL) => break,
            Err(e) => return Err(mount_err("unmount staging dir", &dir, e)),
        }
    }
    if has_mounts(&dir) {
        return Err(ContainerError::StillMounted(dir.display().to_string()));
    }
    // Nothing is mounted below `dir` any more: whatever is left is ours or
    // the guest's junk in the tmpfs (remove_dir_all never follows links).
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ContainerError::io(&dir, e)),
    }
}

/// The staging share of a pod: one directory shared with the pod's VM, one
/// subdirectory per container, staged after the VM booted (see the module
/// docs).
pub struct PodShare {
    dir: PathBuf,
    tree: Tree,
    /// Each staged container's directory and binds, by id.
    staged: Mutex<HashMap<String, Staged>>,
}

/// A container staged in a [`PodShare`].
struct Staged {
    dir: Tree,
    bound: Vec<Bound>,
}

impl PodShare {
    /// Creates the share at `dir`: a size-limited tmpfs, a shared mount of
    /// its own peer group, so that binds staged later propagate into
    /// virtiofsd's mount namespace.
    pub fn create(dir: &Path) -> Result<PodShare> {
        std::fs::create_dir_all(dir).map_err(|e| ContainerError::io(dir, e))?;
        match mount_top(dir, true) {
            Ok(tree) => Ok(PodShare {
                dir: dir.to_path_buf(),
                tree,
                staged: Mutex::default(),
            }),
            Err(e) => {
                if let Err(c) = cleanup_tree(dir) {
                    log::warn!("cleanup after failed pod share: {c}");
                }
                Err(e)
            }
        }
    }

    /// The share for the VM.
    pub fn shared_dir(&self) -> SharedDir {
        SharedDir {
            tag: SHARE_TAG.into(),
            host_path: self.dir.clone(),
            read_only: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn staged(&self) -> MutexGuard<'_, HashMap<String, Staged>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stages container `id` (rootfs at `rootfs`) and rewrites `spec` to
    /// guest paths under `GUEST_SHARED/<id>`, race-free against the guest:
    /// `<id>` is created (or reused) beneath the share and everything is
    /// staged beneath its file descriptor. Undone on error.
    pub fn stage(&self, id: &str, rootfs: &Path, spec: &mut Value) -> Result<()> {
        super::validate_id(id)?;
        if self.staged().contains_key(id) {
            return Err(ContainerError::Exists(id.to_string()));
        }
        let dir = self
            .tree
            .mkdir(Path::new(id), 0o755)
            .map_err(ContainerError::Staging)?;
        let dir = Tree::from_dir(dir, self.dir.join(id));
        let mut bound = Vec::new();
        let res = fill(
            &dir,
            &format!("{GUEST_SHARED}/{id}"),
            rootfs,
            spec,
            &mut bound,
        );
        self.staged().insert(id.to_string(), Staged { dir, bound });
        if res.is_err() {
            if let Err(c) = self.unstage(id) {
                log::warn!("cleanup after failed staging of {id}: {c}");
            }
        }
        res
    }

    /// Unstages container `id`: detaches each of its binds by file
    /// descriptor (wherever the guest moved it), then removes the mount
    /// points made for it and its directory if they are empty, one name at
    /// a time (what the guest left there stays in the bounded tmpfs until
    /// [`PodShare::remove`]). A failed detach fails, keeps the container
    /// staged and removes nothing. Idempotent.
    pub fn unstage(&self, id: &str) -> Result<()> {
        super::validate_id(id)?;
        let Some(staged) = self.staged().remove(id) else {
            return Ok(());
        };
        for b in &staged.bound {
            if let Err(e) = beneath::detach(b.mount.as_fd()) {
                let path = staged.dir.path().join(&b.name);
                self.staged().insert(id.to_string(), staged);
                return Err(mount_err("unmount staged", &path, e));
            }
        }
        // The mount points first, then their directory (in this order: an
        // eager `chain` once tried the directory first, while it was full).
        let mut left: Vec<_> = staged
            .bound
            .iter()
            .filter_map(|b| staged.dir.remove(&b.name, b.dir).err())
            .collect();
        left.extend(self.tree.remove(Path::new(id), true).err());
        if !left.is_empty() {
            // The guest moved or added something: it stays in the bounded
            // tmpfs until the share is removed.
            log::debug!("unstaged {id}, not all removed: {left:?}");
        }
        Ok(())
    }

    /// Unmounts and removes the whole share (see [`cleanup_tree`]).
    /// The binds' fds are dropped once it is done.
    pub fn remove(&self) -> Result<()> {
        cleanup_tree(&self.dir)?;
        self.staged().clear();
        Ok(())
    }
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
        assert!(std::fs::write(staged.join("m1"), b"").is_err(), "ro bind");
        // The guest creates mount points in a read-only root before it
        // makes it read-only (see `fill`).
        std::fs::write(staged.join("rootfs/mountpoint"), b"").unwrap();
        std::fs::remove_file(rootfs.join("mountpoint")).unwrap();
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

    /// Stands in for virtiofsd: its own mount namespace, a slave of ours,
    /// with the share bound onto itself there, started before anything is
    /// staged. Returns it once its namespace is set up.
    fn virtiofsd_like(share: &Path) -> std::process::Child {
        let ready = share.with_extension("ready");
        let script = format!(
            "mount --rbind {0} {0} && touch {1} && exec sleep 600",
            share.display(),
            ready.display()
        );
        let child = std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sh", "-c", &script])
            .spawn()
            .unwrap();
        assert!(vessel_testutil::wait_until(
            std::time::Duration::from_secs(10),
            || ready.exists()
        ));
        child
    }

    #[test]
    fn binds_staged_after_the_vm_started_reach_virtiofsd_and_go_away() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for mounts");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (rootfs, data) = (d.path().join("rootfs"), d.path().join("data"));
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(rootfs.join("marker"), b"root").unwrap();
        std::fs::write(data.join("v"), b"volume").unwrap();
        let share = PodShare::create(&d.path().join("share")).unwrap();
        let mut ns = virtiofsd_like(share.path());
        // What the namespace sees at a path of ours.
        let seen = |rel: &str| {
            PathBuf::from(format!("/proc/{}/root", ns.id()))
                .join(share.path().strip_prefix("/").unwrap())
                .join(rel)
        };
        // A fresh spec for every stage: staging rewrites its sources.
        let spec = || {
            serde_json::json!({"root": {"path": "rootfs", "readonly": true},
            "mounts": [
            {"destination": "/v", "type": "bind", "source": data, "options": ["rbind", "ro"]}]})
        };
        let mut spec1 = spec();
        share.stage("c1", &rootfs, &mut spec1).unwrap();
        assert_eq!(spec1["root"]["path"], "/run/vessel/shared/c1/rootfs");
        assert_eq!(std::fs::read(seen("c1/rootfs/marker")).unwrap(), b"root");
        assert_eq!(std::fs::read(seen("c1/m0/v")).unwrap(), b"volume");
        let e = std::fs::write(seen("c1/m0/w"), b"").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "read-only there too");
        // The guest moves the container's directory: unstaging still
        // detaches its binds (by fd), in virtiofsd's namespace too.
        std::fs::rename(seen("c1"), seen("moved")).unwrap();
        share.unstage("c1").unwrap();
        assert!(!seen("moved/rootfs/marker").exists() && !seen("moved/m0/v").exists());
        assert!(!has_mounts(share.path().join("moved").as_path()));
        share.stage("c1", &rootfs, &mut spec()).unwrap();
        assert_eq!(std::fs::read(seen("c1/rootfs/marker")).unwrap(), b"root");
        share.unstage("c1").unwrap();
        assert!(
            !seen("c1").exists(),
            "unstaged in virtiofsd's namespace too"
        );
        assert!(!share.path().join("c1").exists());
        let _ = ns.kill();
        let _ = ns.wait();
        share.remove().unwrap();
        assert!(!has_mounts(d.path()) && !share.path().exists());
        assert_eq!(std::fs::read(data.join("v")).unwrap(), b"volume");
    }

    /// Drops CAP_SYS_ADMIN from the calling thread's effective set
    /// (capabilities are per thread): its unmounts fail with EPERM.
    fn drop_sys_admin_in_this_thread() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Default, Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_ADMIN: u32 = 21;
        let mut h = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut d = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and two data words, as the
        // kernel ABI requires; pid 0 is the calling thread.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
            d[0].effective &= !(1 << CAP_SYS_ADMIN);
            assert_eq!(libc::syscall(libc::SYS_capset, &h, d.as_ptr()), 0);
        }
    }

    #[test]
    fn a_failed_unmount_never_deletes_host_data() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for bind mounts");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (rootfs, data) = (d.path().join("rootfs"), d.path().join("data"));
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(data.join("sub")).unwrap();
        let files = [("a.txt", "alpha"), ("sub/b.txt", "beta")];
        for (name, text) in files {
            std::fs::write(data.join(name), text).unwrap();
        }
        let all_there = || {
            files
                .iter()
                .all(|(n, t)| std::fs::read_to_string(data.join(n)).ok().as_deref() == Some(*t))
        };
        let share = PodShare::create(&d.path().join("share")).unwrap();
        let mut spec = serde_json::json!({"root": {"path": "rootfs"}, "mounts": [
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}]});
        share.stage("c1", &rootfs, &mut spec).unwrap();
        assert_eq!(spec["mounts"][0]["source"], "/run/vessel/shared/c1/m0");
        let staged = share.path().join("c1/m0");
        assert_eq!(
            std::fs::read_to_string(staged.join("a.txt")).unwrap(),
            "alpha"
        );
        // Keep the staged mount busy: a host process with its cwd inside it
        // and an open fd on one of the host files.
        let mut busy = std::process::Command::new("/bin/sh")
            .args(["-c", "exec 3<a.txt; exec sleep 600"])
            .current_dir(&staged)
            .spawn()
            .unwrap();

        // The unmounts fail (no CAP_SYS_ADMIN): an error naming the
        // container, nothing removed, the host files all there.
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                drop_sys_admin_in_this_thread();
                let unstage = share.unstage("c1").unwrap_err();
                (unstage, share.remove().unwrap_err())
            })
            .join()
            .unwrap()
        });
        assert!(e.0.to_string().contains("c1"), "{}", e.0);
        assert!(e.1.to_string().contains("share"), "{}", e.1);
        assert!(all_there(), "host files lost after a failed unmount");
        assert!(has_mounts(&staged), "the staging is left in place");

        // With the right to unmount, the busy mount is detached and the
        // staging removed; the host files are still all there.
        share.unstage("c1").unwrap();
        assert!(!share.path().join("c1").exists());
        assert!(all_there(), "host files lost after unstaging a busy mount");
        share.remove().unwrap();
        assert!(!has_mounts(d.path()) && !share.path().exists());
        let _ = busy.kill();
        let _ = busy.wait();
        assert!(all_there());
    }
}
