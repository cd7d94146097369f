//! Test doubles of the runtime's own traits, for unit tests without root,
//! QEMU or KVM (behind the `test-fakes` feature; the fake hypervisor, VM and
//! agent are `vessel_testutil::fake`'s): a [`FakeStaging`] that records what
//! it stages and never mounts, and a [`FakeNetwork`] that records its calls.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use vessel_hypervisor::SharedDir;

use crate::agent::AgentClient;
use crate::pod::{MakeStaging, PodError, PodNetwork, PodStaging};
use crate::sandbox::SandboxSpec;

/// A pod staging that records the containers it holds and never mounts.
/// Clones share their record.
#[derive(Clone, Default)]
pub struct FakeStaging {
    staged: Arc<Mutex<Vec<String>>>,
    removed: Arc<Mutex<bool>>,
}

impl FakeStaging {
    /// The containers staged and not unstaged.
    pub fn staged(&self) -> Vec<String> {
        self.staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the whole share was removed.
    pub fn removed(&self) -> bool {
        *self.removed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every pod's staging this one (for [`crate::pod::PodSlot`] and
    /// front-ends that take a [`MakeStaging`]).
    pub fn maker(&self) -> MakeStaging {
        let staging = self.clone();
        Box::new(move |_, _| Ok(Box::new(staging.clone())))
    }
}

impl PodStaging for FakeStaging {
    fn shared_dir(&self) -> SharedDir {
        SharedDir {
            tag: "vessel".into(),
            host_path: PathBuf::from("/nonexistent"),
            read_only: false,
        }
    }

    fn stage(&self, id: &str, _rootfs: &Path, spec: &mut Value) -> crate::container::Result<()> {
        spec["root"]["path"] = format!("/run/vessel/shared/{id}/rootfs").into();
        self.staged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_string());
        Ok(())
    }

    fn unstage(&self, id: &str) -> crate::container::Result<()> {
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        staged.retain(|s| s != id);
        Ok(())
    }

    fn remove(&self) -> crate::container::Result<()> {
        *self.removed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }
}

/// A pod network that records its calls; `configure` fails if told to.
#[derive(Clone, Default)]
pub struct FakeNetwork {
    calls: Arc<Mutex<Vec<&'static str>>>,
    fail_configure: bool,
}

impl FakeNetwork {
    /// A network whose `configure` fails.
    pub fn failing_configure() -> Self {
        FakeNetwork {
            fail_configure: true,
            ..FakeNetwork::default()
        }
    }

    /// The hooks called so far, in order (`attach`, `configure`, ...).
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, call: &'static str) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

#[async_trait::async_trait]
impl PodNetwork for FakeNetwork {
    async fn attach(&mut self, _vm: &mut SandboxSpec) -> crate::pod::Result<()> {
        self.record("attach");
        Ok(())
    }

    async fn configure(&mut self, _agent: &AgentClient) -> crate::pod::Result<()> {
        self.record("configure");
        if self.fail_configure {
            return Err(PodError::Invalid("no route".into()));
        }
        Ok(())
    }

    async fn detach(&mut self) {
        self.record("detach");
    }
}
