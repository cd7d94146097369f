//! The network of an OCI bundle's network namespace as a pod's
//! [`crate::pod::PodNetwork`] hook: taps wired before the VM boots, the
//! guest's addresses and routes set through its agent, the wiring removed
//! after the VM stopped.

use std::path::PathBuf;

use async_trait::async_trait;

use super::PodNetwork as Wiring;
use crate::agent::AgentClient;
use crate::pod::{self, PodNetwork};
use crate::sandbox::SandboxSpec;

/// The network namespace at `netns`, wired on [`PodNetwork::attach`].
pub struct NetnsNetwork {
    netns: PathBuf,
    wiring: Option<Wiring>,
}

impl NetnsNetwork {
    /// The hook for the namespace an OCI spec names, if it names one.
    pub fn of_spec(spec: &serde_json::Value) -> pod::Result<Option<Box<dyn PodNetwork>>> {
        Ok(super::netns_path(spec)?.map(|netns| {
            Box::new(NetnsNetwork {
                netns,
                wiring: None,
            }) as Box<dyn PodNetwork>
        }))
    }
}

#[async_trait]
impl PodNetwork for NetnsNetwork {
    async fn attach(&mut self, vm: &mut SandboxSpec) -> pod::Result<()> {
        let wiring = Wiring::attach(&self.netns).await?;
        vm.nics.extend(wiring.nics());
        self.wiring = Some(wiring);
        Ok(())
    }

    async fn configure(&mut self, agent: &AgentClient) -> pod::Result<()> {
        if let Some(w) = &self.wiring {
            agent.set_network(w.guest_network()).await?;
        }
        Ok(())
    }

    async fn detach(&mut self) {
        if let Some(mut w) = self.wiring.take() {
            w.detach().await;
        }
    }
}
