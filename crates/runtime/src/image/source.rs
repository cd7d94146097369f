//! Where an image's manifest, config and layers come from: an OCI layout
//! directory (an OCI archive is unpacked to one first) or a registry
//! (`oci-client`). Every blob is checked against its descriptor: size
//! first (a download stops at the declared size), then digest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use sha2::Digest as _;

use super::{ImageError, ImageRef, MAX_LAYERS, MAX_METADATA};

/// The parts of a descriptor that are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl From<&oci_spec::image::Descriptor> for Descriptor {
    fn from(d: &oci_spec::image::Descriptor) -> Descriptor {
        Descriptor {
            media_type: d.media_type().to_string(),
            digest: d.digest().to_string(),
            size: d.size(),
        }
    }
}

/// An image manifest: its config and layers, in order.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// A verified blob on disk; a downloaded one is removed on drop.
#[derive(Debug)]
pub struct Blob {
    pub path: PathBuf,
    temporary: bool,
}

impl Drop for Blob {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A checked `ALG:HEX` digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Sha256,
    Sha512,
}

/// Splits and checks a digest; the hex part is safe as a file name.
fn parse_digest(d: &str) -> Result<(Alg, &str), ImageError> {
    let bad = || ImageError::Digest(d.to_string());
    let (alg, hex) = d.split_once(':').ok_or_else(bad)?;
    let (alg, len) = match alg {
        "sha256" => (Alg::Sha256, 64),
        "sha512" => (Alg::Sha512, 128),
        _ => return Err(bad()),
    };
    if hex.len() != len || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    Ok((alg, hex))
}

/// A running digest of one algorithm.
enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(alg: Alg) -> Hasher {
        match alg {
            Alg::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Alg::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }
    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Checks what was read of a blob against its descriptor.
struct Verifier<'d> {
    want: &'d Descriptor,
    hex: &'d str,
    hasher: Hasher,
    size: u64,
}

impl<'d> Verifier<'d> {
    fn new(want: &'d Descriptor) -> Result<Verifier<'d>, ImageError> {
        let (alg, hex) = parse_digest(&want.digest)?;
        Ok(Verifier {
            want,
            hex,
            hasher: Hasher::new(alg),
            size: 0,
        })
    }

    /// Adds `chunk`; fails as soon as the blob is longer than declared.
    fn update(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        self.size += chunk.len() as u64;
        if self.size > self.want.size {
            return Err(self.fail(format!(
                "more than the {} bytes its descriptor declares",
                self.want.size
            )));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(self) -> Result<(), ImageError> {
        if self.size != self.want.size {
            return Err(self.fail(format!(
                "{} bytes, its descriptor declares {}",
                self.size, self.want.size
            )));
        }
        let (want, hex) = (self.want, self.hex);
        let got = self.hasher.hex();
        if got != hex {
            return Err(ImageError::Verify {
                digest: want.digest.clone(),
                reason: format!("content has digest {got}"),
            });
        }
        Ok(())
    }

    fn fail(&self, reason: String) -> ImageError {
        ImageError::Verify {
            digest: self.want.digest.clone(),
            reason,
        }
    }
}

/// Reads all of `r` through a verifier, writing it to `out` if given.
fn verify_stream(
    want: &Descriptor,
    mut r: impl Read,
    mut out: Option<&mut dyn Write>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ImageError> {
    let mut v = Verifier::new(want)?;
    let io = |source| ImageError::BlobIo {
        digest: want.digest.clone(),
        source,
    };
    let mut buf = vec![0u8; 256 << 10];
    let mut reported = 0;
    progress(0);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(ImageError::Cancelled);
        }
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        v.update(&buf[..n])?;
        if let Some(o) = out.as_mut() {
            o.write_all(&buf[..n]).map_err(io)?;
        }
        if v.size >= reported + (1 << 20) {
            reported = v.size;
            progress(v.size);
        }
    }
    let size = v.size;
    v.finish()?;
    progress(size);
    Ok(())
}

/// An image's source.
pub enum Source<'c> {
    Layout {
        dir: PathBuf,
        tag: Option<String>,
        cancel: &'c AtomicBool,
    },
    Registry(Box<Registry<'c>>),
}

impl<'c> Source<'c> {
    /// Opens `image`; an archive is unpacked into `work/layout` first.
    pub fn open(
        image: &ImageRef,
        work: &Path,
        cancel: &'c AtomicBool,
    ) -> Result<Source<'c>, ImageError> {
        Ok(match image {
            ImageRef::Layout { dir, tag } => Source::Layout {
                dir: dir.clone(),
                tag: tag.clone(),
                cancel,
            },
            ImageRef::Archive { path, tag } => {
                let dir = work.join("layout");
                extract_archive(path, &dir)?;
                Source::Layout {
                    dir,
                    tag: tag.clone(),
                    cancel,
                }
            }
            ImageRef::Registry(r) => Source::Registry(Box::new(Registry::new(r, work, cancel)?)),
        })
    }

    /// The image manifest (for this host's platform when the reference
    /// names an index).
    pub fn manifest(&self) -> Result<Manifest, ImageError> {
        let m = match self {
            Source::Layout { dir, tag, .. } => layout_manifest(dir, tag.as_deref())?,
            Source::Registry(r) => r.manifest()?,
        };
        if m.layers.len() > MAX_LAYERS {
            return Err(ImageError::TooBig(format!(
                "{} layers (at most {MAX_LAYERS})",
                m.layers.len()
            )));
        }
        Ok(m)
    }

    /// The image config blob, parsed.
    pub fn config(&self, d: &Descriptor) -> Result<ImageConfiguration, ImageError> {
        if d.size > MAX_METADATA {
            return Err(ImageError::TooBig(format!("config of {} bytes", d.size)));
        }
        let blob = self.fetch(d, &mut |_| {})?;
        let text = std::fs::read(&blob.path).map_err(|source| ImageError::BlobIo {
            digest: d.digest.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|e| ImageError::Config(e.to_string()))
    }

    /// The verified blob of `d`; `progress` gets the bytes read so far.
    pub fn fetch(&self, d: &Descriptor, progress: &mut dyn FnMut(u64)) -> Result<Blob, ImageError> {
        match self {
            Source::Layout { dir, cancel, .. } => {
                let path = blob_path(dir, &d.digest)?;
                let f = std::fs::File::open(&path).map_err(|source| ImageError::BlobIo {
                    digest: d.digest.clone(),
                    source,
                })?;
                verify_stream(d, f, None, cancel, progress)?;
                Ok(Blob {
                    path,
                    temporary: false,
                })
            }
            Source::Registry(r) => r.fetch(d, progress),
        }
    }
}

/// `<layout>/blobs/<alg>/<hex>`, after checking the digest.
fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (alg, hex) = parse_digest(digest)?;
    let alg = match alg {
        Alg::Sha256 => "sha256",
        Alg::Sha512 => "sha512",
    };
    Ok(layout.join("blobs").join(alg).join(hex))
}

/// Reads a small JSON blob of a layout, verified against `d`.
fn layout_json<T: serde::de::DeserializeOwned>(
    layout: &Path,
    d: &Descriptor,
    what: &str,
) -> Result<T, ImageError> {
    if d.size > MAX_METADATA {
        return Err(ImageError::TooBig(format!("{what} of {} bytes", d.size)));
    }
    let path = blob_path(layout, &d.digest)?;
    let data = std::fs::File::open(&path)
        .and_then(|f| read_capped(f, d.size))
        .map_err(|source| ImageError::Layout {
            path: path.display().to_string(),
            source,
        })?;
    verify_stream(d, &data[..], None, &AtomicBool::new(false), &mut |_| {})?;
    serde_json::from_slice(&data).map_err(|source| ImageError::Json {
        what: what.to_string(),
        path: layout.display().to_string(),
        source,
    })
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The manifest named `tag` in the layout's index.json (or its only one).
fn layout_manifest(layout: &Path, tag: Option<&str>) -> Result<Manifest, ImageError> {
    let path = layout.join("index.json");
    let data = std::fs::File::open(&path)
        .and_then(|f| read_capped(f, MAX_METADATA))
        .map_err(|source| ImageError::Layout {
            path: path.display().to_string(),
            source,
        })?;
    if data.len() as u64 > MAX_METADATA {
        return Err(ImageError::TooBig(format!(
            "index.json of more than {MAX_METADATA} bytes"
        )));
    }
    let index: ImageIndex = serde_json::from_slice(&data).map_err(|source| ImageError::Json {
        what: "index.json".into(),
        path: layout.display().to_string(),
        source,
    })?;
    let name = |d: &oci_spec::image::Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .cloned()
    };
    let chosen = match tag {
        Some(t) => index
            .manifests()
            .iter()
            .find(|d| name(d).as_deref() == Some(t)),
        None if index.manifests().len() == 1 => index.manifests().first(),
        None => None,
    };
    let Some(chosen) = chosen else {
        let have: Vec<String> = index
            .manifests()
            .iter()
            .map(|d| name(d).unwrap_or_else(|| d.digest().to_string()))
            .collect();
        return Err(ImageError::NotFound {
            want: tag.unwrap_or("(the only one)").to_string(),
            path: layout.display().to_string(),
            have: have.join(", "),
        });
    };
    let mut d = Descriptor::from(chosen);
    // An index: this platform's manifest (one level deep, as registries do).
    if INDEX_TYPES.contains(&d.media_type.as_str()) {
        let nested: ImageIndex = layout_json(layout, &d, "image index")?;
        d = platform_manifest(&nested, &layout.display().to_string())?;
    }
    let m: ImageManifest = layout_json(layout, &d, "image manifest")?;
    Ok(Manifest::from(&m))
}

impl From<&ImageManifest> for Manifest {
    fn from(m: &ImageManifest) -> Manifest {
        Manifest {
            config: m.config().into(),
            layers: m.layers().iter().map(Descriptor::from).collect(),
        }
    }
}

/// The descriptor of this host's platform's manifest in `index`; `place` names
/// where the index is, for the error.
fn platform_manifest(index: &ImageIndex, place: &str) -> Result<Descriptor, ImageError> {
    let (os, arch) = host_platform();
    index
        .manifests()
        .iter()
        .find(|m| {
            m.platform()
                .as_ref()
                .is_some_and(|p| p.os().to_string() == os && p.architecture().to_string() == arch)
        })
        .map(Descriptor::from)
        .ok_or_else(|| ImageError::NotFound {
            want: format!("{os}/{arch}"),
            path: place.to_string(),
            have: "other platforms only".into(),
        })
}

/// Reads `r` to its end or to `max` + 1 bytes, whichever comes first: a caller
/// that gets more than `max` bytes knows the source is too big without having
/// read it all.
fn read_capped(r: impl Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut data)?;
    Ok(data)
}

/// OCI's names for this host: ("linux", "amd64"), ...
fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

/// Most entries read from an OCI archive: a few images' manifests, configs and
/// layers (each at most [`MAX_LAYERS`]), with their directories.
const MAX_ARCHIVE_ENTRIES: usize = 4096;

/// Unpacks an OCI archive (a tar of a layout) into `dir`: only
/// `oci-layout`, `index.json` and `blobs/<alg>/<hex>`, regular files and
/// directories, are accepted.
fn extract_archive(archive: &Path, dir: &Path) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::Archive {
        path: archive.display().to_string(),
        reason,
    };
    let f = std::fs::File::open(archive).map_err(|e| bad(e.to_string()))?;
    for d in [dir.to_path_buf(), dir.join("blobs")] {
        std::fs::create_dir_all(&d).map_err(|e| bad(format!("{}: {e}", d.display())))?;
    }
    let mut tar = tar::Archive::new(std::io::BufReader::new(f));
    for (n, entry) in tar.entries().map_err(|e| bad(e.to_string()))?.enumerate() {
        if n >= MAX_ARCHIVE_ENTRIES {
            return Err(bad(format!("more than {MAX_ARCHIVE_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| bad(e.to_string()))?;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = super::unpack::clean(&raw)? else {
            continue;
        };
        let name = rel.to_string_lossy().into_owned();
        let parts: Vec<&str> = name.split('/').collect();
        let kind = entry.header().entry_type();
        let ok = match parts.as_slice() {
            ["oci-layout"] | ["index.json"] => kind.is_file(),
            ["blobs"] => kind.is_dir(),
            ["blobs", alg] => kind.is_dir() && matches!(*alg, "sha256" | "sha512"),
            ["blobs", alg, hex] => kind.is_file() && parse_digest(&format!("{alg}:{hex}")).is_ok(),
            _ => false,
        };
        if !ok {
            return Err(bad(format!("unexpected entry {name:?} ({kind:?})")));
        }
        // Blobs are checked against their descriptors when read; these two are
        // read whole.
        let size = entry.size();
        if parts.len() == 1 && size > MAX_METADATA {
            return Err(ImageError::TooBig(format!(
                "{name} of {size} bytes in {} (at most {MAX_METADATA})",
                archive.display()
            )));
        }
        let out = dir.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| bad(format!("{name}: {e}")))?;
            continue;
        }
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p).map_err(|e| bad(format!("{name}: {e}")))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out)
            .map_err(|e| bad(format!("{name}: {e}")))?;
        std::io::copy(&mut entry, &mut file).map_err(|e| bad(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Longest wait for a registry connection.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest wait for the next bytes of a registry's answer.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The media types a manifest is asked for in (OCI and Docker, image and index).
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    INDEX_TYPES[0],
    INDEX_TYPES[1],
];

/// A registry, through `oci-client`, on a runtime of its own. Registries on
/// the loopback interface are spoken to over plain HTTP, others over HTTPS.
/// Anonymous pulls only.
pub struct Registry<'c> {
    client: oci_client::Client,
    /// Manifests: `oci-client` reads a manifest whole, however big; this reads
    /// at most [`MAX_METADATA`] bytes of one.
    http: reqwest::Client,
    reference: oci_client::Reference,
    rt: tokio::runtime::Runtime,
    work: PathBuf,
    cancel: &'c AtomicBool,
}

/// Whether `registry` (`HOST[:PORT]`) is on the loopback interface.
pub fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl<'c> Registry<'c> {
    fn new(r: &str, work: &Path, cancel: &'c AtomicBool) -> Result<Registry<'c>, ImageError> {
        let reference: oci_client::Reference = r
            .parse()
            .map_err(|e| ImageError::Reference(format!("{r}: {e}")))?;
        let registry = reference.resolve_registry().to_string();
        let protocol = if is_loopback(&registry) {
            oci_client::client::ClientProtocol::HttpsExcept(vec![registry])
        } else {
            oci_client::client::ClientProtocol::Https
        };
        let client = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        });
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(ImageError::HttpClient)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ImageError::Bundle {
                path: work.display().to_string(),
                source,
            })?;
        Ok(Registry {
            client,
            http,
            reference,
            rt,
            work: work.to_path_buf(),
            cancel,
        })
    }

    fn err(&self, source: oci_client::errors::OciDistributionError) -> ImageError {
        ImageError::Registry {
            reference: self.reference.whole(),
            source,
        }
    }

    /// The manifest the reference names (this platform's, through an index),
    /// each document read up to [`MAX_METADATA`] bytes and checked against the
    /// digest that names it, if one does.
    fn manifest(&self) -> Result<Manifest, ImageError> {
        self.rt.block_on(async {
            let auth = oci_client::secrets::RegistryAuth::Anonymous;
            let op = oci_client::RegistryOperation::Pull;
            let token = self
                .client
                .auth(&self.reference, &auth, op)
                .await
                .map_err(|e| self.err(e))?;
            let token = token.as_deref();
            let pinned = self.reference.digest();
            let name = pinned.or(self.reference.tag()).unwrap_or("latest");
            let body = self.get_manifest(name, token, MAX_METADATA).await?;
            if let Some(digest) = pinned {
                let want = Descriptor {
                    media_type: String::new(),
                    digest: digest.to_string(),
                    size: body.len() as u64,
                };
                verify_stream(&want, &body[..], None, self.cancel, &mut |_| {})?;
            }
            let json = |what: &str, body: &[u8]| -> Result<serde_json::Value, ImageError> {
                serde_json::from_slice(body).map_err(|e| ImageError::RegistryJson {
                    what: what.to_string(),
                    reference: self.reference.whole(),
                    reason: e.to_string(),
                })
            };
            let mut doc = json("manifest", &body)?;
            if doc.get("manifests").is_some() {
                let index: ImageIndex =
                    serde_json::from_value(doc).map_err(|e| ImageError::RegistryJson {
                        what: "image index".into(),
                        reference: self.reference.whole(),
                        reason: e.to_string(),
                    })?;
                let d = platform_manifest(&index, &self.reference.whole())?;
                if d.size > MAX_METADATA {
                    return Err(ImageError::TooBig(format!("manifest of {} bytes", d.size)));
                }
                let body = self.get_manifest(&d.digest, token, d.size).await?;
                verify_stream(&d, &body[..], None, self.cancel, &mut |_| {})?;
                doc = json("manifest", &body)?;
            }
            let m: ImageManifest =
                serde_json::from_value(doc).map_err(|e| ImageError::RegistryJson {
                    what: "image manifest".into(),
                    reference: self.reference.whole(),
                    reason: e.to_string(),
                })?;
            Ok(Manifest::from(&m))
        })
    }

    /// GET `/v2/<repository>/manifests/<name>`: the body, read up to `max` + 1
    /// bytes (more is [`ImageError::TooBig`]).
    async fn get_manifest(
        &self,
        name: &str,
        token: Option<&str>,
        max: u64,
    ) -> Result<Vec<u8>, ImageError> {
        let registry = self.reference.resolve_registry();
        let scheme = if is_loopback(registry) {
            "http"
        } else {
            "https"
        };
        let mut url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{name}",
            self.reference.repository()
        );
        if let Some(ns) = self.reference.namespace() {
            url = format!("{url}?ns={ns}");
        }
        let http = |source| ImageError::Http {
            reference: self.reference.whole(),
            url: url.clone(),
            source,
        };
        let mut req = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(ImageError::HttpStatus {
                reference: self.reference.whole(),
                url: url.clone(),
                status: resp.status().to_string(),
            });
        }
        let too_big = || ImageError::TooBig(format!("{url}: more than {max} bytes"));
        if resp.content_length().is_some_and(|n| n > max) {
            return Err(too_big());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(ImageError::Cancelled);
            }
            if (body.len() + chunk.len()) as u64 > max {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn fetch(&self, want: &Descriptor, progress: &mut dyn FnMut(u64)) -> Result<Blob, ImageError> {
        use futures::StreamExt;
        let (_, hex) = parse_digest(&want.digest)?;
        let path = self.work.join(hex);
        let blob = Blob {
            path: path.clone(),
            temporary: true,
        };
        let io = |source| ImageError::BlobIo {
            digest: want.digest.clone(),
            source,
        };
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
        let desc = oci_client::manifest::OciDescriptor {
            media_type: want.media_type.clone(),
            digest: want.digest.clone(),
            size: i64::try_from(want.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut v = Verifier::new(want)?;
        self.rt.block_on(async {
            let mut stream = self
                .client
                .pull_blob_stream(&self.reference, &desc)
                .await
                .map_err(|e| self.err(e))?;
            let mut reported = 0;
            progress(0);
            while let Some(chunk) = stream.next().await {
                if self.cancel.load(Ordering::Relaxed) {
                    return Err(ImageError::Cancelled);
                }
                let chunk = chunk.map_err(io)?;
                v.update(&chunk)?;
                file.write_all(&chunk).map_err(io)?;
                if v.size >= reported + (1 << 20) {
                    reported = v.size;
                    progress(v.size);
                }
            }
            Ok(())
        })?;
        let size = v.size;
        v.finish()?;
        file.flush().map_err(io)?;
        progress(size);
        Ok(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(data: &[u8]) -> String {
        let mut h = Hasher::new(Alg::Sha256);
        h.update(data);
        h.hex()
    }

    fn desc(data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            digest: format!("sha256:{}", sha256_hex(data)),
            size: data.len() as u64,
        }
    }

    fn verify(d: &Descriptor, data: &[u8]) -> Result<(), ImageError> {
        verify_stream(d, data, None, &AtomicBool::new(false), &mut |_| {})
    }

    #[test]
    fn a_blob_matching_its_descriptor_passes() {
        verify(&desc(b"layer"), b"layer").unwrap();
    }

    #[test]
    fn a_digest_mismatch_is_refused() {
        let d = desc(b"layer");
        let e = verify(&d, b"LAYER").unwrap_err();
        assert!(e.to_string().contains("content has digest"), "{e}");
    }

    #[test]
    fn a_blob_longer_or_shorter_than_declared_is_refused() {
        let mut d = desc(b"layer");
        d.size = 3;
        assert!(verify(&d, b"layer")
            .unwrap_err()
            .to_string()
            .contains("more than"));
        d.size = 9;
        assert!(verify(&d, b"layer")
            .unwrap_err()
            .to_string()
            .contains("declares 9"));
    }

    #[test]
    fn digests_are_checked_before_use_as_file_names() {
        let l = Path::new("/l");
        assert!(blob_path(l, "sha256:../../../etc/passwd").is_err());
        assert!(blob_path(l, "md5:abc").is_err());
        assert!(blob_path(l, &format!("sha256:{}", "A".repeat(64))).is_err());
        assert_eq!(
            blob_path(l, &format!("sha256:{}", "a".repeat(64))).unwrap(),
            l.join("blobs/sha256").join("a".repeat(64))
        );
    }

    #[test]
    fn loopback_registries_are_recognised() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    fn too_big(r: Result<impl std::fmt::Debug, ImageError>) -> String {
        match r {
            Err(e @ ImageError::TooBig(_)) => e.to_string(),
            other => panic!("not TooBig: {other:?}"),
        }
    }

    #[test]
    fn a_layout_index_or_blob_bigger_than_the_cap_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("index.json"),
            vec![b' '; MAX_METADATA as usize + 1],
        )
        .unwrap();
        assert!(too_big(layout_manifest(d.path(), None)).contains("index.json"));
        // A blob file longer than its descriptor: read no further than declared.
        let mut m = desc(b"{}");
        let path = blob_path(d.path(), &m.digest).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{}   ").unwrap();
        let e = layout_json::<serde_json::Value>(d.path(), &m, "image manifest").unwrap_err();
        assert!(e.to_string().contains("more than the 2 bytes"), "{e}");
        m.size = MAX_METADATA + 1;
        assert!(too_big(layout_json::<serde_json::Value>(d.path(), &m, "x")).contains("x of"));
    }

    #[test]
    fn an_archive_with_an_oversized_index_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(MAX_METADATA + 1);
        h.set_mode(0o644);
        h.set_cksum();
        let big = vec![b' '; MAX_METADATA as usize + 1];
        b.append_data(&mut h, "index.json", &big[..]).unwrap();
        let path = d.path().join("a.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let e = too_big(extract_archive(&path, &d.path().join("out")));
        assert!(e.contains("index.json of 4194305 bytes"), "{e}");
    }

    /// A registry on loopback that answers `GET /v2/` with 200 and each
    /// manifest path with `answer(path)`: (extra head lines, body).
    fn fake_registry(answer: fn(&str) -> (String, Vec<u8>)) -> String {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { return };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let (head, body) = match path.as_str() {
                    "/v2/" => (String::new(), b"{}".to_vec()),
                    p => answer(p),
                };
                let _ = c.write_all(
                    format!("HTTP/1.1 200 OK\r\nConnection: close\r\n{head}\r\n").as_bytes(),
                );
                let _ = c.write_all(&body);
            }
        });
        addr
    }

    fn registry_manifest(reference: &str) -> Result<Manifest, ImageError> {
        let work = tempfile::tempdir().unwrap();
        let cancel = AtomicBool::new(false);
        let r = Registry::new(reference, work.path(), &cancel)?;
        r.manifest()
    }

    #[test]
    fn a_registry_manifest_bigger_than_the_cap_is_refused_unread() {
        let addr = fake_registry(|path| match path {
            // No length: read until the cap, then refused.
            "/v2/endless/manifests/latest" => {
                (String::new(), vec![b' '; MAX_METADATA as usize + 2])
            }
            // A declared length over the cap: refused before the body.
            "/v2/declared/manifests/latest" => {
                (format!("Content-Length: {}\r\n", 1u64 << 40), Vec::new())
            }
            // An index naming a manifest over the cap: never fetched.
            _ => {
                let index = format!(
                    r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"platform":{{"os":"linux","architecture":"{}"}}}}]}}"#,
                    "a".repeat(64),
                    MAX_METADATA + 1,
                    host_platform().1
                );
                (String::new(), index.into_bytes())
            }
        });
        for (name, want) in [
            ("endless", "more than 4194304 bytes"),
            ("declared", "more than 4194304 bytes"),
            ("index", "manifest of 4194305 bytes"),
        ] {
            let e = too_big(registry_manifest(&format!("{addr}/{name}:latest")));
            assert!(e.contains(want), "{name}: {e}");
        }
    }

    #[test]
    fn a_registry_manifest_is_read_through_its_index_and_checked() {
        let addr = fake_registry(|path| {
            let manifest = br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","size":2},"layers":[]}"#;
            let digest = format!("sha256:{}", sha256_hex(manifest));
            if path.ends_with(&digest) {
                return (String::new(), manifest.to_vec());
            }
            // The tag's index; "liar" declares the wrong size for the manifest.
            let size = manifest.len() - usize::from(path.contains("liar"));
            let index = format!(
                r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"os":"linux","architecture":"{}"}}}}]}}"#,
                host_platform().1
            );
            (String::new(), index.into_bytes())
        });
        let m = registry_manifest(&format!("{addr}/good:latest")).unwrap();
        assert_eq!(m.config.size, 2);
        assert!(m.layers.is_empty());
        let e = registry_manifest(&format!("{addr}/liar:latest")).unwrap_err();
        assert!(matches!(e, ImageError::TooBig(_)), "{e}");
    }

    #[test]
    fn an_archive_with_a_stray_entry_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/cron.d/x", &b"x"[..]).unwrap();
        let path = d.path().join("a.tar");
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();
        let e = extract_archive(&path, &d.path().join("out")).unwrap_err();
        assert!(e.to_string().contains("unexpected entry"), "{e}");
    }
}
