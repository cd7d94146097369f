//! The network namespace a sandbox lives in, and the pod's network hook.
//!
//! The spec decides (OCI `linux.namespaces`, type `network`):
//! - no network entry: the caller's namespace; the VM has loopback only;
//! - an entry with a `path`: that namespace (made by CNI, podman, docker, a
//!   person), which must exist;
//! - an entry without a path: a new, empty namespace made by the runtime,
//!   kept by a bind mount at [`owned_netns_path`] and removed on delete.
//!   `ctr run --cni` and nerdctl add interfaces to it after create, through
//!   the task pid, which is why the VMM (and the CLI's supervisor) run in it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{netns, NetError};

/// The network namespace a spec asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRequest {
    /// No network namespace entry: the caller's own.
    Caller,
    /// An existing namespace, by path.
    Path(PathBuf),
    /// A new namespace, made by the runtime.
    New,
}

/// Reads the spec's network namespace entry.
pub fn netns_request(spec: &serde_json::Value) -> Result<NetnsRequest, NetError> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else {
        return Ok(NetnsRequest::Caller);
    };
    let list = namespaces
        .as_array()
        .ok_or_else(|| NetError::Spec("linux.namespaces is not a list".into()))?;
    let Some(ns) = list
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))
    else {
        return Ok(NetnsRequest::Caller);
    };
    match ns.get("path") {
        None | Some(serde_json::Value::Null) => Ok(NetnsRequest::New),
        Some(serde_json::Value::String(p)) if p.is_empty() => Ok(NetnsRequest::New),
        Some(serde_json::Value::String(p)) if Path::new(p).is_absolute() => {
            Ok(NetnsRequest::Path(PathBuf::from(p)))
        }
        Some(other) => Err(NetError::Spec(format!(
            "network namespace path {other} is not an absolute path"
        ))),
    }
}

/// Where the runtime keeps the namespace it made for sandbox `id`.
pub fn owned_netns_path(state_root: &Path, id: &str) -> PathBuf {
    state_root.join("netns").join(id)
}

/// Removes the namespace the runtime made for sandbox `id`, if any
/// (idempotent: delete, failed creates, cleanup after a crash).
pub fn remove_owned_netns(state_root: &Path, id: &str) {
    if vessel_protocol::id::valid_id(id) {
        if let Err(e) = netns::remove(&owned_netns_path(state_root, id)) {
            log::error!("sandbox {id}: {}", crate::chain(&e));
        }
    }
}

/// The open network namespace of a sandbox.
#[derive(Debug)]
pub struct SandboxNetns {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    /// Made by the runtime: removed by [`SandboxNetns::remove`].
    owned: bool,
}

impl SandboxNetns {
    /// Opens the namespace `spec` names, or makes a new one for sandbox `id`
    /// under `state_root`; `None` when the spec names none.
    pub fn for_spec(
        spec: &serde_json::Value,
        state_root: &Path,
        id: &str,
    ) -> Result<Option<SandboxNetns>, NetError> {
        Self::open(spec, state_root, id, true)
    }

    /// As [`SandboxNetns::for_spec`], for a process that `create` started
    /// after it made the new namespace (the CLI's supervisor): opens it.
    pub fn made_for_spec(
        spec: &serde_json::Value,
        state_root: &Path,
        id: &str,
    ) -> Result<Option<SandboxNetns>, NetError> {
        Self::open(spec, state_root, id, false)
    }

    fn open(
        spec: &serde_json::Value,
        state_root: &Path,
        id: &str,
        make: bool,
    ) -> Result<Option<SandboxNetns>, NetError> {
        let (path, owned) = match netns_request(spec)? {
            NetnsRequest::Caller => return Ok(None),
            NetnsRequest::Path(p) => (p, false),
            NetnsRequest::New => {
                let p = owned_netns_path(state_root, id);
                if make {
                    netns::create(&p)?;
                }
                (p, true)
            }
        };
        match netns::open(&path) {
            Ok(fd) => Ok(Some(SandboxNetns {
                path,
                fd: Arc::new(fd),
                owned,
            })),
            Err(e) => {
                if owned && make {
                    let _ = netns::remove(&path);
                }
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace (for the VMM to enter).
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// Removes the namespace if the runtime made it (its processes keep it
    /// until they exit).
    pub fn remove(&self) {
        if self.owned {
            if let Err(e) = netns::remove(&self.path) {
                log::error!("{}", crate::chain(&e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_from_spec() {
        let spec = |ns: serde_json::Value| json!({"linux": {"namespaces": ns}});
        assert_eq!(netns_request(&json!({})).unwrap(), NetnsRequest::Caller);
        assert_eq!(
            netns_request(&spec(json!([{"type": "pid"}]))).unwrap(),
            NetnsRequest::Caller
        );
        assert_eq!(
            netns_request(&spec(json!([{"type": "pid"}, {"type": "network"}]))).unwrap(),
            NetnsRequest::New
        );
        assert_eq!(
            netns_request(&spec(json!([{"type": "network", "path": ""}]))).unwrap(),
            NetnsRequest::New
        );
        assert_eq!(
            netns_request(&spec(
                json!([{"type": "network", "path": "/var/run/netns/a"}])
            ))
            .unwrap(),
            NetnsRequest::Path(PathBuf::from("/var/run/netns/a"))
        );
        assert!(netns_request(&spec(json!([{"type": "network", "path": "rel"}]))).is_err());
        assert!(netns_request(&spec(json!([{"type": "network", "path": 3}]))).is_err());
        assert!(netns_request(&spec(json!({}))).is_err());
    }

    #[test]
    fn a_new_namespace_is_made_entered_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = json!({"linux": {"namespaces": [{"type": "network"}]}});
        let ns = SandboxNetns::for_spec(&spec, dir.path(), "c1")
            .unwrap()
            .unwrap();
        let path = owned_netns_path(dir.path(), "c1");
        assert_eq!(ns.path(), path);
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        assert_ne!(ino(&path), ino(Path::new("/proc/self/ns/net")));
        // A second sandbox of the same id cannot take it over.
        assert!(SandboxNetns::for_spec(&spec, dir.path(), "c1").is_err());
        ns.remove();
        assert!(!path.exists());
        remove_owned_netns(dir.path(), "c1");
    }
}
