//! Applies image layers (tar streams) to a root file system, with OCI
//! whiteouts, against hostile archives.
//!
//! Every entry is written through the file descriptor of its parent
//! directory, which is opened with `openat2(RESOLVE_IN_ROOT)`: symlinks in
//! the parent path are resolved as if the rootfs were `/` (an image may
//! have `bin -> usr/bin` in one layer and `bin/sh` in the next), so nothing
//! resolves outside it. The last component is never followed (`*at` calls
//! with `AT_SYMLINK_NOFOLLOW`, `O_NOFOLLOW`). Absolute names and `..` are
//! refused, hard links resolve beneath the rootfs too, device nodes are
//! skipped (the rootfs reaches the VM through virtio-fs, whose daemon opens
//! files on the host), and the unpacked size and entry count are capped.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use super::ImageError;

/// Prefix of a whiteout entry: `.wh.NAME` deletes NAME of lower layers.
const WHITEOUT: &str = ".wh.";
/// Opaque whiteout: the directory holding it hides everything of lower layers.
const OPAQUE: &str = ".wh..wh..opq";

/// Caps on what one image may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of regular file contents over all layers.
    pub max_bytes: u64,
    /// Entries over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 32 << 30,
            max_entries: 2_000_000,
        }
    }
}

/// The rootfs being filled, layer after layer.
pub struct Rootfs<'a> {
    root: OwnedFd,
    path: PathBuf,
    limits: Limits,
    bytes: u64,
    entries: u64,
    cancel: &'a AtomicBool,
}

/// Layer media types, by compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type.
    pub fn from_media_type(media_type: &str) -> Result<Compression, ImageError> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Ok(Compression::Zstd)
            }
            other => Err(ImageError::LayerMediaType(other.to_string())),
        }
    }

    /// `r` decompressed.
    pub fn reader<'r>(self, r: impl Read + 'r) -> Result<Box<dyn Read + 'r>, ImageError> {
        Ok(match self {
            Compression::None => Box::new(r),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Compression::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(r)
                    .map_err(|e| ImageError::Zstd(e.to_string()))?,
            ),
        })
    }
}

/// What an archive entry turns into.
enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    Hardlink(PathBuf),
    Fifo,
}

impl<'a> Rootfs<'a> {
    /// Opens the (existing, trusted) directory `path` to unpack into.
    pub fn open(
        path: &Path,
        limits: Limits,
        cancel: &'a AtomicBool,
    ) -> Result<Rootfs<'a>, ImageError> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ImageError::Unpack {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(Rootfs {
            // SAFETY: open(2) just returned this fd and nothing else owns it.
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            path: path.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            cancel,
        })
    }

    /// Applies one layer's (decompressed) tar stream.
    pub fn apply(&mut self, layer: impl Read) -> Result<(), ImageError> {
        let mut archive = tar::Archive::new(layer);
        // Paths this layer wrote: an opaque whiteout hides lower layers only.
        let mut written: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(ImageError::Tar)? {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ImageError::Cancelled);
            }
            let mut entry = entry.map_err(ImageError::Tar)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(ImageError::TooBig(format!(
                    "more than {} entries",
                    self.limits.max_entries
                )));
            }
            let raw = entry.path_bytes().into_owned();
            let Some(rel) = clean(&raw)? else { continue };
            let name = rel.file_name().unwrap_or_default().as_bytes();
            if name == OPAQUE.as_bytes() {
                let dir = rel.parent().unwrap_or(Path::new(""));
                self.opaque(dir, &written)?;
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT.as_bytes()) {
                let parent = rel.parent().unwrap_or(Path::new(""));
                self.whiteout(&parent.join(OsStr::from_bytes(hidden)))?;
                continue;
            }
            let header = entry.header();
            let entry_type = header.entry_type();
            let mode = header.mode().map_err(ImageError::Tar)? & 0o7777;
            let uid = header.uid().map_err(ImageError::Tar)?;
            let gid = header.gid().map_err(ImageError::Tar)?;
            let mtime = header.mtime().unwrap_or(0);
            let kind = match entry_type {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Symlink => Kind::Symlink(link_name(&entry)?),
                tar::EntryType::Link => {
                    let target = link_name(&entry)?;
                    match clean(target.as_os_str().as_bytes())? {
                        Some(t) => Kind::Hardlink(t),
                        None => return Err(self.bad(&rel, "hard link to the root")),
                    }
                }
                tar::EntryType::Fifo => Kind::Fifo,
                tar::EntryType::Char | tar::EntryType::Block => {
                    log::warn!(
                        "image entry {}: device node skipped (the guest's /dev is its own)",
                        rel.display()
                    );
                    continue;
                }
                // PAX and GNU long-name headers are consumed by the tar crate.
                other => {
                    log::warn!("image entry {}: type {other:?} skipped", rel.display());
                    continue;
                }
            };
            let (parent, leaf) = self.parent(&rel)?;
            match kind {
                Kind::Dir => match stat_at(parent.as_fd(), &leaf) {
                    Some(k) if k == SFlag::S_IFDIR => {}
                    Some(_) => {
                        self.remove_at(parent.as_fd(), &leaf, &rel)?;
                        self.mkdir_at(parent.as_fd(), &leaf, &rel)?;
                    }
                    None => self.mkdir_at(parent.as_fd(), &leaf, &rel)?,
                },
                Kind::File => {
                    self.replace(parent.as_fd(), &leaf, &rel)?;
                    let fd = nix::fcntl::openat(
                        Some(parent.as_raw_fd()),
                        leaf.as_path(),
                        OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_WRONLY
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .map_err(|e| self.io(&rel, e))?;
                    // SAFETY: openat(2) just returned this fd and nothing else owns it.
                    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                    let budget = self.limits.max_bytes - self.bytes;
                    let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut file).map_err(
                        |e| ImageError::Unpack {
                            path: rel.display().to_string(),
                            source: e,
                        },
                    )?;
                    if n > budget {
                        return Err(ImageError::TooBig(format!(
                            "more than {} bytes of files",
                            self.limits.max_bytes
                        )));
                    }
                    self.bytes += n;
                }
                Kind::Symlink(target) => {
                    self.replace(parent.as_fd(), &leaf, &rel)?;
                    nix::unistd::symlinkat(&target, Some(parent.as_raw_fd()), leaf.as_path())
                        .map_err(|e| self.io(&rel, e))?;
                }
                Kind::Hardlink(target) => {
                    let (tparent, tleaf) = self.parent(&target)?;
                    self.replace(parent.as_fd(), &leaf, &rel)?;
                    // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    nix::unistd::linkat(
                        Some(tparent.as_raw_fd()),
                        tleaf.as_path(),
                        Some(parent.as_raw_fd()),
                        leaf.as_path(),
                        AtFlags::empty(),
                    )
                    .map_err(|e| self.io(&rel, e))?;
                    written.insert(rel);
                    continue;
                }
                Kind::Fifo => {
                    self.replace(parent.as_fd(), &leaf, &rel)?;
                    nix::sys::stat::mknodat(
                        Some(parent.as_raw_fd()),
                        leaf.as_path(),
                        SFlag::S_IFIFO,
                        Mode::from_bits_truncate(0o600),
                        0,
                    )
                    .map_err(|e| self.io(&rel, e))?;
                }
            }
            let is_link = matches!(entry_type, tar::EntryType::Symlink);
            self.set_attrs(parent.as_fd(), &leaf, &rel, is_link, mode, uid, gid, mtime)?;
            written.insert(rel);
        }
        Ok(())
    }

    fn io(&self, rel: &Path, e: Errno) -> ImageError {
        ImageError::Unpack {
            path: rel.display().to_string(),
            source: e.into(),
        }
    }

    fn bad(&self, rel: &Path, why: &str) -> ImageError {
        ImageError::BadEntry {
            path: rel.display().to_string(),
            reason: why.to_string(),
        }
    }

    /// The fd of `rel`'s parent directory (symlinks resolved inside the
    /// rootfs) and its last component.
    fn parent(&self, rel: &Path) -> Result<(OwnedFd, PathBuf), ImageError> {
        let leaf = PathBuf::from(rel.file_name().unwrap_or_default());
        let dir = rel.parent().unwrap_or(Path::new(""));
        Ok((self.open_dir(dir).map_err(|e| self.io(rel, e))?, leaf))
    }

    /// Opens directory `rel` (empty: the root) with `RESOLVE_IN_ROOT`.
    fn open_dir(&self, rel: &Path) -> nix::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = nix::fcntl::openat2(self.root.as_raw_fd(), rel, how)?;
        // SAFETY: openat2(2) just returned this fd and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn mkdir_at(&self, dir: BorrowedFd, leaf: &Path, rel: &Path) -> Result<(), ImageError> {
        nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), leaf, Mode::from_bits_truncate(0o700))
            .map_err(|e| self.io(rel, e))
    }

    /// Makes room for a non-directory at `leaf`: whatever is there goes.
    fn replace(&self, dir: BorrowedFd, leaf: &Path, rel: &Path) -> Result<(), ImageError> {
        if stat_at(dir, leaf).is_some() {
            self.remove_at(dir, leaf, rel)?;
        }
        Ok(())
    }

    /// Removes `leaf` of `dir`, recursively, never following a symlink.
    fn remove_at(&self, dir: BorrowedFd, leaf: &Path, rel: &Path) -> Result<(), ImageError> {
        remove_all_at(dir, leaf).map_err(|e| self.io(rel, e))
    }

    /// `.wh.NAME`: NAME of the lower layers goes (absent is fine).
    fn whiteout(&self, rel: &Path) -> Result<(), ImageError> {
        let Ok((parent, leaf)) = self.parent(rel) else {
            return Ok(());
        };
        if stat_at(parent.as_fd(), &leaf).is_some() {
            self.remove_at(parent.as_fd(), &leaf, rel)?;
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: what lower layers put in `dir` goes; what
    /// this layer wrote there stays.
    fn opaque(&self, dir: &Path, written: &HashSet<PathBuf>) -> Result<(), ImageError> {
        let Ok(fd) = self.open_dir(dir) else {
            return Ok(());
        };
        for name in list_dir(fd.as_fd()).map_err(|e| self.io(dir, e))? {
            let leaf = PathBuf::from(OsStr::from_bytes(&name));
            if !written.contains(&dir.join(&leaf)) {
                self.remove_at(fd.as_fd(), &leaf, &dir.join(&leaf))?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn set_attrs(
        &self,
        dir: BorrowedFd,
        leaf: &Path,
        rel: &Path,
        is_link: bool,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), ImageError> {
        let id = |v: u64| u32::try_from(v).map_err(|_| self.bad(rel, "uid or gid out of range"));
        nix::unistd::fchownat(
            Some(dir.as_raw_fd()),
            leaf,
            Some(Uid::from_raw(id(uid)?)),
            Some(Gid::from_raw(id(gid)?)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| self.io(rel, e))?;
        if !is_link {
            // After chown, which clears set-id bits.
            nix::sys::stat::fchmodat(
                Some(dir.as_raw_fd()),
                leaf,
                Mode::from_bits_truncate(mode),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| self.io(rel, e))?;
        }
        let t = nix::sys::time::TimeSpec::new(mtime.min(i64::MAX as u64) as i64, 0);
        nix::sys::stat::utimensat(
            Some(dir.as_raw_fd()),
            leaf,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| self.io(rel, e))
    }

    /// The rootfs path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A tar entry's link target.
fn link_name<R: Read>(entry: &tar::Entry<R>) -> Result<PathBuf, ImageError> {
    entry
        .link_name()
        .map_err(ImageError::Tar)?
        .map(|p| p.into_owned())
        .ok_or_else(|| ImageError::BadEntry {
            path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
            reason: "link without a target".into(),
        })
}

/// An archive name as a plain relative path: `./` and trailing `/` dropped,
/// `None` for the root itself; absolute names and `..` are refused.
pub fn clean(raw: &[u8]) -> Result<Option<PathBuf>, ImageError> {
    let bad = |why: &str| ImageError::BadEntry {
        path: String::from_utf8_lossy(raw).into_owned(),
        reason: why.to_string(),
    };
    if raw.contains(&0) {
        return Err(bad("NUL in name"));
    }
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err(bad("absolute name")),
            Component::ParentDir => return Err(bad("\"..\" in name")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// The type of `leaf` in `dir` (not following a symlink), if it exists.
fn stat_at(dir: BorrowedFd, leaf: &Path) -> Option<SFlag> {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), leaf, AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
}

/// Names in directory `dir` (an `O_PATH` fd), without `.` and `..`.
/// Read through the fd's /proc link, which is the directory itself.
fn list_dir(dir: BorrowedFd) -> nix::Result<Vec<Vec<u8>>> {
    let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
    std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(errno)?
        .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()).map_err(errno))
        .collect()
}

/// `rm -rf dir/leaf` without following any symlink.
fn remove_all_at(dir: BorrowedFd, leaf: &Path) -> nix::Result<()> {
    if stat_at(dir, leaf) == Some(SFlag::S_IFDIR) {
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            leaf,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        // SAFETY: openat(2) just returned this fd and nothing else owns it.
        let sub = unsafe { OwnedFd::from_raw_fd(fd) };
        for name in list_dir(sub.as_fd())? {
            remove_all_at(sub.as_fd(), Path::new(OsStr::from_bytes(&name)))?;
        }
        nix::unistd::unlinkat(Some(dir.as_raw_fd()), leaf, UnlinkatFlags::RemoveDir)
    } else {
        nix::unistd::unlinkat(Some(dir.as_raw_fd()), leaf, UnlinkatFlags::NoRemoveDir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel() -> &'static AtomicBool {
        Box::leak(Box::new(AtomicBool::new(false)))
    }

    /// A tar stream built entry by entry.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Layer {
            Layer(tar::Builder::new(Vec::new()))
        }
        fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h
        }
        /// Sets the raw name bytes (the tar crate refuses `..` on append).
        fn raw(mut h: tar::Header, name: &str) -> tar::Header {
            let n = &mut h.as_old_mut().name;
            n.fill(0);
            n[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            h
        }
        fn file(mut self, name: &str, data: &str) -> Layer {
            let h = Self::raw(
                Self::header(tar::EntryType::Regular, data.len() as u64, 0o644),
                name,
            );
            self.0.append(&h, data.as_bytes()).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Layer {
            let h = Self::raw(Self::header(tar::EntryType::Directory, 0, 0o755), name);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Layer {
            let mut h = Self::header(kind, 0, 0o777);
            h.set_link_name(target).unwrap();
            let h = Self::raw(h, name);
            self.0.append(&h, &[][..]).unwrap();
            self
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, layers: &[Vec<u8>]) -> Result<(), ImageError> {
        let mut fs = Rootfs::open(root, Limits::default(), cancel())?;
        for l in layers {
            fs.apply(&l[..])?;
        }
        Ok(())
    }

    #[test]
    fn names_are_cleaned_and_escapes_refused() {
        assert_eq!(clean(b"./a/b/").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(clean(b"./").unwrap(), None);
        assert!(clean(b"/etc/passwd").is_err());
        assert!(clean(b"a/../../x").is_err());
        assert!(clean(b"../x").is_err());
    }

    #[test]
    fn files_dirs_and_links_land_in_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let l = Layer::new()
            .dir("etc/")
            .file("etc/hostname", "box\n")
            .link(tar::EntryType::Symlink, "etc/alias", "/etc/hostname")
            .link(tar::EntryType::Link, "etc/hard", "etc/hostname")
            .bytes();
        apply(d.path(), &[l]).unwrap();
        let r = d.path();
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "box\n"
        );
        assert_eq!(
            std::fs::read_link(r.join("etc/alias")).unwrap(),
            PathBuf::from("/etc/hostname")
        );
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hard")).unwrap(),
            "box\n"
        );
    }

    #[test]
    fn whiteouts_remove_lower_files_and_opaque_dirs_hide_lower_contents() {
        let d = tempfile::tempdir().unwrap();
        let lower = Layer::new()
            .dir("a/")
            .file("a/gone", "1")
            .file("a/kept", "1")
            .dir("o/")
            .file("o/old", "1")
            .dir("o/sub/")
            .file("o/sub/deep", "1")
            .bytes();
        let upper = Layer::new()
            .file("a/.wh.gone", "")
            .file("o/new", "2")
            .file("o/.wh..wh..opq", "")
            .file("a/.wh.never-there", "")
            .bytes();
        apply(d.path(), &[lower, upper]).unwrap();
        let r = d.path();
        assert!(!r.join("a/gone").exists());
        assert!(r.join("a/kept").exists());
        assert!(!r.join("a/.wh.gone").exists());
        assert!(!r.join("o/old").exists());
        assert!(!r.join("o/sub").exists());
        assert_eq!(std::fs::read_to_string(r.join("o/new")).unwrap(), "2");
        assert!(!r.join("o/.wh..wh..opq").exists());
    }

    #[test]
    fn absolute_and_dotdot_names_are_refused() {
        for name in ["/abs", "../up", "a/../../up"] {
            let d = tempfile::tempdir().unwrap();
            let l = Layer::new().file(name, "x").bytes();
            let e = apply(d.path(), &[l]).unwrap_err();
            assert!(matches!(e, ImageError::BadEntry { .. }), "{name}: {e}");
        }
    }

    #[test]
    fn a_symlink_never_carries_a_write_outside_the_rootfs() {
        let outside = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir(&root).unwrap();
        let target = outside.path().display().to_string();
        // A directory symlink to a host path, then a file "through" it, and
        // a file symlink to a host file overwritten by a regular entry.
        let l = Layer::new()
            .link(tar::EntryType::Symlink, "esc", &target)
            .file("esc/pwned", "x")
            .link(tar::EntryType::Symlink, "f", &format!("{target}/victim"))
            .file("f", "y")
            .link(tar::EntryType::Symlink, "up", "../../..")
            .file("up/pwned2", "z")
            .bytes();
        std::fs::write(outside.path().join("victim"), "intact").unwrap();
        let _ = apply(&root, &[l]);
        assert!(!outside.path().join("pwned").exists());
        assert!(!d.path().join("pwned2").exists());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("victim")).unwrap(),
            "intact"
        );
    }

    #[test]
    fn a_hard_link_to_a_host_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let l = Layer::new()
            .link(tar::EntryType::Link, "passwd", "/etc/passwd")
            .bytes();
        assert!(apply(d.path(), &[l]).is_err());
        let l = Layer::new()
            .link(tar::EntryType::Link, "passwd", "../../../etc/passwd")
            .bytes();
        assert!(apply(d.path(), &[l]).is_err());
        assert!(!d.path().join("passwd").exists());
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let lower = Layer::new()
            .dir("usr/")
            .dir("usr/bin/")
            .link(tar::EntryType::Symlink, "bin", "/usr/bin")
            .bytes();
        let upper = Layer::new().file("bin/tool", "t").bytes();
        apply(d.path(), &[lower, upper]).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("usr/bin/tool")).unwrap(),
            "t"
        );
    }

    #[test]
    fn a_cancelled_unpack_stops() {
        let d = tempfile::tempdir().unwrap();
        let l = Layer::new().file("a", "1").bytes();
        let cancel = AtomicBool::new(true);
        let mut fs = Rootfs::open(d.path(), Limits::default(), &cancel).unwrap();
        assert!(matches!(fs.apply(&l[..]), Err(ImageError::Cancelled)));
        assert!(!d.path().join("a").exists());
    }

    #[test]
    fn unpacked_bytes_are_capped() {
        let d = tempfile::tempdir().unwrap();
        let l = Layer::new().file("big", "0123456789").bytes();
        let limits = Limits {
            max_bytes: 5,
            max_entries: 10,
        };
        let mut fs = Rootfs::open(d.path(), limits, cancel()).unwrap();
        let e = fs.apply(&l[..]).unwrap_err();
        assert!(matches!(e, ImageError::TooBig(_)), "{e}");
    }
}
