//! Serving the request queue.

use super::device::Block;
use super::request::{execute, parse};

impl Block {
    /// Serves available requests, a bounded number per call (see
    /// [`ActivateContext::serve`](crate::devices::virtio::ActivateContext::serve)).
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let more = active.serve(0, |chain, mem| match parse(chain, mem) {
            Ok(req) => {
                let (status, written) = execute(
                    &req,
                    mem,
                    &mut self.file,
                    self.read_only,
                    self.capacity_sectors,
                    &self.id,
                );
                req.write_status(mem, status).map_or(0, |_| written + 1)
            }
            Err(e) => {
                // Without a valid status descriptor there is nowhere to report the
                // error: return the chain with nothing written.
                log::debug!("bad block request: {e}");
                0
            }
        });
        if more {
            // More requests may be waiting: come back after other devices had their turn.
            if let Some(retry) = &self.retry {
                let _ = retry.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::BlockConfig;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    const HDR: u64 = DATA_BASE;
    const DATA: u64 = DATA_BASE + 0x1000;
    const STATUS: u64 = DATA_BASE + 0x3000;

    fn setup(read_only: bool) -> (Block, VirtQ, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut content = b"disk-sector-zero".to_vec();
        content.resize(8 * 512, 0);
        std::fs::write(file.path(), &content).unwrap();
        let mut dev = Block::new(&BlockConfig {
            path: file.path().into(),
            read_only,
        })
        .unwrap();
        let mem = memory();
        let vq = VirtQ::new(&mem, 0x1000, 16);
        let (ctx, _epoll) = activate_ctx(&mem, vec![vq.queue()]);
        dev.activate(0, ctx).unwrap();
        (dev, vq, file)
    }

    fn header(vq: &VirtQ, kind: u32, sector: u64) {
        vq.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        vq.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        vq.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        vq.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(vq: &VirtQ) -> u8 {
        vq.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn run(dev: &mut Block, vq: &VirtQ) -> (u32, u32) {
        let before = vq.used_idx();
        dev.process_queue();
        assert_eq!(vq.used_idx(), before.wrapping_add(1), "chain not returned");
        vq.used_elem(before)
    }

    #[test]
    fn read_and_write_well_formed() {
        let (mut dev, vq, file) = setup(false);
        header(&vq, 0, 0);
        vq.desc(0, HDR, 16, F_NEXT, 1);
        vq.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
        vq.desc(2, STATUS, 1, F_WRITE, 0);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq), (0, 513));
        assert_eq!(status(&vq), 0);
        let mut got = [0u8; 16];
        vq.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got, b"disk-sector-zero");

        header(&vq, 1, 2);
        vq.mem
            .write_slice(b"from-guest", GuestAddress(DATA))
            .unwrap();
        vq.desc(1, DATA, 512, F_NEXT, 2);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 1);
        assert_eq!(status(&vq), 0);
        let disk = std::fs::read(file.path()).unwrap();
        assert_eq!(&disk[1024..1034], b"from-guest");
    }

    #[test]
    fn read_only_refuses_writes() {
        let (mut dev, vq, file) = setup(true);
        header(&vq, 1, 0);
        vq.desc(0, HDR, 16, F_NEXT, 1);
        vq.desc(1, DATA, 512, F_NEXT, 2);
        vq.desc(2, STATUS, 1, F_WRITE, 0);
        vq.publish(0);
        run(&mut dev, &vq);
        assert_eq!(status(&vq), 1);
        assert_eq!(&std::fs::read(file.path()).unwrap()[..4], b"disk");
    }

    #[test]
    fn descriptor_loop_terminates() {
        let (mut dev, vq, _f) = setup(false);
        header(&vq, 0, 0);
        vq.desc(0, HDR, 16, F_NEXT, 1);
        vq.desc(1, DATA, 512, F_NEXT | F_WRITE, 0); // back to 0: a loop
        vq.publish(0);
        let (_, len) = run(&mut dev, &vq);
        assert_eq!(len, 0);
    }

    #[test]
    fn out_of_range_and_huge_buffers_are_rejected() {
        let (mut dev, vq, file) = setup(false);
        for (addr, len) in [
            (MEM_SIZE - 100, 512),        // crosses the end of guest memory
            (0xffff_ffff_ffff_f000, 512), // far outside, near the top of the address space
            (DATA, u32::MAX),             // huge length
        ] {
            header(&vq, 1, 0);
            vq.desc(0, HDR, 16, F_NEXT, 1);
            vq.desc(1, addr, len, F_NEXT, 2);
            vq.desc(2, STATUS, 1, F_WRITE, 0);
            vq.publish(0);
            assert_eq!(run(&mut dev, &vq).1, 0);
        }
        assert_eq!(&std::fs::read(file.path()).unwrap()[..4], b"disk");
        // The status byte itself outside memory.
        header(&vq, 0, 0);
        vq.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
        vq.desc(2, MEM_SIZE + 4096, 1, F_WRITE, 0);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 0);
    }

    #[test]
    fn wrong_directions_are_rejected() {
        let (mut dev, vq, file) = setup(false);
        // Read whose data buffer is device-readable: the device must not write into it.
        header(&vq, 0, 0);
        vq.mem
            .write_slice(b"untouched", GuestAddress(DATA))
            .unwrap();
        vq.desc(0, HDR, 16, F_NEXT, 1);
        vq.desc(1, DATA, 512, F_NEXT, 2);
        vq.desc(2, STATUS, 1, F_WRITE, 0);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 0);
        let mut got = [0u8; 9];
        vq.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(&got, b"untouched");
        // Header in a device-writable descriptor.
        vq.desc(0, HDR, 16, F_NEXT | F_WRITE, 1);
        vq.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 0);
        // Status in a device-readable descriptor.
        vq.desc(0, HDR, 16, F_NEXT, 1);
        vq.desc(2, STATUS, 1, 0, 0);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 0);
        // Short header.
        vq.desc(0, HDR, 8, F_NEXT, 1);
        vq.desc(2, STATUS, 1, F_WRITE, 0);
        vq.publish(0);
        assert_eq!(run(&mut dev, &vq).1, 0);
        assert_eq!(&std::fs::read(file.path()).unwrap()[..4], b"disk");
    }

    #[test]
    fn sectors_beyond_the_end_fail_cleanly() {
        let (mut dev, vq, _f) = setup(false);
        for sector in [8, u64::MAX / 512, u64::MAX] {
            header(&vq, 0, sector);
            vq.desc(0, HDR, 16, F_NEXT, 1);
            vq.desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
            vq.desc(2, STATUS, 1, F_WRITE, 0);
            vq.publish(0);
            assert_eq!(run(&mut dev, &vq).1, 1);
            assert_eq!(status(&vq), 1);
        }
        // Unknown request type.
        header(&vq, 77, 0);
        vq.publish(0);
        run(&mut dev, &vq);
        assert_eq!(status(&vq), 2);
    }

    #[test]
    fn bogus_available_index_does_not_hang() {
        let (mut dev, vq, _f) = setup(false);
        // The driver claims 40000 new chains on a 16-entry queue.
        vq.set_avail_idx(40000);
        dev.process_queue();
        assert!(vq.used_idx() <= 16 * 2);
        // Head index beyond the queue size.
        vq.set_avail_idx(0);
        dev.process_queue();
    }
}
