//! Inflate, deflate and free-page-report queues.

use std::sync::atomic::Ordering;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use super::device::{Balloon, DEFLATEQ, INFLATEQ, REPORTQ};
use super::BALLOON_PAGE;

/// Most PFNs taken from one inflate descriptor (Linux sends at most 256 per request).
const MAX_PFNS_PER_DESC: u32 = 4096;
/// Most pages (inflate PFNs) plus ranges (free page reports) dropped per queue event. Each
/// is a madvise call on the VMM thread: without a bound, a guest that fills the queue with
/// long chains of long PFN arrays (1024 chains of 256 descriptors of 4096 PFNs) stalls the
/// event loop, and so every device and the API, for minutes per notification. Linux sends
/// one request of at most 256 PFNs and waits for it. Past the bound, chains are still
/// returned used but drop nothing more: inflating is advisory, the host only keeps memory
/// the guest said it gave up.
pub(super) const MAX_DISCARDS_PER_EVENT: u32 = 16 * 1024;

/// Drops `[gpa, gpa + len)` from host memory if it lies inside one guest region. Returns
/// the bytes dropped.
pub(super) fn discard(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> u64 {
    let Some(region) = mem.find_region(GuestAddress(gpa)) else {
        return 0;
    };
    let offset = gpa - region.start_addr().raw_value();
    let inside = offset
        .checked_add(len)
        .is_some_and(|end| end <= region.len());
    if len == 0 || !inside {
        return 0;
    }
    let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) else {
        return 0;
    };
    // madvise needs a page-aligned start; the ranges are page-granular in the spec, so an
    // unaligned one is malformed and ignored.
    if !(host as usize).is_multiple_of(4096) {
        return 0;
    }
    // Guest memory in a shared memfd (VMs with vhost-user devices) keeps its pages in the
    // memfd: MADV_DONTNEED would only unmap them. MADV_REMOVE frees them (the guest then
    // reads zeros); it fails on private mappings, which MADV_DONTNEED frees.
    let shared = region.file_offset().is_some();
    // SAFETY: `host..host+len` lies inside one guest memory mapping owned by `mem` (checked
    // above). MADV_REMOVE and MADV_DONTNEED only drop the pages' contents; the mapping
    // stays valid and the guest sees zero (anonymous, memfd) or snapshot (private file)
    // pages on its next access.
    let removed =
        shared && unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_REMOVE) } == 0;
    let ret = if removed {
        0
    } else {
        // SAFETY: as above.
        unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) }
    };
    if ret == 0 {
        len
    } else {
        0
    }
}

impl Balloon {
    pub(super) fn process_queue(&mut self, index: usize) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mut budget = MAX_DISCARDS_PER_EVENT;
        active.serve(index, |chain, mem| {
            for desc in chain {
                match index {
                    INFLATEQ if !desc.is_write_only() => {
                        let n = (desc.len() / 4).min(MAX_PFNS_PER_DESC).min(budget);
                        budget -= n;
                        for i in 0..n {
                            let Some(at) = desc.addr().0.checked_add(u64::from(i) * 4) else {
                                break;
                            };
                            let Ok(pfn) = mem.read_obj::<u32>(GuestAddress(at)) else {
                                break;
                            };
                            let freed = discard(mem, u64::from(pfn) * BALLOON_PAGE, BALLOON_PAGE);
                            self.control
                                .inflated_bytes
                                .fetch_add(freed, Ordering::Relaxed);
                        }
                    }
                    REPORTQ if budget > 0 => {
                        budget -= 1;
                        let freed = discard(mem, desc.addr().0, u64::from(desc.len()));
                        self.control
                            .reported_bytes
                            .fetch_add(freed, Ordering::Relaxed);
                    }
                    // Deflated pages come back on the guest's next access.
                    DEFLATEQ => {}
                    _ => {}
                }
            }
            0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    fn setup() -> (Balloon, VirtQ, VirtQ) {
        let mut dev = Balloon::new(0);
        let mem = memory();
        let inflate = VirtQ::new(&mem, 0x1000, 16);
        let deflate = VirtQ::new(&mem, 0x4000, 16);
        let report = VirtQ::new(&mem, 0x7000, 16);
        let (ctx, _e) = activate_ctx(&mem, vec![inflate.queue(), deflate.queue(), report.queue()]);
        dev.activate(0, ctx).unwrap();
        (dev, inflate, report)
    }

    const PAGE_A: u64 = 0x20_0000;
    const PAGE_B: u64 = 0x30_0000;

    #[test]
    fn inflated_and_reported_pages_are_dropped() {
        let (mut dev, inflate, report) = setup();
        let mem = inflate.mem.clone();
        mem.write_obj(0xabu8, GuestAddress(PAGE_A)).unwrap();
        mem.write_obj(0xcdu8, GuestAddress(PAGE_B + 8192)).unwrap();
        // Inflate: one PFN, one bogus PFN far outside memory.
        mem.write_obj((PAGE_A / 4096) as u32, GuestAddress(DATA_BASE))
            .unwrap();
        mem.write_obj(0xffff_fff0u32, GuestAddress(DATA_BASE + 4))
            .unwrap();
        inflate.desc(0, DATA_BASE, 8, 0, 0);
        inflate.publish(0);
        dev.process_queue(INFLATEQ);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE_A)).unwrap(), 0);
        assert_eq!(dev.control.inflated_bytes.load(Ordering::SeqCst), 4096);
        // Report a 16 KiB free range, plus ranges that leave guest memory or overflow.
        report.desc(0, PAGE_B, 16384, F_WRITE | F_NEXT, 1);
        report.desc(1, MEM_SIZE - 4096, 8192, F_WRITE | F_NEXT, 2);
        report.desc(2, u64::MAX - 4095, 4096, F_WRITE, 0);
        report.publish(0);
        dev.process_queue(REPORTQ);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE_B + 8192)).unwrap(), 0);
        assert_eq!(dev.control.reported_bytes.load(Ordering::SeqCst), 16384);
        assert_eq!(report.used_idx(), 1);
    }

    /// Guest memory in a shared memfd (VMs with virtio-fs): a reported range must
    /// leave the memfd, not just the VMM's page tables.
    #[test]
    fn reported_pages_leave_a_shared_memfd() {
        use std::os::unix::fs::MetadataExt;
        let mem = crate::vstate::memory::create_shared(16).unwrap();
        let blocks = |mem: &GuestMemoryMmap| {
            let r = mem.find_region(GuestAddress(0)).unwrap();
            r.file_offset().unwrap().file().metadata().unwrap().blocks()
        };
        let before = blocks(&mem);
        for off in (0..(1 << 20)).step_by(4096) {
            mem.write_obj(1u8, GuestAddress(PAGE_B + off)).unwrap();
        }
        let filled = blocks(&mem);
        assert!(filled >= before + 2048, "{before} -> {filled} blocks");
        let mut dev = Balloon::new(0);
        let inflate = VirtQ::new(&mem, 0x1000, 16);
        let deflate = VirtQ::new(&mem, 0x4000, 16);
        let report = VirtQ::new(&mem, 0x7000, 16);
        let (ctx, _e) = activate_ctx(&mem, vec![inflate.queue(), deflate.queue(), report.queue()]);
        dev.activate(0, ctx).unwrap();
        report.desc(0, PAGE_B, 1 << 20, F_WRITE, 0);
        report.publish(0);
        dev.process_queue(REPORTQ);
        assert_eq!(dev.control.reported_bytes.load(Ordering::SeqCst), 1 << 20);
        // The 1 MiB (2048 blocks) left the memfd; the rings set up since take a few.
        let after = blocks(&mem);
        assert!(after + 2048 <= filled + 64, "{filled} -> {after} blocks");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE_B + 4096)).unwrap(), 0);
    }

    /// Found by the virtio_devices fuzz target (a 15 s stall in madvise): one event drops
    /// at most MAX_DISCARDS_PER_EVENT pages, however many the queued chains name, and
    /// still returns every chain.
    #[test]
    fn one_event_drops_a_bounded_number_of_pages() {
        let (mut dev, inflate, _) = setup();
        let mem = inflate.mem.clone();
        // 16 chains of 2 descriptors, each naming 4096 times a page inside memory.
        let pfns: Vec<u8> = std::iter::repeat_n(((PAGE_A / 4096) as u32).to_le_bytes(), 4096)
            .flatten()
            .collect();
        mem.write_slice(&pfns, GuestAddress(DATA_BASE)).unwrap();
        for c in 0..8u16 {
            inflate.desc(2 * c, DATA_BASE, 4 * 4096, F_NEXT, 2 * c + 1);
            inflate.desc(2 * c + 1, DATA_BASE, 4 * 4096, 0, 0);
            inflate.publish(2 * c);
        }
        for c in 0..8u16 {
            inflate.publish(2 * c);
        }
        dev.process_queue(INFLATEQ);
        assert_eq!(
            dev.control.inflated_bytes.load(Ordering::SeqCst),
            u64::from(MAX_DISCARDS_PER_EVENT) * BALLOON_PAGE
        );
        assert_eq!(inflate.used_idx(), 16, "every chain is returned");
    }

    #[test]
    fn config_reports_target_and_takes_actual() {
        let (mut dev, _, _) = setup();
        dev.control.set_target_mib(8);
        let mut b = [0u8; 4];
        dev.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2048);
        dev.write_config(4, &100u32.to_le_bytes());
        assert_eq!(dev.control.actual_pages.load(Ordering::SeqCst), 100);
        dev.write_config(0, &1u32.to_le_bytes()); // num_pages is read-only for the driver
        dev.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2048);
    }
}
