//! The block device: features, config space, activation.

use std::fs::{File, OpenOptions};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{QUEUE_SIZE, SECTOR_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use crate::config::BlockConfig;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqTrigger, Poller, VirtioDevice,
    DEVICE_TOKEN_BASE, TYPE_BLOCK,
};

/// Errors while opening the backing file.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BlockError {
    /// Cannot open block backing file {0}: {1}
    Open(String, std::io::Error),
}

/// Token of the self-notification used when one event had more requests than we handle at
/// once.
pub(super) const TOKEN_RETRY: u32 = DEVICE_TOKEN_BASE;

/// Live state after activation.
#[derive(Debug)]
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: std::sync::Arc<IrqTrigger>,
    pub retry: EventFd,
    pub poller: Poller,
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    pub(super) file: File,
    pub(super) read_only: bool,
    pub(super) capacity_sectors: u64,
    pub(super) id: [u8; 20],
    pub(super) active: Option<Active>,
    queue_sizes: [u16; 1],
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
        Ok(Block {
            file,
            read_only: cfg.read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id,
            active: None,
            queue_sizes: [QUEUE_SIZE],
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity`.
        read_config_bytes(&self.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _features: u64, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues;
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount(queues.len(), 1));
        }
        let retry = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Epoll)?;
        ctx.poller
            .add(
                std::os::unix::io::AsRawFd::as_raw_fd(&retry),
                TOKEN_RETRY,
                EventSet::IN,
            )
            .map_err(ActivateError::Epoll)?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue: queues.remove(0),
            irq: ctx.irq,
            retry,
            poller: ctx.poller,
        });
        // Requests queued before DRIVER_OK (or before a snapshot) are served now.
        self.process_queue();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            a.poller
                .remove(std::os::unix::io::AsRawFd::as_raw_fd(&a.retry));
        }
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        if token == TOKEN_RETRY {
            if let Some(a) = &self.active {
                let _ = a.retry.read();
            }
        }
        self.process_queue();
    }

    fn queues(&self) -> &[Queue] {
        self.active
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "capacity_sectors": self.capacity_sectors })
    }
}
