//! The virtio-fs device: tag config space, vhost-user set-up on activation.

use std::os::unix::io::AsRawFd;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{NUM_REQUEST_QUEUES, QUEUE_SIZE, TAG_LEN, TYPE_FS};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    DEVICE_TOKEN_BASE, VIRTIO_F_VERSION_1,
};

/// Errors connecting to the backend.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum FsError {
    /// virtio-fs tag {0:?} is empty or longer than 36 bytes
    Tag(String),
    /// Cannot connect to the vhost-user backend at {0} (is virtiofsd running?)
    Connect(String, #[source] vhost::Error),
    /// vhost-user negotiation with {0} failed
    Negotiate(String, #[source] vhost::Error),
}

/// Tokens of the backend's "used buffers" eventfds: one per queue, from here.
pub(super) const TOKEN_CALL_BASE: u32 = DEVICE_TOKEN_BASE;

/// The vhost-user connection to the backend and what it offered.
struct Backend {
    frontend: Frontend,
    socket: String,
    features: u64,
    protocol_features: bool,
}

/// A virtio-fs device backed by a vhost-user server.
pub struct Fs {
    backend: Backend,
    tag: [u8; TAG_LEN],
    pub(super) state: VirtioDeviceState,
    /// Eventfds the backend waits on; queue notifications are forwarded to them.
    pub(super) kicks: Vec<EventFd>,
    /// Eventfds the backend signals; each raises the device interrupt.
    pub(super) calls: Vec<EventFd>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("socket", &self.backend.socket)
            .field("active", &self.state.is_activated())
            .finish()
    }
}

impl Fs {
    /// Connects to the backend at `socket` and reads its features.
    pub fn new(socket: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let name = socket.display().to_string();
        let nq = (1 + NUM_REQUEST_QUEUES) as u64;
        let mut frontend =
            Frontend::connect(socket, nq).map_err(|e| FsError::Connect(name.clone(), e))?;
        let neg = |e| FsError::Negotiate(name.clone(), e);
        frontend.set_owner().map_err(neg)?;
        let backend_features = frontend.get_features().map_err(neg)?;
        let protocol_features =
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol_features {
            let offered = frontend.get_protocol_features().map_err(neg)?;
            // We need none of the optional protocol features; MQ lets us state our queues.
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(neg)?;
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        // Offer only what both we (no extras) and the backend support.
        let avail_features = backend_features & (1 << VIRTIO_F_VERSION_1);
        Ok(Fs {
            backend: Backend {
                frontend,
                socket: name,
                features: backend_features,
                protocol_features,
            },
            tag: t,
            state: VirtioDeviceState::new(
                TYPE_FS,
                1 + NUM_REQUEST_QUEUES,
                QUEUE_SIZE,
                avail_features,
            ),
            kicks: Vec::new(),
            calls: Vec::new(),
        })
    }
}

impl Backend {
    /// Hands the backend the negotiated features, guest memory and the rings.
    fn setup(
        &mut self,
        features: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |err: vhost::Error| format!("{what}: {err}")
        };
        let mut f = features & self.features;
        if self.protocol_features {
            f |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend.set_features(f).map_err(e("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("guest memory is not shareable (memfd needed): {err}"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let host = |gpa: u64| -> Result<u64, String> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| format!("ring address {gpa:#x} outside guest memory"))
        };
        for (i, q) in queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(e("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(e("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.next_avail())
                .map_err(e("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &calls[i])
                .map_err(e("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &kicks[i])
                .map_err(e("SET_VRING_KICK"))?;
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = self.state.queue_max_sizes().len();
        let new_evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Epoll);
        let kicks = (0..n).map(|_| new_evt()).collect::<Result<Vec<_>, _>>()?;
        let calls = (0..n).map(|_| new_evt()).collect::<Result<Vec<_>, _>>()?;
        let backend = &mut self.backend;
        self.state.activate(ctx, |ctx| {
            backend
                .setup(features, &ctx.mem, &ctx.queues, &kicks, &calls)
                .map_err(ActivateError::Backend)?;
            for (i, c) in calls.iter().enumerate() {
                ctx.poller
                    .add(c.as_raw_fd(), TOKEN_CALL_BASE + i as u32, EventSet::IN)
                    .map_err(ActivateError::Epoll)?;
            }
            Ok(())
        })?;
        // Kicks that arrived before activation.
        for k in &kicks {
            let _ = k.write(1);
        }
        self.kicks = kicks;
        self.calls = calls;
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(a) = self.state.reset() {
            for c in &self.calls {
                a.poller.remove(c.as_raw_fd());
            }
        }
        self.kicks.clear();
        self.calls.clear();
        // The backend cannot be re-initialised over the same connection without
        // VHOST_USER_RESET_DEVICE; a guest reset of this device leaves it unusable.
        let _ = self.backend.frontend.reset_device();
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        self.relay(token);
    }
}
