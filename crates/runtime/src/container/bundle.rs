//! An OCI bundle: `config.json` plus a root file system, checked before any
//! process, mount or VM exists.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::{ContainerError, Result};
use crate::Config;

/// A bundle whose config.json parsed and whose rootfs exists.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    /// config.json as parsed; unknown fields are kept for the guest.
    pub spec: Value,
    /// Host path of the root file system.
    pub rootfs: PathBuf,
}

/// VM size derived from `linux.resources`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl Bundle {
    /// Reads and validates `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let bad = |reason: String| ContainerError::BadBundle {
            bundle: dir.display().to_string(),
            reason,
        };
        let dir = std::path::absolute(dir).map_err(|e| bad(e.to_string()))?;
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| {
            bad(format!(
                "cannot read {}: {e} (a bundle needs config.json; `vessel spec` writes one)",
                path.display()
            ))
        })?;
        Bundle::parse(dir, &text)
    }

    /// Validates `text`, the config.json of the bundle in `dir` (an absolute path).
    pub fn parse(dir: PathBuf, text: &[u8]) -> Result<Bundle> {
        let name = dir.display().to_string();
        let bad = |reason: String| ContainerError::BadBundle {
            bundle: name.clone(),
            reason,
        };
        let spec: Value = serde_json::from_slice(text)
            .map_err(|e| bad(format!("config.json is not valid JSON: {e}")))?;
        if !spec.is_object() {
            return Err(bad("config.json must be a JSON object".into()));
        }
        let version = spec["ociVersion"].as_str().unwrap_or_default();
        if !is_supported_version(version) {
            return Err(bad(format!(
                "unsupported ociVersion {:?}: supported are 1.0.x, 1.1.x and 1.2.x",
                spec["ociVersion"]
            )));
        }
        let root = spec["root"]["path"]
            .as_str()
            .ok_or_else(|| bad("config.json has no root.path".into()))?;
        let rootfs = dir.join(root);
        if !rootfs.is_dir() {
            return Err(bad(format!(
                "root file system {} does not exist or is not a directory",
                rootfs.display()
            )));
        }
        let bundle = Bundle { dir, spec, rootfs };
        if let Some(process) = bundle.spec.get("process") {
            bundle.check_process(process).map_err(bad)?;
        }
        Ok(bundle)
    }

    /// Checks that a process can start: args present and args[0] found in the
    /// rootfs (directly or through the process's PATH), as runc does at create.
    pub fn check_process(&self, process: &Value) -> std::result::Result<(), String> {
        let arg0 = process["args"][0]
            .as_str()
            .filter(|a| !a.is_empty())
            .ok_or("process.args must name a program")?;
        if self.under_mount(arg0) {
            return Ok(()); // lives on a mount: only the guest can tell
        }
        let found = if arg0.contains('/') {
            let cwd = process["cwd"].as_str().unwrap_or("/");
            resolve_in_root(&self.rootfs, &Path::new(cwd).join(arg0)).is_some_and(|p| p.is_file())
        } else {
            let path_var = process["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .find_map(|e| e.strip_prefix("PATH="))
                .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
            path_var.split(':').any(|d| {
                resolve_in_root(&self.rootfs, &Path::new(d).join(arg0)).is_some_and(|p| p.is_file())
            })
        };
        if found {
            Ok(())
        } else {
            Err(format!(
                "process binary {arg0:?} not found in the root file system {}",
                self.rootfs.display()
            ))
        }
    }

    fn under_mount(&self, path: &str) -> bool {
        self.spec["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| {
                m["destination"]
                    .as_str()
                    .is_some_and(|d| d != "/" && Path::new(path).starts_with(d))
            })
    }

    pub fn annotations(&self) -> std::collections::BTreeMap<String, String> {
        self.spec["annotations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    }

    pub fn terminal(&self) -> bool {
        self.spec["process"]["terminal"].as_bool().unwrap_or(false)
    }

    /// The VM size for this bundle (see [`vm_size`]).
    pub fn vm_size(&self, config: &Config) -> VmSize {
        vm_size(&self.spec, config)
    }
}

/// Explicit VM size annotations (for pods: containerd's `pod_annotations`
/// must pass `io.vessel.*` through).
pub const VCPUS_ANNOTATION: &str = "io.vessel.vm.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.vessel.vm.memory_mib";
/// Pod-level resources CRI puts on the sandbox (containerd >= 1.7).
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// Bounds that keep a typo from asking the hypervisor for something absurd.
const MIN_MEMORY_MIB: u32 = 64;
const MAX_MEMORY_MIB: u32 = 256 * 1024;

/// The VM size of a sandbox from its (first) container's spec, in order of
/// precedence:
/// - `io.vessel.vm.vcpus` / `io.vessel.vm.memory_mib`: explicit;
/// - the memory limit (CRI's `sandbox-memory` annotation, else
///   `linux.resources.memory.limit`) plus `memory_overhead_mib`, and the CPU
///   quota / period (CRI's `sandbox-cpu-*` annotations, else
///   `linux.resources.cpu`) rounded up;
/// - otherwise `default_vcpus` / `default_memory_mib`.
///
/// vCPUs are clamped to `1..=max_vcpus`, memory to 64 MiB..=256 GiB.
pub fn vm_size(spec: &Value, config: &Config) -> VmSize {
    let ann = |k: &str| {
        spec["annotations"][k]
            .as_str()
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let res = &spec["linux"]["resources"];
    let limit = ann(CRI_MEMORY).or_else(|| res["memory"]["limit"].as_i64());
    let mut memory_mib = match limit {
        Some(limit) if limit > 0 => {
            let mib = (limit as u64).div_ceil(1 << 20);
            u32::try_from(mib + u64::from(config.memory_overhead_mib)).unwrap_or(u32::MAX)
        }
        _ => config.default_memory_mib,
    };
    let quota = ann(CRI_CPU_QUOTA).or_else(|| res["cpu"]["quota"].as_i64());
    let period = ann(CRI_CPU_PERIOD).or_else(|| res["cpu"]["period"].as_i64());
    let mut vcpus = match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            u32::try_from((q as u64).div_ceil(p as u64)).unwrap_or(u32::MAX)
        }
        _ => config.default_vcpus,
    };
    if let Some(v) = ann(VCPUS_ANNOTATION).filter(|v| *v > 0) {
        vcpus = u32::try_from(v).unwrap_or(u32::MAX);
    }
    if let Some(m) = ann(MEMORY_ANNOTATION).filter(|v| *v > 0) {
        memory_mib = u32::try_from(m).unwrap_or(u32::MAX);
    }
    VmSize {
        vcpus: vcpus.clamp(1, config.max_vcpus.max(1)),
        memory_mib: memory_mib.clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB),
    }
}

fn is_supported_version(v: &str) -> bool {
    let mut parts = v.splitn(3, '.');
    matches!(
        (parts.next(), parts.next()),
        (Some("1"), Some("0" | "1" | "2"))
    )
}

/// Resolves `path` inside `root` as if `root` were `/`: symlinks (absolute
/// or relative) cannot leave `root`. Returns the host path, or `None` when a
/// component is missing or there are more than 40 links.
pub fn resolve_in_root(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            done.pop();
            continue;
        }
        let host = done
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&c);
        let meta = std::fs::symlink_metadata(&host).ok()?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = std::fs::read_link(&host).ok()?;
            if target.is_absolute() {
                done.clear();
            }
            for tc in target.components().rev() {
                match tc {
                    Component::Normal(n) => todo.push(n.to_os_string()),
                    Component::ParentDir => todo.push("..".into()),
                    _ => {}
                }
            }
        } else {
            done.push(c);
        }
    }
    Some(done.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn bundle(config: &str) -> (tempfile::TempDir, Result<Bundle>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("rootfs/bin")).unwrap();
        std::fs::write(d.path().join("rootfs/bin/busybox"), b"").unwrap();
        symlink("/bin/busybox", d.path().join("rootfs/bin/sh")).unwrap();
        std::fs::write(d.path().join("config.json"), config).unwrap();
        let b = Bundle::load(d.path());
        (d, b)
    }

    #[test]
    fn validates() {
        let ok = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["sh"],"env":["PATH=/bin"]}}"#;
        let (_d, b) = bundle(ok);
        b.unwrap();
        let abs =
            r#"{"ociVersion":"1.2.0","root":{"path":"rootfs"},"process":{"args":["/bin/sh"]}}"#;
        bundle(abs).1.unwrap();
        for (cfg, want) in [
            ("{", "not valid JSON"),
            (
                r#"{"ociVersion":"9.9","root":{"path":"rootfs"}}"#,
                "ociVersion",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"nope"}}"#,
                "does not exist",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["nosuch"]}}"#,
                "not found",
            ),
            (
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":[]}}"#,
                "args",
            ),
        ] {
            let e = bundle(cfg).1.unwrap_err().to_string();
            assert!(e.contains(want), "{cfg}: {e}");
        }
        let e = Bundle::load(Path::new("/nonexistent-bundle")).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn symlinks_stay_inside() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir(r.join("bin")).unwrap();
        std::fs::create_dir(r.join("etc")).unwrap();
        symlink("../../../../etc", r.join("bin/up")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("/bin/up")),
            Some(r.join("etc"))
        );
        symlink("loop", r.join("loop")).unwrap();
        assert_eq!(resolve_in_root(r, Path::new("/loop")), None);
    }

    #[test]
    fn sizing() {
        let c = Config::default();
        let (_d, b) = bundle(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"resources":{"memory":{"limit":33554432},"cpu":{"quota":150000,"period":100000}}}}"#,
        );
        let s = b.unwrap().vm_size(&c);
        assert_eq!(s.memory_mib, 32 + c.memory_overhead_mib);
        assert_eq!(s.vcpus, 2.min(c.max_vcpus));
        let (_d, b) = bundle(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#);
        let s = b.unwrap().vm_size(&c);
        assert_eq!(
            (s.vcpus, s.memory_mib),
            (c.default_vcpus, c.default_memory_mib)
        );
    }

    #[test]
    fn pod_sizing_from_cri_and_explicit_annotations() {
        let c = Config {
            max_vcpus: 4,
            memory_overhead_mib: 100,
            ..Config::default()
        };
        let spec = serde_json::json!({"annotations": {
            "io.kubernetes.cri.sandbox-memory": "536870912",
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"},
            "linux": {"resources": {"memory": {"limit": 1}}}});
        assert_eq!(
            vm_size(&spec, &c),
            VmSize {
                vcpus: 2,
                memory_mib: 612
            }
        );
        let spec = serde_json::json!({"annotations": {"io.vessel.vm.vcpus": "9999",
            "io.vessel.vm.memory_mib": "1", "io.kubernetes.cri.sandbox-memory": "garbage"}});
        assert_eq!(
            vm_size(&spec, &c),
            VmSize {
                vcpus: 4,
                memory_mib: 64
            }
        );
    }
}
