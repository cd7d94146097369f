//! The network of an OCI bundle's network namespace as a pod's
//! [`crate::pod::PodNetwork`] hook: the VMM runs in the namespace (see
//! [`super::sandbox`]), taps are wired before the VM boots, the guest's
//! addresses and routes set through its agent, an interface added before
//! start is wired then, and the wiring (and a namespace the runtime made)
//! removed after the VM stopped.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{record, PodNetwork as Wiring, SandboxNetns};
use crate::agent::AgentClient;
use crate::pod::{self, PodNetwork};
use crate::sandbox::SandboxSpec;

/// A sandbox's network namespace, wired on [`PodNetwork::attach`].
pub struct NetnsNetwork {
    netns: SandboxNetns,
    wiring: Option<Wiring>,
    /// Where the wiring is recorded while it exists ([`record`]).
    record: PathBuf,
}

impl NetnsNetwork {
    /// The hook for the namespace an OCI spec names, if it names one; a
    /// new namespace is made for sandbox `id` under `state_root`.
    pub fn of_spec(
        spec: &serde_json::Value,
        state_root: &Path,
        id: &str,
    ) -> pod::Result<Option<Box<dyn PodNetwork>>> {
        let record = record::record_path(state_root, id);
        Ok(SandboxNetns::for_spec(spec, state_root, id)?.map(|ns| Self::boxed(ns, record)))
    }

    /// As [`NetnsNetwork::of_spec`] in a process that `create` started
    /// after making the new namespace (see [`SandboxNetns::made_for_spec`]).
    pub fn made_for_spec(
        spec: &serde_json::Value,
        state_root: &Path,
        id: &str,
    ) -> pod::Result<Option<Box<dyn PodNetwork>>> {
        let record = record::record_path(state_root, id);
        Ok(SandboxNetns::made_for_spec(spec, state_root, id)?.map(|ns| Self::boxed(ns, record)))
    }

    fn boxed(netns: SandboxNetns, record: PathBuf) -> Box<dyn PodNetwork> {
        Box::new(NetnsNetwork {
            netns,
            wiring: None,
            record,
        })
    }

    /// Records the wiring before anything relies on it; on failure the
    /// caller's error path detaches (a wiring nobody could undo after a
    /// crash is not kept).
    fn save_record(&self) -> pod::Result<()> {
        if let Some(w) = &self.wiring {
            w.record()
                .save(&self.record)
                .map_err(|source| pod::PodError::Io {
                    path: self.record.display().to_string(),
                    source,
                })?;
        }
        Ok(())
    }
}

#[async_trait]
impl PodNetwork for NetnsNetwork {
    async fn attach(&mut self, vm: &mut SandboxSpec) -> pod::Result<()> {
        vm.netns = Some(self.netns.fd().clone());
        let wiring = Wiring::attach(self.netns.path()).await?;
        vm.nics.extend(wiring.nics());
        self.wiring = Some(wiring);
        self.save_record()
    }

    fn restored(&mut self, device_macs: Vec<[u8; 6]>) {
        if let Some(w) = self.wiring.as_mut() {
            w.set_device_macs(device_macs);
        }
    }

    async fn configure(&mut self, agent: &AgentClient) -> pod::Result<()> {
        match &self.wiring {
            Some(w) if !w.guest_network().interfaces.is_empty() => {
                Ok(agent.set_network(w.guest_network()).await?)
            }
            _ => Ok(()),
        }
    }

    async fn start(&mut self, agent: &AgentClient) -> pod::Result<()> {
        if let Some(w) = self.wiring.as_mut() {
            let guest = w.wire_new_links().await?.cloned();
            self.save_record()?;
            if let Some(guest) = guest {
                agent.set_network(&guest).await?;
            }
        }
        Ok(())
    }

    async fn detach(&mut self) {
        if let Some(mut w) = self.wiring.take() {
            w.detach().await;
        }
        if let Err(e) = std::fs::remove_file(&self.record) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove {}: {e}", self.record.display());
            }
        }
        self.netns.remove();
    }
}
