//! What the agent checks in a request before it acts on it: ids, guest paths, sizes.
//! Pure, so that the agent's service calls them first thing and the fuzz targets reach
//! them on arbitrary bytes. State checks (does the container exist, is it running) and
//! the JSON documents a request carries (spec, process, resources: parsed by the agent
//! with oci-spec) come after these, in the agent.

use std::path::{Component, Path, PathBuf};

use crate::agent::{
    CreateContainerRequest, ExecProcessRequest, ReseedRandomRequest, SetTimeRequest,
    SignalProcessRequest,
};
use crate::id::valid_id;

/// Bytes of host entropy used per ReseedRandom call; the rest is ignored.
pub const MAX_SEED: usize = 4096;
/// Most storages one CreateContainer may mount.
pub const MAX_STORAGES: usize = 64;

/// Why the agent refuses a request (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
pub enum RequestError {
    /// invalid {field} {value:?}: expected [A-Za-z0-9][A-Za-z0-9_.-]*, at most 64 bytes
    Id { field: &'static str, value: String },
    /// storage mount point {0:?} must be an absolute path without `..`
    MountPoint(String),
    /// {0} storages, at most 64
    TooManyStorages(usize),
    /// signal with all=true applies to the init process: exec_id must be empty
    SignalAllWithExec,
    /// nanos {0} out of range
    Nanos(u32),
}

fn id(field: &'static str, value: &str) -> Result<(), RequestError> {
    if valid_id(value) {
        Ok(())
    } else {
        Err(RequestError::Id {
            field,
            value: value.to_string(),
        })
    }
}

/// A storage's guest mount point: absolute, no `..`.
pub fn mount_point(p: &str) -> Result<PathBuf, RequestError> {
    let target = Path::new(p);
    if !target.is_absolute() || target.components().any(|c| c == Component::ParentDir) {
        return Err(RequestError::MountPoint(p.to_string()));
    }
    Ok(target.to_path_buf())
}

/// CreateContainer: the container id, the sandbox id when one is named, the storages'
/// count and mount points.
pub fn create(req: &CreateContainerRequest) -> Result<(), RequestError> {
    id("container id", &req.container_id)?;
    if !req.share_namespaces_with.is_empty() {
        id("sandbox container id", &req.share_namespaces_with)?;
    }
    if req.storages.len() > MAX_STORAGES {
        return Err(RequestError::TooManyStorages(req.storages.len()));
    }
    for s in &req.storages {
        mount_point(&s.mount_point)?;
    }
    Ok(())
}

/// ExecProcess: the exec id.
pub fn exec(req: &ExecProcessRequest) -> Result<(), RequestError> {
    id("exec id", &req.exec_id)
}

/// SignalProcess: `all` signals the init process's whole container, so no exec id.
pub fn signal(req: &SignalProcessRequest) -> Result<(), RequestError> {
    if req.all && !req.exec_id.is_empty() {
        return Err(RequestError::SignalAllWithExec);
    }
    Ok(())
}

/// SetTime: nanoseconds below one second.
pub fn set_time(req: &SetTimeRequest) -> Result<(), RequestError> {
    if req.nanos >= 1_000_000_000 {
        return Err(RequestError::Nanos(req.nanos));
    }
    Ok(())
}

/// ReseedRandom: the entropy used (at most [`MAX_SEED`] bytes).
pub fn seed(req: &ReseedRandomRequest) -> &[u8] {
    &req.data[..req.data.len().min(MAX_SEED)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::Storage;

    #[test]
    fn refuses_bad_ids_mount_points_and_times() {
        let mut req = CreateContainerRequest::new();
        req.container_id = "c1".into();
        assert_eq!(create(&req), Ok(()));
        req.share_namespaces_with = "../x".into();
        assert!(matches!(create(&req), Err(RequestError::Id { .. })));
        req.share_namespaces_with = "sandbox".into();
        let mut s = Storage::new();
        s.mount_point = "/run/vessel/shared/../../etc".into();
        req.storages.push(s);
        assert_eq!(
            create(&req),
            Err(RequestError::MountPoint(
                "/run/vessel/shared/../../etc".into()
            ))
        );
        req.storages[0].mount_point = "relative".into();
        assert!(create(&req).is_err());
        req.storages[0].mount_point = "/run/vessel/shared".into();
        assert_eq!(create(&req), Ok(()));
        req.storages = vec![req.storages[0].clone(); MAX_STORAGES + 1];
        assert_eq!(
            create(&req),
            Err(RequestError::TooManyStorages(MAX_STORAGES + 1))
        );

        let t = SetTimeRequest {
            nanos: 1_000_000_000,
            ..Default::default()
        };
        assert_eq!(set_time(&t), Err(RequestError::Nanos(1_000_000_000)));
        let s = SignalProcessRequest {
            all: true,
            exec_id: "e1".into(),
            ..Default::default()
        };
        assert_eq!(signal(&s), Err(RequestError::SignalAllWithExec));
        let r = ReseedRandomRequest {
            data: vec![0; MAX_SEED + 10],
            ..Default::default()
        };
        assert_eq!(seed(&r).len(), MAX_SEED);
    }
}
