//! The block device: features, config space, activation.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use crate::config::BlockConfig;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    DEVICE_TOKEN_BASE, TYPE_BLOCK,
};

/// Errors while opening the backing file.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BlockError {
    /// Cannot open block backing file {0}
    Open(String, #[source] std::io::Error),
}

/// Token of the self-notification used when one event had more requests than we handle at
/// once.
pub(super) const TOKEN_RETRY: u32 = DEVICE_TOKEN_BASE;

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    pub(super) file: File,
    pub(super) read_only: bool,
    pub(super) capacity_sectors: u64,
    pub(super) id: [u8; 20],
    pub(super) state: VirtioDeviceState,
    /// Registered with the event loop while the device is active.
    pub(super) retry: Option<EventFd>,
}

impl Block {
    /// Opens the backing file of `cfg`.
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let name = cfg.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .open(&cfg.path)
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        let size = file
            .metadata()
            .map_err(|e| BlockError::Open(name.clone(), e))?
            .len();
        let mut id = [0u8; 20];
        let base = cfg
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = base.len().min(20);
        id[..n].copy_from_slice(&base.as_bytes()[..n]);
        let mut features = 1u64 << VIRTIO_BLK_F_FLUSH;
        if cfg.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            file,
            read_only: cfg.read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id,
            state: VirtioDeviceState::new(TYPE_BLOCK, 1, QUEUE_SIZE, features),
            retry: None,
        })
    }
}

impl VirtioDevice for Block {
    fn state(&self) -> &VirtioDeviceState {
        &self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`.
        read_config_bytes(&self.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let retry = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Epoll)?;
        self.state.activate(ctx, |ctx| {
            ctx.poller
                .add(retry.as_raw_fd(), TOKEN_RETRY, EventSet::IN)
                .map_err(ActivateError::Epoll)
        })?;
        self.retry = Some(retry);
        // Requests queued before DRIVER_OK (or before a snapshot) are served now.
        self.process_queue();
        Ok(())
    }

    fn reset(&mut self) {
        if let (Some(a), Some(retry)) = (self.state.reset(), self.retry.take()) {
            a.poller.remove(retry.as_raw_fd());
        }
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        if token == TOKEN_RETRY {
            if let Some(retry) = &self.retry {
                let _ = retry.read();
            }
        }
        self.process_queue();
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "capacity_sectors": self.capacity_sectors })
    }
}
