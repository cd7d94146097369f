//! Race-free file system operations inside a tree that someone else may
//! write at the same time: the guest, through its virtio-fs share.
//!
//! A [`Tree`] holds an `O_PATH` fd of its root. Every lookup below it is one
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` (no `..` escape, no
//! symlink and no magic link followed, in any component), directories are
//! created with `mkdirat` on the fd of their parent and opened again the same
//! way, and mounts are placed on a file descriptor with the new mount API
//! (`open_tree` + `mount_setattr` + `move_mount`), never on a path resolved
//! again later. A guest that swaps a component for a symlink between two
//! steps makes the operation fail, or at worst land on the directory it
//! moved, which is still inside the tree (a rename cannot leave a mount).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Errors of operations beneath a tree.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BeneathError {
    /// {path:?} is not a plain relative path beneath {root} (no "..", ".", or leading "/")
    BadPath { root: String, path: String },
    /// cannot {op} {path:?} beneath {root}: {errno}
    Op {
        op: &'static str,
        root: String,
        path: String,
        errno: Errno,
    },
}

pub type Result<T> = std::result::Result<T, BeneathError>;

/// A directory tree whose contents may change under us; see the module docs.
#[derive(Debug)]
pub struct Tree {
    root: OwnedFd,
    path: PathBuf,
}

const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

// The new mount API (linux/mount.h); not in the libc crate.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

impl Tree {
    /// Opens the tree rooted at `path`. `path` itself is trusted (host
    /// state), but its last component must not be a symlink.
    pub fn open(path: &Path) -> Result<Tree> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| Self::err_at(path, "open", Path::new(""), errno))?;
        Ok(Tree {
            // SAFETY: open(2) just returned this fd and nothing else owns it.
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
        })
    }

    /// The tree rooted at `dir`, an `O_PATH` directory fd from
    /// [`Tree::mkdir`] of another tree; `path` is where it was made, for
    /// messages (the guest may move it: lookups stay beneath the fd).
    pub fn from_dir(dir: OwnedFd, path: PathBuf) -> Tree {
        Tree { root: dir, path }
    }

    /// Removes the empty directory or the file `name` (one component) of
    /// the root, never following a link and never recursing: what the guest
    /// put there or moved in stays (a mount point fails with EBUSY).
    pub fn remove(&self, name: &Path, dir: bool) -> Result<()> {
        self.check(name)?;
        if name.components().count() != 1 {
            return Err(BeneathError::BadPath {
                root: self.path.display().to_string(),
                path: name.display().to_string(),
            });
        }
        let how = if dir {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(Some(self.root.as_raw_fd()), name, how)
            .map_err(|e| self.err("remove", name, e))
    }

    /// The host path the tree was opened at (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root's fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    fn err_at(root: &Path, op: &'static str, path: &Path, errno: Errno) -> BeneathError {
        BeneathError::Op {
            op,
            root: root.display().to_string(),
            path: path.display().to_string(),
            errno,
        }
    }

    fn err(&self, op: &'static str, path: &Path, errno: Errno) -> BeneathError {
        Self::err_at(&self.path, op, path, errno)
    }

    /// Refuses anything but `name/name/...` (openat2 would refuse escapes
    /// too; this gives a clear error before touching the tree).
    fn check(&self, rel: &Path) -> Result<()> {
        let plain = rel.components().next().is_some()
            && rel.components().all(|c| matches!(c, Component::Normal(_)))
            && !rel.as_os_str().as_encoded_bytes().contains(&b'\0');
        if plain {
            Ok(())
        } else {
            Err(BeneathError::BadPath {
                root: self.path.display().to_string(),
                path: rel.display().to_string(),
            })
        }
    }

    /// openat2 beneath `dir`. With `O_PATH | O_NOFOLLOW` the kernel hands
    /// out an fd of a trailing symlink itself: that is refused here (ELOOP).
    fn openat2(
        &self,
        dir: BorrowedFd,
        rel: &Path,
        flags: OFlag,
        mode: Mode,
    ) -> nix::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .mode(mode)
            .resolve(RESOLVE);
        let fd = nix::fcntl::openat2(dir.as_raw_fd(), rel, how)?;
        // SAFETY: openat2(2) just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let kind = file_type(fd.as_fd())?;
        if kind == SFlag::S_IFLNK {
            return Err(Errno::ELOOP);
        }
        if flags.contains(OFlag::O_DIRECTORY) && kind != SFlag::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        Ok(fd)
    }

    /// Opens `rel` beneath the root with `flags` (`O_NOFOLLOW` and
    /// `O_CLOEXEC` are added; no component may be a symlink).
    pub fn open_at(&self, rel: &Path, flags: OFlag) -> Result<OwnedFd> {
        self.check(rel)?;
        self.openat2(self.fd(), rel, flags, Mode::empty())
            .map_err(|e| self.err("open", rel, e))
    }

    /// The parent's fd (opened beneath the root) and the last component.
    fn parent(&self, rel: &Path) -> Result<(OwnedFd, PathBuf)> {
        self.check(rel)?;
        let name = PathBuf::from(rel.file_name().unwrap_or_default());
        let dir = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => self.open_at(p, OFlag::O_PATH | OFlag::O_DIRECTORY)?,
            None => self.root.try_clone().map_err(|e| {
                self.err(
                    "dup root of",
                    rel,
                    Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                )
            })?,
        };
        Ok((dir, name))
    }

    /// Creates directory `rel` (its parent must exist) and returns an
    /// `O_PATH` fd of it. An existing directory is reused; an existing
    /// symlink or file fails.
    pub fn mkdir(&self, rel: &Path, mode: u32) -> Result<OwnedFd> {
        let (dir, name) = self.parent(rel)?;
        match nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), &name, Mode::from_bits_truncate(mode))
        {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(self.err("create directory", rel, e)),
        }
        self.openat2(
            dir.as_fd(),
            &name,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| self.err("open directory", rel, e))
    }

    /// [`Tree::mkdir`] of every component of `rel`.
    pub fn mkdir_all(&self, rel: &Path, mode: u32) -> Result<OwnedFd> {
        self.check(rel)?;
        let mut at = PathBuf::new();
        let mut last = None;
        for c in rel.components() {
            at.push(c);
            last = Some(self.mkdir(&at, mode)?);
        }
        Ok(last.expect("check() refuses an empty path"))
    }

    /// Creates (or opens) the regular file `rel` as a mount point and
    /// returns a write-only fd of it. A symlink or anything but a regular
    /// file at `rel` fails.
    pub fn create_file(&self, rel: &Path, mode: u32) -> Result<OwnedFd> {
        let (dir, name) = self.parent(rel)?;
        let f = self
            .openat2(
                dir.as_fd(),
                &name,
                // O_NONBLOCK: a FIFO planted by the guest fails (ENXIO), never blocks us.
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NONBLOCK,
                Mode::from_bits_truncate(mode),
            )
            .map_err(|e| self.err("create file", rel, e))?;
        if file_type(f.as_fd()) != Ok(SFlag::S_IFREG) {
            return Err(self.err("create file", rel, Errno::EEXIST));
        }
        Ok(f)
    }
}

/// The type bits of what `fd` refers to.
fn file_type(fd: BorrowedFd) -> nix::Result<SFlag> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
}

/// Opens a host path (trusted: the bundle's rootfs or a bind-mount source)
/// once, as `O_PATH`, so that what is checked is what gets mounted.
pub fn open_source(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: open(2) just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bind-mounts `source` onto `target` (a directory or file fd, typically
/// from [`Tree::mkdir`] / [`Tree::create_file`]), all by file descriptor:
/// the copy of `source` (with its submounts if `recursive`) is made
/// read-only BEFORE it is attached when `readonly`. Returns an fd of the
/// new mount's root, for [`detach`].
///
/// Attached under a shared mount (a pod's share), the new mount propagates
/// like one made by mount(2), into virtiofsd's mount namespace too, with the
/// attributes it had when attached (later changes of them would not
/// propagate).
pub fn bind_fd(
    source: BorrowedFd,
    target: BorrowedFd,
    recursive: bool,
    readonly: bool,
) -> nix::Result<OwnedFd> {
    let empty = CString::default();
    let mut flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree(2) with a valid fd, an empty C string and flags; it
    // returns a new fd or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.as_raw_fd(),
            empty.as_ptr(),
            flags,
        )
    };
    let tree = Errno::result(tree)?;
    // SAFETY: open_tree(2) just returned this fd and nothing else owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    if readonly {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let at = libc::AT_EMPTY_PATH as libc::c_uint | if recursive { AT_RECURSIVE } else { 0 };
        // SAFETY: mount_setattr(2) reads `attr` (of the size passed) during
        // the call; the fd and the empty string are valid.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                at,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        Errno::result(rc)?;
    }
    // SAFETY: move_mount(2) with two valid fds and empty C strings.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(rc)?;
    Ok(tree)
}

/// Detaches the mount whose root `mount` is (from [`bind_fd`]) with every
/// mount below it (`MNT_DETACH`), by file descriptor: wherever the guest
/// moved its mount point, and never anything else. A mount that is no
/// longer attached is done.
pub fn detach(mount: BorrowedFd) -> nix::Result<()> {
    match nix::mount::umount2(&fd_path(mount), nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `/proc/self/fd/<fd>`: the exact object `fd` refers to, for the classic
/// mount(2) calls that take a path.
pub fn fd_path(fd: BorrowedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> (tempfile::TempDir, Tree) {
        let d = tempfile::tempdir().unwrap();
        let t = Tree::open(d.path()).unwrap();
        (d, t)
    }

    #[test]
    fn dot_dot_and_absolute_paths_are_refused() {
        let (_d, t) = tree();
        for bad in ["../x", "a/../../x", "/etc", "", ".", "./a"] {
            let e = t.mkdir(Path::new(bad), 0o755).unwrap_err();
            assert!(matches!(e, BeneathError::BadPath { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn a_symlink_anywhere_in_the_path_is_refused() {
        let (d, t) = tree();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), d.path().join("link")).unwrap();
        symlink("a", d.path().join("rel")).unwrap();
        std::fs::create_dir(d.path().join("a")).unwrap();
        for rel in ["link/x", "link", "rel/x", "rel"] {
            assert!(t.mkdir(Path::new(rel), 0o755).is_err(), "{rel}");
            assert!(t.create_file(Path::new(rel), 0o644).is_err(), "{rel}");
            assert!(t.open_at(Path::new(rel), OFlag::O_PATH).is_err(), "{rel}");
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A symlink to a directory inside the tree is refused just the same.
        assert!(t.mkdir_all(Path::new("rel/b/c"), 0o755).is_err());
        assert!(!d.path().join("a/b").exists());
    }

    #[test]
    fn directories_and_files_are_created_beneath() {
        let (d, t) = tree();
        t.mkdir_all(Path::new("x/y/z"), 0o700).unwrap();
        assert!(d.path().join("x/y/z").is_dir());
        t.mkdir(Path::new("x"), 0o700).unwrap(); // exists: reused
        t.create_file(Path::new("x/f"), 0o600).unwrap();
        assert!(d.path().join("x/f").is_file());
        assert!(
            t.mkdir(Path::new("x/f"), 0o700).is_err(),
            "a file is no directory"
        );
        // A FIFO planted where a file mount point goes fails at once.
        nix::unistd::mkfifo(&d.path().join("fifo"), Mode::S_IRWXU).unwrap();
        assert!(t.create_file(Path::new("fifo"), 0o600).is_err());
    }

    #[test]
    fn bind_by_fd_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root for mounts");
            return;
        }
        let (d, t) = tree();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("hello"), b"hi").unwrap();
        let target = t.mkdir(Path::new("m"), 0o755).unwrap();
        let s = open_source(src.path()).unwrap();
        let mount = bind_fd(s.as_fd(), target.as_fd(), false, true).unwrap();
        let m = d.path().join("m");
        assert_eq!(std::fs::read(m.join("hello")).unwrap(), b"hi");
        assert!(
            std::fs::write(m.join("new"), b"").is_err(),
            "read-only bind"
        );
        // Moved away, it is still detached by its fd, and only it.
        std::fs::rename(&m, d.path().join("moved")).unwrap_err(); // a mount point
        detach(mount.as_fd()).unwrap();
        assert!(!d.path().join("m/hello").exists());
        detach(mount.as_fd()).unwrap(); // done already
        t.remove(Path::new("m"), true).unwrap();
        assert!(!m.exists());
    }

    #[test]
    fn remove_never_recurses_or_follows() {
        let (d, t) = tree();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        symlink(outside.path(), d.path().join("link")).unwrap();
        std::fs::create_dir_all(d.path().join("full/x")).unwrap();
        t.remove(Path::new("link"), false).unwrap();
        assert!(outside.path().join("keep").exists());
        assert!(t.remove(Path::new("full"), true).is_err());
        assert!(d.path().join("full/x").is_dir());
        assert!(
            t.remove(Path::new("full/x"), true).is_err(),
            "one component"
        );
    }
}
