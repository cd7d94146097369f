//! Rootfs and bind-mount sources reach the guest through ONE virtio-fs share
//! per sandbox, into which the bundle rootfs and every host bind-mount source
//! are bind-mounted (files as files). config.json paths are rewritten to the
//! guest paths under [`GUEST_SHARED`].
//!
//! - A `vessel` container (a pod of one) stages before its VM boots:
//!   [`Staging::prepare`] uses `<root>/<id>/shared/`, a private bind mount of
//!   itself.
//! - A pod stages each container after its VM booted: [`PodShare`] is a
//!   shared bind mount of itself (so later mounts propagate to virtiofsd) and
//!   each container gets `<share>/<container id>/`, seen by the guest under
//!   `GUEST_SHARED/<container id>/`.
//!
//! The guest is hostile and writes the share:
//! - The top of a [`Staging`] share is a small tmpfs ([`TOP_TMPFS_OPTIONS`]),
//!   not host state: what the guest writes beside the rootfs is bounded, and
//!   it all goes away with one unmount. The writable parts are the
//!   container's own rootfs and bind sources, as with runc.
//! - Every host-side step inside a [`Staging`] share is race-free
//!   ([`crate::beneath`]): mount points are created and opened beneath the
//!   share's root without following symlinks, and binds are placed on those
//!   file descriptors (`open_tree` + `move_mount`), never on a path resolved
//!   again.
//! - Known gap: a [`PodShare`] (staged after its VM booted, through mount
//!   propagation into virtiofsd) still binds by path on a self-bind top;
//!   binds attached with `move_mount` did not reach virtiofsd there.
//!
//! Cleanup ([`cleanup_tree`]) detaches the staging tree with
//! `umount2(MNT_DETACH)`, checks that nothing is mounted below it any more and
//! only then removes what is left (never following a link): a failed unmount
//! can never delete host data or container data, and nothing the guest left
//! in the tmpfs can stop a delete.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

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

/// Mounts the share's top on `dir` (which exists): a size-limited private
/// tmpfs. Returns its root for race-free work beneath it.
fn mount_top(dir: &Path) -> Result<Tree> {
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
    Ok(tree)
}

impl Staging {
    /// Builds the staging tree for `spec` (rootfs at `rootfs`) and rewrites
    /// `spec` to guest paths. Everything is undone on error.
    pub fn prepare(container_dir: &Path, rootfs: &Path, spec: &mut Value) -> Result<Staging> {
        let staging = Staging::create(&container_dir.join(STAGING_DIR))?;
        match fill(&staging.tree, Path::new(""), GUEST_SHARED, rootfs, spec) {
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
        match mount_top(dir) {
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
        bind(&self.tree, source, rel, recursive, readonly)
    }
}

/// Stages `rootfs` and the bind sources of `spec` in `sub` of `tree` (which
/// exists; empty: the top) and rewrites `spec` to their guest paths under
/// `guest_dir`.
fn fill(tree: &Tree, sub: &Path, guest_dir: &str, rootfs: &Path, spec: &mut Value) -> Result<()> {
    rewrite_spec(
        guest_dir,
        rootfs,
        spec,
        |source, name, recursive, readonly| {
            bind(tree, source, &sub.join(name), recursive, readonly)
        },
    )
}

/// Rewrites `spec`'s root and bind mounts to guest paths under `guest_dir`,
/// staging each source (the rootfs as `rootfs`, mount `i` as `m<i>`) with
/// `stage(source, name, recursive, readonly)`; a bind of the host's /dev/shm
/// becomes the guest's own tmpfs.
fn rewrite_spec(
    guest_dir: &str,
    rootfs: &Path,
    spec: &mut Value,
    mut stage: impl FnMut(&Path, &str, bool, bool) -> Result<()>,
) -> Result<()> {
    let readonly = spec["root"]["readonly"].as_bool().unwrap_or(false);
    stage(rootfs, "rootfs", true, readonly)?;
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

/// Bind-mounts host `source` (directory or file) at `rel` in `tree`,
/// creating the mount point; all by file descriptor. `rel` may be changed by
/// the guest meanwhile: the mount lands on the object created (wherever in
/// the share the guest moved it) or fails.
fn bind(tree: &Tree, source: &Path, rel: &Path, recursive: bool, readonly: bool) -> Result<()> {
    let src = beneath::open_source(source).map_err(|e| ContainerError::io(source, e))?;
    let meta = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&src))
        .map_err(|e| mount_err("stat", source, e))?;
    let is_dir = nix::sys::stat::SFlag::from_bits_truncate(meta.st_mode)
        .contains(nix::sys::stat::SFlag::S_IFDIR);
    let target = if is_dir {
        tree.mkdir(rel, 0o755)
    } else {
        tree.create_file(rel, 0o644)
    }
    .map_err(ContainerError::Staging)?;
    beneath::bind_fd(src.as_fd(), target.as_fd(), recursive, readonly)
        .map_err(|e| mount_err("bind", source, e))
}

/// Binds `dir` onto itself and makes it private; `shared`: then a shared
/// mount of its own peer group (not a peer of the host's mounts).
fn self_bind(dir: &Path, shared: bool) -> Result<()> {
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| mount_err("bind staging dir", dir, e))?;
    let mut steps = vec![MsFlags::MS_PRIVATE];
    if shared {
        steps.push(MsFlags::MS_SHARED);
    }
    for propagation in steps {
        mount(None::<&str>, dir, None::<&str>, propagation, None::<&str>)
            .map_err(|e| mount_err("set propagation of staging dir", dir, e))?;
    }
    Ok(())
}

/// [`fill`] by path, for a pod's share. Known gap (issue 12): pods stage
/// after the VM booted, so these path-based steps race with the guest; the
/// fd-based binds do not propagate to virtiofsd's mount namespace yet.
fn fill_path(dir: &Path, guest_dir: &str, rootfs: &Path, spec: &mut Value) -> Result<()> {
    rewrite_spec(
        guest_dir,
        rootfs,
        spec,
        |source, name, recursive, readonly| bind_path(source, &dir.join(name), recursive, readonly),
    )
}

/// Bind-mounts `source` (directory or file) at `target`, creating `target`.
fn bind_path(source: &Path, target: &Path, recursive: bool, readonly: bool) -> Result<()> {
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
    cleanup_tree(&container_dir.join(STAGING_DIR))
}

/// Unmounts everything at or below `dir`, then removes `dir` and what is
/// left in it (the underlying directory, or a container's directory in a pod
/// share's tmpfs) without following links. If anything is still mounted,
/// fails with [`ContainerError::StillMounted`] (or the unmount's error) and
/// removes nothing. Idempotent.
pub fn cleanup_tree(dir: &Path) -> Result<()> {
    let dir = dir.to_path_buf();
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(());
    }
    // Detach repeatedly: the staging dir may carry stacked mounts.
    for _ in 0..8 {
        if !has_mounts(&dir) {
            break;
        }
        match umount2(&dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {}
            Err(nix::Error::EINVAL) => {
                // Not a mount point itself: detach what is below it.
                for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let _ = umount2(&e.path(), MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
                }
            }
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
/// subdirectory per container, staged after the VM booted.
pub struct PodShare {
    dir: PathBuf,
}

impl PodShare {
    /// Creates `dir` as a shared bind mount of itself, so that mounts staged
    /// later propagate into virtiofsd's mount namespace.
    pub fn create(dir: &Path) -> Result<PodShare> {
        std::fs::create_dir_all(dir).map_err(|e| ContainerError::io(dir, e))?;
        let share = PodShare {
            dir: dir.to_path_buf(),
        };
        if let Err(e) = self_bind(dir, true) {
            if let Err(c) = cleanup_tree(dir) {
                log::warn!("cleanup after failed pod share: {c}");
            }
            return Err(e);
        }
        Ok(share)
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

    /// Stages container `id` (rootfs at `rootfs`) and rewrites `spec` to
    /// guest paths under `GUEST_SHARED/<id>`. Undone on error.
    pub fn stage(&self, id: &str, rootfs: &Path, spec: &mut Value) -> Result<()> {
        super::validate_id(id)?;
        let dir = self.dir.join(id);
        std::fs::create_dir(&dir).map_err(|e| ContainerError::io(&dir, e))?;
        let res = fill_path(&dir, &format!("{GUEST_SHARED}/{id}"), rootfs, spec);
        if res.is_err() {
            if let Err(c) = cleanup_tree(&dir) {
                log::warn!("cleanup after failed staging of {id}: {c}");
            }
        }
        res
    }

    /// Unstages container `id` (see [`cleanup_tree`]). Idempotent.
    pub fn unstage(&self, id: &str) -> Result<()> {
        super::validate_id(id)?;
        cleanup_tree(&self.dir.join(id))
    }

    /// Unmounts and removes the whole share (see [`cleanup_tree`]).
    pub fn remove(&self) -> Result<()> {
        cleanup_tree(&self.dir)
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

        // The unmount fails (no CAP_SYS_ADMIN): an error naming the tree,
        // nothing removed, the host files all there.
        let share_dir = share.path().to_path_buf();
        let e = std::thread::spawn(move || {
            drop_sys_admin_in_this_thread();
            cleanup_tree(&share_dir.join("c1"))
        })
        .join()
        .unwrap()
        .unwrap_err();
        assert!(e.to_string().contains("c1"), "{e}");
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
