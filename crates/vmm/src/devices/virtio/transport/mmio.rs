//! virtio-mmio transport, version 2 (virtio 1.x, "modern"), as declared to Linux with
//! `virtio_mmio.device=4K@<base>:<irq>` on the kernel command line.
//!
//! Register accesses come from vCPU threads; queue notifications arrive as eventfds (an
//! ioeventfd when KVM supports it, else written here on the MMIO exit) on the VMM thread.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{
    ActivateContext, IrqTrigger, Poller, VirtioDevice, DEVICE_TOKEN_BASE, INT_CONFIG,
    VIRTIO_F_VERSION_1,
};
use crate::devices::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5645_5353; // "VESS"

/// Offset of the queue-notify register (for the ioeventfd).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// Transport registers saved in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MmioState {
    /// Feature word selectors.
    pub features_select: (u32, u32),
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Selected queue.
    pub queue_select: u32,
    /// Device status register.
    pub status: u32,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// Config generation counter.
    pub config_generation: u32,
    /// Queue registers and ring positions.
    pub queues: Vec<QueueSnapshot>,
}

/// Serializable mirror of `virtio_queue::QueueState`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueSnapshot {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// Rebuilds the queue.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// A virtio device behind an MMIO register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqTrigger>,
    poller: Poller,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    status: u32,
    config_generation: u32,
    /// Written by the vCPU thread on DRIVER_OK; the VMM thread then activates the device,
    /// so that device set-up (sockets, vhost-user negotiation) never runs on a vCPU thread.
    activate_evt: EventFd,
    activation_pending: bool,
}

/// Event token of the deferred-activation eventfd (queue tokens are below it).
pub const ACTIVATE_TOKEN: u32 = DEVICE_TOKEN_BASE - 1;

impl MmioTransport {
    /// Wraps `device`; `irq` is its interrupt, `poller` its handle on the event loop.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqTrigger>,
        poller: Poller,
    ) -> std::io::Result<Self> {
        let mut queue_evts = Vec::new();
        let mut queues = Vec::new();
        if device.state().queue_max_sizes().len() >= ACTIVATE_TOKEN as usize {
            return Err(std::io::Error::other("too many queues for one device"));
        }
        let activate_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        poller.add(
            activate_evt.as_raw_fd_compat(),
            ACTIVATE_TOKEN,
            EventSet::IN,
        )?;
        for (i, max) in device.state().queue_max_sizes().iter().enumerate() {
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            poller.add(evt.as_raw_fd_compat(), i as u32, EventSet::IN)?;
            queue_evts.push(evt);
            queues.push(
                Queue::new(*max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e}")))?,
            );
        }
        Ok(MmioTransport {
            device,
            mem,
            irq,
            poller,
            queue_evts,
            queues,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            activate_evt,
            activation_pending: false,
        })
    }

    /// The per-queue notification eventfds (to register as ioeventfds).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device's interrupt.
    pub fn irq(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }

    /// Handles an event for token `token` of this device (queue kicks are drained here).
    pub fn handle_event(&mut self, token: u32, events: EventSet) {
        if token == ACTIVATE_TOKEN {
            let _ = self.activate_evt.read();
            if std::mem::take(&mut self.activation_pending)
                && self.status & STATUS_DRIVER_OK != 0
                && !self.device.state().is_activated()
            {
                self.activate();
            }
            return;
        }
        if token < DEVICE_TOKEN_BASE {
            if let Some(evt) = self.queue_evts.get(token as usize) {
                // Drain the counter; spurious wake-ups read EAGAIN.
                let _ = evt.read();
            }
            if !self.device.state().is_activated() {
                return;
            }
        }
        self.device.handle_event(token, events);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_DRIVER_OK != 0 {
            // Queue registers are read-only once the device is live.
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn update_queue<F: FnOnce(&mut Queue)>(&mut self, f: F) {
        if let Some(q) = self.selected_queue() {
            f(q)
        }
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        // Status bits only ever get added by the driver (spec 2.1.1), except FAILED.
        let new = self.status | status;
        if status & STATUS_FAILED != 0 {
            self.status = new;
            return;
        }
        if new & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // A modern device refuses drivers that did not accept VERSION_1.
            if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                self.status = new & !STATUS_FEATURES_OK;
                return;
            }
        }
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.status = new;
        if new & ready == ready && !self.device.state().is_activated() && !self.activation_pending {
            self.activation_pending = true;
            // Cannot fail short of counter overflow.
            let _ = self.activate_evt.write(1);
        }
    }

    fn activate(&mut self) {
        let queues: Vec<Queue> = match self
            .queues
            .iter()
            .map(|q| QueueSnapshot::from(q).to_queue())
            .collect::<Result<_, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                log::warn!("virtio-mmio: invalid queue configuration: {e}");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.irq.trigger(INT_CONFIG);
                return;
            }
        };
        if let Some((i, _)) = queues
            .iter()
            .enumerate()
            .find(|(_, q)| q.ready() && !q.is_valid(&self.mem))
        {
            log::warn!("virtio-mmio: queue {i} is not valid in guest memory; device needs reset");
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            self.irq.trigger(INT_CONFIG);
            return;
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            irq: self.irq.clone(),
            poller: self.poller.clone(),
        };
        let dev_type = self.device.state().device_type();
        if let Err(e) = self.device.activate(self.acked_features, ctx) {
            log::warn!("virtio device type {dev_type} failed to activate: {e}");
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            self.irq.trigger(INT_CONFIG);
        } else {
            log::info!("virtio device type {dev_type} activated");
        }
    }

    fn reset(&mut self) {
        if self.device.state().is_activated() {
            self.device.reset();
        }
        self.status = 0;
        self.activation_pending = false;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.irq.set_status(0);
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Registers and ring positions for a snapshot.
    pub fn save_state(&self) -> MmioState {
        let queues = if self.device.state().is_activated() {
            self.device.state().queues()
        } else {
            &self.queues
        };
        MmioState {
            features_select: (self.device_features_select, self.driver_features_select),
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            interrupt_status: self.irq.status(),
            config_generation: self.config_generation,
            queues: queues.iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Restores registers; re-activates the device if the driver had it running.
    pub fn restore_state(
        &mut self,
        state: &MmioState,
        device_state: &serde_json::Value,
    ) -> Result<(), String> {
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "snapshot has {} queues, device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        self.queues = state
            .queues
            .iter()
            .map(|s| s.to_queue().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        (self.device_features_select, self.driver_features_select) = state.features_select;
        self.acked_features = state.acked_features;
        self.queue_select = state.queue_select;
        self.config_generation = state.config_generation;
        self.status = state.status;
        self.irq.set_status(state.interrupt_status);
        self.device.restore_state(device_state);
        if state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.activate();
        }
        Ok(())
    }
}

/// `EventFd::as_raw_fd` without importing the trait at every call site.
trait AsRawFdCompat {
    fn as_raw_fd_compat(&self) -> std::os::unix::io::RawFd;
}

impl AsRawFdCompat for EventFd {
    fn as_raw_fd_compat(&self) -> std::os::unix::io::RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(self)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let features = self.device.state().avail_features() | (1 << VIRTIO_F_VERSION_1);
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.state().device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            // SHMLen/SHMBase of the selected shared memory region: all ones means "no such
            // region" (we expose none; virtio-fs then runs without a DAX window).
            0xb0 | 0xb4 | 0xb8 | 0xbc => u32::MAX,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_writable =
            self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == 0;
        match offset {
            0x14 => self.device_features_select = v,
            0x20 if features_writable => {
                let offered = self.device.state().avail_features() | (1 << VIRTIO_F_VERSION_1);
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let word = (u64::from(v) << shift) & offered;
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features = (self.acked_features & !mask) | word;
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => self.update_queue(|q| q.set_size(v as u16)),
            0x44 => self.update_queue(|q| q.set_ready(v == 1)),
            0x50 => {
                // Only reached when no ioeventfd is registered for this window.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlockConfig;
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::test_utils::memory;

    fn transport() -> (MmioTransport, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 4096]).unwrap();
        let dev = Block::new(&BlockConfig {
            path: f.path().into(),
            read_only: false,
        })
        .unwrap();
        let epoll = Arc::new(vmm_sys_util::epoll::Epoll::new().unwrap());
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(Box::new(dev), memory(), irq, Poller::new(epoll, 0)).unwrap();
        (t, f)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, version_1: bool) {
        w(t, 0x70, STATUS_ACKNOWLEDGE);
        w(t, 0x70, STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, u32::from(version_1));
        w(t, 0x70, STATUS_FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, desc: u64) {
        w(t, 0x30, 0);
        w(t, 0x38, 16);
        w(t, 0x80, desc as u32);
        w(t, 0x84, (desc >> 32) as u32);
        w(t, 0x90, 0x2000);
        w(t, 0xa0, 0x3000);
        w(t, 0x44, 1);
    }

    #[test]
    fn identifies_and_activates() {
        let (mut t, _f) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 2);
        assert_eq!(r(&mut t, 0x100), 8, "capacity in sectors");
        negotiate(&mut t, true);
        assert_ne!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0x1000);
        w(&mut t, 0x70, STATUS_DRIVER_OK);
        // Activation happens on the event loop, not in the MMIO write.
        assert!(!t.device().state().is_activated());
        t.handle_event(ACTIVATE_TOKEN, EventSet::IN);
        assert!(t.device().state().is_activated());
        // Queue registers are frozen while live.
        w(&mut t, 0x38, 2);
        assert_eq!(t.save_state().queues[0].size, 16);
        w(&mut t, 0x70, 0);
        assert!(!t.device().state().is_activated());
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn refuses_legacy_drivers_and_bad_rings() {
        let (mut t, _f) = transport();
        negotiate(&mut t, false);
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(&mut t, 0x70, 0);
        negotiate(&mut t, true);
        setup_queue(&mut t, 0xffff_ffff_0000);
        w(&mut t, 0x70, STATUS_DRIVER_OK);
        t.handle_event(ACTIVATE_TOKEN, EventSet::IN);
        assert!(!t.device().state().is_activated());
        assert_ne!(r(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, _f) = transport();
        let mut b = [0u8; 2];
        t.read(0x70, &mut b);
        t.write(0x70, &[1, 2]);
        t.write(0x50, &99u32.to_le_bytes());
        w(&mut t, 0x30, 1000);
        w(&mut t, 0x38, 16);
        assert_eq!(r(&mut t, 0x34), 0);
        let mut big = [0u8; 8];
        t.read(0x100 + 4000, &mut big);
        assert_eq!(big, [0; 8]);
    }
}
