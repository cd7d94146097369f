//! Templates: a sandbox of a shape that was seen before starts from a snapshot.
//!
//! The first sandbox of a shape (backend, accelerator, hypervisor binary, kernel,
//! initramfs with the agent, kernel arguments, vCPUs, memory, channel, shares) boots
//! cold; once its agent is ready, and before any container exists, its VM is
//! snapshotted into `<templates dir>/<key>` and it runs on. Later sandboxes of that
//! shape are restored from the snapshot (clock set, RNG reseeded, see
//! [`Sandbox::restore_with`]). Cold boot is the fallback, logged with the reason:
//! templates off, a backend or VM the snapshot cannot carry (QEMU's vhost-user
//! devices, network devices), a template being built by another sandbox, or a
//! restore that failed (the template is then removed and rebuilt).
//!
//! The agent policy (`[agent] policy`, [`vessel_protocol::policy`]) is not part of
//! the template: the agent takes it once, before the first container, and it is
//! sent after the snapshot (cold boot) or after the restore (clone). So a template
//! serves sandboxes of any policy and each gets its own.
//!
//! The key is a digest of the inputs. Files are named by their metadata
//! (device, inode, size, modification and change times): a kernel or initramfs
//! that is rewritten, even in place, changes its change time and so the key. A
//! template directory is used only if it is the runtime user's, writable only by it
//! and unreadable by others (0700; 0750 after a jailed VMM's group was let read it), and its
//! files still match `template.json` (sizes and modification times of every
//! file, SHA-256 of the small ones); anything else is removed and rebuilt.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vessel_hypervisor::{Hypervisor, SharedDir, VmConfig};

use crate::sandbox::SandboxSpec;
use crate::{Config, Error, Result, Sandbox};

/// The manifest in a template directory, written last.
const MANIFEST: &str = "template.json";
/// Files up to this size are checked by content digest; larger ones (guest
/// memory) by size and modification time.
const DIGEST_MAX_BYTES: u64 = 1 << 20;

/// A file the template depends on, named by its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: mtime_ns(&m),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// Everything a template's VM depends on; its digest is the template's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inputs {
    pub runtime_version: String,
    pub backend: String,
    pub hypervisor_binary: FileId,
    pub kernel: FileId,
    pub initramfs: FileId,
    pub kernel_args: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub channel: String,
    /// (tag, read-only) of each share, in order.
    pub shares: Vec<(String, bool)>,
    /// The MTU of each network device, in order (`None`: the default).
    pub nics: Vec<Option<u32>>,
}

impl Inputs {
    /// The inputs of a sandbox of `spec`'s shape under `config` and `hv`.
    pub fn of(config: &Config, hv: &dyn Hypervisor, spec: &SandboxSpec) -> Result<Inputs> {
        let binary = match hv.name() {
            "builtin" => &config.builtin.vmm_path,
            _ => &config.qemu.path,
        };
        let id = |p: &Path| FileId::of(p).map_err(|e| TemplateError::Input(p.to_path_buf(), e));
        Ok(Inputs {
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            backend: format!("{} ({})", hv.name(), hv.capabilities().accelerator),
            hypervisor_binary: id(binary)?,
            kernel: id(&config.guest_kernel)?,
            initramfs: id(&config.guest_initramfs)?,
            kernel_args: config.kernel_args.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            channel: config.channel.to_string(),
            shares: spec
                .shared_dirs
                .iter()
                .map(|s: &SharedDir| (s.tag.clone(), s.read_only))
                .collect(),
            nics: spec
                .nics
                .iter()
                .map(|n| match n {
                    vessel_hypervisor::Nic::VirtioTap(t) => t.mtu,
                })
                .collect(),
        })
    }

    /// The template key: the first 16 bytes of the SHA-256 of the inputs, in hex.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("inputs serialize");
        hex(&Sha256::digest(&json)[..16])
    }
}

/// A file's modification time in nanoseconds.
fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the manifest records of one file of the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileRecord {
    name: String,
    size: u64,
    mtime_ns: i128,
    /// SHA-256 of files up to [`DIGEST_MAX_BYTES`].
    sha256: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[doc(hidden)]
pub struct Manifest {
    inputs: Inputs,
    files: Vec<FileRecord>,
}

/// Parses the text of a template's manifest (`template.json`); public for the fuzz
/// targets, which feed it arbitrary bytes.
#[doc(hidden)]
pub fn parse_manifest(text: &[u8]) -> std::result::Result<Manifest, serde_json::Error> {
    serde_json::from_slice(text)
}

/// Template failures (each one leads to a cold boot, logged).
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TemplateError {
    /// cannot read template input {0:?}
    Input(PathBuf, #[source] std::io::Error),
    /// template {0:?}
    Io(PathBuf, #[source] std::io::Error),
    /// template {0:?} is not usable: {1}
    Invalid(PathBuf, String),
}

impl From<TemplateError> for Error {
    fn from(e: TemplateError) -> Self {
        Error::Template(e)
    }
}

/// Whether templates are used for `config` and `hv` in general (for `vessel check`
/// and `vessel env`): `Ok(dir)` or why not.
pub fn status(config: &Config, hv: &dyn Hypervisor) -> std::result::Result<PathBuf, String> {
    if !config.templates.enabled {
        return Err("off (templates.enabled = false)".into());
    }
    let spec = SandboxSpec::new("probe", config);
    match hv.snapshot_blocker(&probe(config, &spec)) {
        Some(why) => Err(format!("not with the {} backend: {why}", hv.name())),
        None => Ok(config.template_dir()),
    }
}

impl Sandbox {
    /// Starts a sandbox of `spec`: restored from the template of its shape when
    /// there is a valid one, else booted cold (and, if it is the first of its shape
    /// and the backend can, made the template). See the module documentation.
    pub async fn start(config: &Config, hv: &dyn Hypervisor, spec: SandboxSpec) -> Result<Sandbox> {
        let plan = match plan(config, hv, &spec) {
            Ok(p) => p,
            Err(why) => {
                log::info!("sandbox {}: cold boot ({why})", spec.id);
                return Sandbox::boot(config, hv, spec)
                    .await?
                    .with_policy(config)
                    .await;
            }
        };
        if plan.valid {
            match Sandbox::restore_with(config, hv, spec.clone(), &plan.dir).await {
                Ok(sb) => {
                    log::info!("sandbox {}: started from template {}", spec.id, plan.key);
                    return sb.with_policy(config).await;
                }
                Err(e) => {
                    log::warn!(
                        "sandbox {}: restore from template {} failed, removing it and booting cold: {}",
                        spec.id,
                        plan.dir.display(),
                        crate::chain(&e)
                    );
                    remove(&plan.dir);
                }
            }
        }
        let id = spec.id.clone();
        let mut spec = spec;
        spec.deferred_devices = true;
        let mut sb = Sandbox::boot(config, hv, spec).await?;
        let started = Instant::now();
        match build(&sb, &plan).await {
            Ok(true) => log::info!(
                "sandbox {id}: template {} written to {} in {:?}",
                plan.key,
                plan.dir.display(),
                started.elapsed()
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "sandbox {id}: could not make template {}: {}",
                plan.dir.display(),
                crate::chain(&e)
            ),
        }
        sb.attach_deferred(config).await?;
        sb.with_policy(config).await
    }

    /// Gives the agent the configured policy (`Agent.SetPolicy`, which it takes
    /// once, before the first container). Sent after the template snapshot and
    /// after a restore: a template never holds a policy, so the key need not
    /// name one and every clone gets its own sandbox's. On error the sandbox is
    /// stopped.
    async fn with_policy(self, config: &Config) -> Result<Sandbox> {
        match self.agent().set_policy(&config.agent_policy).await {
            Ok(()) => Ok(self),
            Err(e) => {
                let id = self.id().to_string();
                if let Err(stop) = self.stop().await {
                    log::warn!(
                        "sandbox {id}: stop after SetPolicy failed: {}",
                        crate::chain(&stop)
                    );
                }
                Err(e.into())
            }
        }
    }
}

struct Plan {
    inputs: Inputs,
    /// `inputs.key()`: the template directory's name.
    key: String,
    dir: PathBuf,
    /// Whether `dir` holds a template that passed the checks.
    valid: bool,
}

/// Where the template of `spec`'s shape is and whether it is usable; `Err` says
/// why this sandbox cannot use templates at all.
fn plan(
    config: &Config,
    hv: &dyn Hypervisor,
    spec: &SandboxSpec,
) -> std::result::Result<Plan, String> {
    if !config.templates.enabled {
        return Err("templates are off: templates.enabled = false".into());
    }
    if let Some(why) = hv.snapshot_blocker(&probe(config, spec)) {
        return Err(format!("no template: {why}"));
    }
    let inputs = Inputs::of(config, hv, spec).map_err(|e| crate::chain(&e).to_string())?;
    let key = inputs.key();
    let dir = config.template_dir().join(&key);
    let valid = match check(&dir, &inputs) {
        Ok(()) => true,
        Err(TemplateError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            log::warn!("sandbox {}: {}; rebuilding it", spec.id, crate::chain(&e));
            remove(&dir);
            false
        }
    };
    Ok(Plan {
        inputs,
        key,
        dir,
        valid,
    })
}

/// A VM configuration of `spec`'s shape, to ask the backend whether it could be
/// snapshotted (no paths: nothing is started from it). Its devices are
/// deferred, as a template's are.
fn probe(config: &Config, spec: &SandboxSpec) -> VmConfig {
    VmConfig {
        id: spec.id.clone(),
        run_dir: PathBuf::new(),
        kernel: config.guest_kernel.clone(),
        initramfs: config.guest_initramfs.clone(),
        kernel_args: config.kernel_args.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        channel: config.channel,
        vsock_uds: PathBuf::new(),
        console_log: PathBuf::new(),
        log_limits: config.log_limits(),
        shared_dirs: spec.shared_dirs.clone(),
        nics: spec.nics.clone(),
        netns: None,
        cgroup: None,
        deferred_devices: true,
    }
}

/// Checks a template directory against `inputs` and its manifest.
fn check(dir: &Path, inputs: &Inputs) -> std::result::Result<(), TemplateError> {
    let invalid = |why: String| TemplateError::Invalid(dir.to_path_buf(), why);
    let meta = std::fs::symlink_metadata(dir).map_err(|e| TemplateError::Io(dir.into(), e))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    // 0700 as made; 0750 once a jailed VMM restored it (its group reads it: see
    // vessel_hypervisor::builtin::jail::grant_snapshot_read). Never writable but by us.
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o027 != 0 {
        return Err(invalid(format!(
            "not a directory of uid {me} that only it can write and others cannot read (uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| TemplateError::Io(path.clone(), e))?;
    let manifest = parse_manifest(&text).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    if &manifest.inputs != inputs {
        return Err(invalid("made from other inputs".into()));
    }
    let now = records(dir)?;
    if now != manifest.files {
        return Err(invalid("its files changed since it was written".into()));
    }
    Ok(())
}

/// What the manifest records of every file in `dir` but the manifest, by name.
fn records(dir: &Path) -> std::result::Result<Vec<FileRecord>, TemplateError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| TemplateError::Io(p, e)
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        let path = entry.path();
        let m = std::fs::symlink_metadata(&path).map_err(io(&path))?;
        if !m.is_file() {
            return Err(TemplateError::Invalid(
                dir.into(),
                format!("{name} is not a regular file"),
            ));
        }
        let sha256 = if m.size() <= DIGEST_MAX_BYTES {
            Some(hex(&Sha256::digest(
                std::fs::read(&path).map_err(io(&path))?,
            )))
        } else {
            None
        };
        out.push(FileRecord {
            name,
            size: m.size(),
            mtime_ns: mtime_ns(&m),
            sha256,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Snapshots `sb` into the template directory unless another sandbox is making
/// it (a lock file beside it). Returns whether this call wrote it.
async fn build(sb: &Sandbox, plan: &Plan) -> std::result::Result<bool, Error> {
    let root = plan.dir.parent().expect("template dir has a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| TemplateError::Io(root.into(), e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| TemplateError::Io(root.into(), e))?;
    let key = &plan.key;
    let lock_path = root.join(format!(".{key}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| TemplateError::Io(lock_path.clone(), e))?;
    // SAFETY: flock on an fd `lock` owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        log::info!("template {key} is being made by another sandbox");
        return Ok(false);
    }
    if plan.dir.exists() {
        return Ok(false); // made while this sandbox booted
    }
    let tmp = root.join(format!(".{key}.tmp-{}", std::process::id()));
    remove(&tmp);
    let res = async {
        sb.snapshot(&tmp).await?;
        let manifest = Manifest {
            inputs: plan.inputs.clone(),
            files: records(&tmp)?,
        };
        let path = tmp.join(MANIFEST);
        let mut f = std::fs::File::create(&path).map_err(|e| TemplateError::Io(path.clone(), e))?;
        f.write_all(&serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))
            .and_then(|()| f.sync_all())
            .map_err(|e| TemplateError::Io(path.clone(), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| TemplateError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, &plan.dir).map_err(|e| TemplateError::Io(plan.dir.clone(), e))?;
        Ok::<_, Error>(())
    }
    .await;
    if res.is_err() {
        remove(&tmp);
    }
    drop(lock);
    res.map(|()| true)
}

fn remove(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Inputs {
        let f = dir.join("k");
        std::fs::write(&f, b"kernel").unwrap();
        let id = FileId::of(&f).unwrap();
        Inputs {
            runtime_version: "1".into(),
            backend: "builtin (kvm)".into(),
            hypervisor_binary: id.clone(),
            kernel: id.clone(),
            initramfs: id,
            kernel_args: vec![],
            vcpus: 1,
            memory_mib: 256,
            channel: "vsock".into(),
            shares: vec![("vessel".into(), false)],
            nics: vec![Some(1500)],
        }
    }

    fn write_template(dir: &Path, inputs: &Inputs) {
        std::fs::DirBuilder::new().mode(0o700).create(dir).unwrap();
        std::fs::write(dir.join("state.json"), b"{}").unwrap();
        let manifest = Manifest {
            inputs: inputs.clone(),
            files: records(dir).unwrap(),
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    #[test]
    fn a_template_is_used_only_while_its_inputs_and_files_are_unchanged() {
        let tmp = tempfile::tempdir().unwrap();
        let i = inputs(tmp.path());
        let t = tmp.path().join("t");
        write_template(&t, &i);
        check(&t, &i).unwrap();

        // Another shape.
        let mut other = i.clone();
        other.memory_mib = 512;
        assert_ne!(other.key(), i.key());
        assert!(matches!(check(&t, &other), Err(TemplateError::Invalid(..))));

        // A file rewritten (same size, other content).
        std::fs::write(t.join("state.json"), b"[]").unwrap();
        let e = check(&t, &i).unwrap_err();
        assert!(e.to_string().contains("files changed"), "{e}");
        write_template(&tmp.path().join("t2"), &i);

        // Readable by the jail's group (after a jailed restore): used.
        let t2 = tmp.path().join("t2");
        std::fs::set_permissions(&t2, std::fs::Permissions::from_mode(0o750)).unwrap();
        check(&t2, &i).unwrap();
        // Readable by others, or writable by the group: not used.
        for mode in [0o755, 0o770] {
            std::fs::set_permissions(&t2, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check(&t2, &i).unwrap_err();
            assert!(
                e.to_string().contains("others cannot read"),
                "{mode:o}: {e}"
            );
        }

        // Missing: NotFound (no warning, just built).
        assert!(matches!(
            check(&tmp.path().join("none"), &i),
            Err(TemplateError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
    }

    #[test]
    fn a_rewritten_kernel_changes_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("vmlinux");
        std::fs::write(&f, b"one").unwrap();
        let a = FileId::of(&f).unwrap();
        // Same size, rewritten in place, with its old modification time put back:
        // the change time still moves on (the clock ticks past the first write's).
        let old = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, b"two").unwrap();
        let file = std::fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        let moved = FileId::of(&f).unwrap();
        assert_ne!(a, moved);
        file.set_modified(old).unwrap();
        let b = FileId::of(&f).unwrap();
        assert_eq!(a.mtime_ns, b.mtime_ns);
        assert_ne!(a, b);
    }
}
