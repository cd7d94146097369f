//! How containers' files reach a pod's VM: the [`PodStaging`] of a pod and
//! what makes it.

use std::path::Path;

use serde_json::Value;
use vessel_hypervisor::SharedDir;

use super::{share_dir, Result};
use crate::container::share::{self, PodShare, Staging};
use crate::container::ContainerError;
use crate::Config;

/// Where containers' files reach the VM: one virtio-fs share, one
/// subdirectory per container ([`PodShare`]; tests use one that does not
/// mount). A staging that cannot be cleaned is left in place, never removed
/// recursively.
pub trait PodStaging: Send + Sync {
    /// The share for the VM.
    fn shared_dir(&self) -> SharedDir;
    /// Stages container `id` and rewrites `spec` to its guest paths.
    fn stage(&self, id: &str, rootfs: &Path, spec: &mut Value) -> crate::container::Result<()>;
    fn unstage(&self, id: &str) -> crate::container::Result<()>;
    /// Removes the whole share.
    fn remove(&self) -> crate::container::Result<()>;
}

impl PodStaging for PodShare {
    fn shared_dir(&self) -> SharedDir {
        PodShare::shared_dir(self)
    }
    fn stage(&self, id: &str, rootfs: &Path, spec: &mut Value) -> crate::container::Result<()> {
        PodShare::stage(self, id, rootfs, spec)
    }
    fn unstage(&self, id: &str) -> crate::container::Result<()> {
        PodShare::unstage(self, id)
    }
    fn remove(&self) -> crate::container::Result<()> {
        PodShare::remove(self)
    }
}

/// A pod of one whose container was staged before its VM booted (the CLI's
/// [`Staging::prepare`] at `<container dir>/shared`): staging that container
/// again is a no-op, any other is refused.
impl PodStaging for Staging {
    fn shared_dir(&self) -> SharedDir {
        Staging::shared_dir(self)
    }
    fn stage(&self, id: &str, _rootfs: &Path, _spec: &mut Value) -> crate::container::Result<()> {
        if self.container_dir().file_name() == Some(std::ffi::OsStr::new(id)) {
            return Ok(());
        }
        Err(ContainerError::Exists(format!(
            "a staging for one container holds {}, not {id}",
            self.container_dir().display()
        )))
    }
    fn unstage(&self, _id: &str) -> crate::container::Result<()> {
        share::cleanup(self.container_dir())
    }
    fn remove(&self) -> crate::container::Result<()> {
        share::cleanup(self.container_dir())
    }
}

/// Makes the staging of a pod named `id` (a front-end serving one pod).
pub type StagingFn = dyn Fn(&Config, &str) -> Result<Box<dyn PodStaging>> + Send + Sync;
/// See [`StagingFn`].
pub type MakeStaging = Box<StagingFn>;

/// The shim's staging: a [`PodShare`] at `<state_root>/shared/<id>`.
pub fn state_root_staging() -> MakeStaging {
    Box::new(state_root_share)
}

pub(super) fn state_root_share(config: &Config, id: &str) -> Result<Box<dyn PodStaging>> {
    Ok(Box::new(PodShare::create(&share_dir(config, id))?))
}
