//! Images: `vessel run --image REF` turns an OCI image into a bundle.
//!
//! - [`ImageRef`]: where the image is (an OCI archive, an OCI layout
//!   directory, or a registry).
//! - [`source`]: reads the manifest, the config and the layers from there;
//!   every blob is checked against its descriptor's size and digest before
//!   it is used (registry pulls through `oci-client`).
//! - [`unpack`]: applies the layers to the rootfs (whiteouts, hostile-archive
//!   rules).
//! - [`spec`]: the image config (entrypoint, cmd, env, user, working dir)
//!   mapped onto a runtime `config.json`.
//!
//! [`TempBundle`] is the bundle directory, under the state root, that goes
//! away when it is dropped. Blobs are not cached: every run reads (or pulls)
//! the image again.

pub mod source;
pub mod spec;
pub mod unpack;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub use spec::RunOptions;

/// Most layers an image may have (Docker's limit is 127).
pub const MAX_LAYERS: usize = 128;
/// Largest manifest, index or config blob read.
pub const MAX_METADATA: u64 = 4 << 20;

/// Errors of reading an image and building its bundle.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ImageError {
    /// cannot read the OCI layout at {path}
    Layout {
        path: String,
        source: std::io::Error,
    },
    /// OCI archive {path}: {reason}
    Archive { path: String, reason: String },
    /// {what} of the OCI layout at {path} is invalid
    Json {
        what: String,
        path: String,
        source: serde_json::Error,
    },
    /// no image {want:?} in {path} (it has: {have})
    NotFound {
        want: String,
        path: String,
        have: String,
    },
    /// registry {reference}
    Registry {
        reference: String,
        source: oci_client::errors::OciDistributionError,
    },
    /// registry {reference}: GET {url}
    Http {
        reference: String,
        url: String,
        source: reqwest::Error,
    },
    /// registry {reference}: GET {url}: {status}
    HttpStatus {
        reference: String,
        url: String,
        status: String,
    },
    /// cannot set up the HTTP client
    HttpClient(#[source] reqwest::Error),
    /// {what} of {reference} is invalid: {reason}
    RegistryJson {
        what: String,
        reference: String,
        reason: String,
    },
    /// invalid image reference {0:?}
    Reference(String),
    /// digest {0:?} is not a sha256 or sha512 digest
    Digest(String),
    /// blob {digest}: {reason}
    Verify { digest: String, reason: String },
    /// blob {digest}
    BlobIo {
        digest: String,
        source: std::io::Error,
    },
    /// the image is too big: {0}
    TooBig(String),
    /// unsupported layer media type {0:?}
    LayerMediaType(String),
    /// zstd layer: {0}
    Zstd(String),
    /// reading a layer archive
    Tar(#[source] std::io::Error),
    /// cannot unpack {path}
    Unpack {
        path: String,
        source: std::io::Error,
    },
    /// refused layer entry {path:?}: {reason}
    BadEntry { path: String, reason: String },
    /// image config: {0}
    Config(String),
    /// bundle directory {path}
    Bundle {
        path: String,
        source: std::io::Error,
    },
    /// interrupted
    Cancelled,
}

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A tar of an OCI layout (`skopeo copy ... oci-archive:PATH`).
    Archive { path: PathBuf, tag: Option<String> },
    /// An OCI layout directory (`oci-layout`, `index.json`, `blobs/`).
    Layout { dir: PathBuf, tag: Option<String> },
    /// An image in a registry: `HOST[:PORT]/NAME[:TAG|@DIGEST]`.
    Registry(String),
}

impl ImageRef {
    /// `oci-archive:PATH[:TAG]`, `oci:DIR[:TAG]` and `docker://REF` as in
    /// skopeo; otherwise an existing file is an archive, an existing
    /// directory a layout, and anything else a registry reference.
    pub fn parse(s: &str) -> ImageRef {
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (path, tag) = split_tag(rest);
            return ImageRef::Archive { path, tag };
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_tag(rest);
            return ImageRef::Layout { dir, tag };
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            return ImageRef::Registry(rest.to_string());
        }
        let p = Path::new(s);
        if p.is_dir() {
            ImageRef::Layout {
                dir: p.to_path_buf(),
                tag: None,
            }
        } else if p.is_file() {
            ImageRef::Archive {
                path: p.to_path_buf(),
                tag: None,
            }
        } else {
            ImageRef::Registry(s.to_string())
        }
    }
}

/// `PATH[:TAG]`: a tag is what follows the last `:` when it has no `/`.
fn split_tag(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !tag.is_empty() => {
            (PathBuf::from(path), Some(tag.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

/// What [`prepare`] reports as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading or downloading a layer, and checking its digest.
    Fetch,
    /// Applying a layer to the rootfs (bytes of the compressed layer read).
    Unpack,
}

/// One progress report: `done` of `total` bytes of layer `layer` (1-based)
/// of `layers`.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub phase: Phase,
    pub layer: usize,
    pub layers: usize,
    pub digest: &'a str,
    pub done: u64,
    pub total: u64,
}

/// A bundle directory (mode 0700) under `<state_root>/images/`, removed
/// with everything in it when dropped.
#[derive(Debug)]
pub struct TempBundle {
    path: PathBuf,
}

impl TempBundle {
    /// Creates `<state_root>/images/<id>-<random>`.
    pub fn create(state_root: &Path, id: &str) -> Result<TempBundle, ImageError> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = state_root.join("images");
        let err = |path: &Path| {
            let path = path.display().to_string();
            move |source| ImageError::Bundle { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(err(&parent))?;
        let mut last = None;
        for _ in 0..16 {
            let path = parent.join(format!("{id}-{:08x}", random_u32()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempBundle { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(err(&path)(e)),
            }
        }
        Err(err(&parent)(last.expect("16 tries")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempBundle {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks.
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing bundle {}: {e}", self.path.display());
            }
        }
    }
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        b = (std::process::id()
            ^ std::time::UNIX_EPOCH
                .elapsed()
                .unwrap_or_default()
                .subsec_nanos())
        .to_le_bytes();
    }
    u32::from_le_bytes(b)
}

/// Reads (or pulls) `image`, unpacks it into `<bundle>/rootfs` and writes
/// `<bundle>/config.json` for `opts`. Blocking (file and network I/O); run
/// it on a thread of its own. `cancel` set: stops with
/// [`ImageError::Cancelled`] at the next entry or chunk.
pub fn prepare(
    image: &ImageRef,
    bundle: &TempBundle,
    opts: &RunOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(Progress),
) -> Result<(), ImageError> {
    let dir = bundle.path();
    let work = dir.join("blobs");
    let rootfs = dir.join("rootfs");
    for d in [&work, &rootfs] {
        std::fs::create_dir(d).map_err(|source| ImageError::Bundle {
            path: d.display().to_string(),
            source,
        })?;
    }
    let src = source::Source::open(image, &work, cancel)?;
    let manifest = src.manifest()?;
    let config = src.config(&manifest.config)?;
    let layers = manifest.layers.len();
    let mut fs = unpack::Rootfs::open(&rootfs, unpack::Limits::default(), cancel)?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let compression = unpack::Compression::from_media_type(&layer.media_type)?;
        let mut report = |phase, done| {
            progress(Progress {
                phase,
                layer: i + 1,
                layers,
                digest: &layer.digest,
                done,
                total: layer.size,
            })
        };
        let blob = src.fetch(layer, &mut |done| report(Phase::Fetch, done))?;
        let file = std::fs::File::open(&blob.path).map_err(|source| ImageError::BlobIo {
            digest: layer.digest.clone(),
            source,
        })?;
        report(Phase::Unpack, 0);
        let counted = Counted {
            inner: std::io::BufReader::new(file),
            done: 0,
            step: 0,
            report: &mut |done| report(Phase::Unpack, done),
        };
        fs.apply(compression.reader(counted)?)?;
        report(Phase::Unpack, layer.size);
        drop(blob);
    }
    drop(src);
    let _ = std::fs::remove_dir_all(&work);
    let spec = spec::bundle_spec(&config, &rootfs, opts)?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&spec).expect("a JSON value serializes");
    std::fs::write(&path, text).map_err(|source| ImageError::Bundle {
        path: path.display().to_string(),
        source,
    })
}

/// A reader that reports the bytes read, every 1 MiB.
struct Counted<'r, R> {
    inner: R,
    done: u64,
    step: u64,
    report: &'r mut dyn FnMut(u64),
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done >= self.step + (1 << 20) {
            self.step = self.done;
            (self.report)(self.done);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_skopeo_and_paths() {
        assert_eq!(
            ImageRef::parse("oci-archive:/x/b.tar:latest"),
            ImageRef::Archive {
                path: "/x/b.tar".into(),
                tag: Some("latest".into())
            }
        );
        assert_eq!(
            ImageRef::parse("oci:/x/layout"),
            ImageRef::Layout {
                dir: "/x/layout".into(),
                tag: None
            }
        );
        assert_eq!(
            ImageRef::parse("docker://127.0.0.1:5000/busybox:latest"),
            ImageRef::Registry("127.0.0.1:5000/busybox:latest".into())
        );
        assert_eq!(
            ImageRef::parse("127.0.0.1:5000/busybox"),
            ImageRef::Registry("127.0.0.1:5000/busybox".into())
        );
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            ImageRef::parse(d.path().to_str().unwrap()),
            ImageRef::Layout { .. }
        ));
    }

    #[test]
    fn a_temp_bundle_is_private_and_goes_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let b = TempBundle::create(root.path(), "c1").unwrap();
        let path = b.path().to_path_buf();
        std::fs::create_dir_all(path.join("rootfs/x")).unwrap();
        std::os::unix::fs::symlink("/etc", path.join("rootfs/etc")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(b);
        assert!(!path.exists());
        assert!(Path::new("/etc/passwd").exists());
    }
}
