//! The pod of a front-end that serves one pod (the shim).

use tokio::sync::mpsc;
use vessel_hypervisor::Hypervisor;

use super::{
    state_root_staging, CreateRequest, MakeStaging, Pod, PodError, PodEvent, PodNetwork, PodSetup,
    ProcessInfo, Result,
};
use crate::network::NetnsNetwork;
use crate::Config;

/// Makes the network of a pod from its first container's spec, the state
/// root and the pod's id (a runtime-made namespace lives under the state
/// root), or `None` for a VM without one.
pub type MakeNetwork = Box<
    dyn Fn(&serde_json::Value, &std::path::Path, &str) -> Result<Option<Box<dyn PodNetwork>>>
        + Send
        + Sync,
>;

/// The pod of a front-end that serves one pod (the shim): booted by its
/// first container, stopped when that container is deleted (or when the
/// first container's create fails).
pub struct PodSlot {
    pod: Option<Pod>,
    staging: MakeStaging,
    network: MakeNetwork,
}

impl Default for PodSlot {
    /// Pods staged in a [`PodShare`] under the state root.
    fn default() -> Self {
        Self::with_staging(state_root_staging())
    }
}

impl PodSlot {
    /// Pods staged with what `staging` makes (tests: without mounts), on
    /// the network namespace their spec names ([`NetnsNetwork`]).
    pub fn with_staging(staging: MakeStaging) -> Self {
        Self::with_parts(staging, Box::new(NetnsNetwork::of_spec))
    }

    /// Pods staged with what `staging` makes, on the network `network`
    /// makes (tests: fakes of both).
    pub fn with_parts(staging: MakeStaging, network: MakeNetwork) -> Self {
        PodSlot {
            pod: None,
            staging,
            network,
        }
    }

    pub fn get(&self) -> Option<&Pod> {
        self.pod.as_ref()
    }

    /// The pod, or [`PodError::NotFound`] naming `id` before the first create.
    pub fn pod(&self, id: &str) -> Result<&Pod> {
        self.get().ok_or_else(|| PodError::NotFound(id.to_string()))
    }

    /// Creates a container, booting the pod (named after it) first if there
    /// is none yet, on the hypervisor `hv` makes.
    pub async fn create(
        &mut self,
        config: &Config,
        hv: impl FnOnce() -> crate::Result<Box<dyn Hypervisor>>,
        events: &mpsc::UnboundedSender<PodEvent>,
        req: CreateRequest<'_>,
    ) -> Result<u32> {
        let pod = match self.pod.take() {
            Some(pod) => pod,
            None => {
                let hv = hv()?;
                let mut network = (self.network)(&req.spec, &config.state_root, req.id)?;
                let setup = match PodSetup::in_state_root_with(config, req.id, None, &*self.staging)
                {
                    Ok(setup) => PodSetup { network, ..setup },
                    Err(e) => {
                        // Nothing is attached yet, but the network may own a
                        // namespace it made: detach removes it.
                        if let Some(n) = network.as_mut() {
                            n.detach().await;
                        }
                        return Err(e);
                    }
                };
                Pod::boot_with(config, hv.as_ref(), setup, &req.spec, events.clone()).await?
            }
        };
        let res = pod.create(req).await;
        if res.is_err() && pod.is_empty() {
            // The VM was booted for this container: nothing else needs it.
            pod.stop().await;
        } else {
            self.pod = Some(pod);
        }
        res
    }

    /// Deletes a container or exec (see [`Pod::delete`]); deleting the
    /// container the pod is named after stops the pod.
    pub async fn delete(&mut self, id: &str, exec_id: Option<&str>) -> Result<ProcessInfo> {
        let info = self.pod(id)?.delete(id, exec_id).await?;
        if exec_id.is_none() && self.pod.as_ref().is_some_and(|p| p.id() == id) {
            if let Some(pod) = self.pod.take() {
                pod.stop().await;
            }
        }
        Ok(info)
    }
}
