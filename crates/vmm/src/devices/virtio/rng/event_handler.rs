//! Serving entropy requests.

use std::io::Write;

use super::device::Rng;
use super::MAX_BYTES_PER_REQUEST;

/// Fills `buf` from the kernel's CSPRNG.
fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl Rng {
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.state.active_mut() else {
            return;
        };
        let mut buf = Vec::new();
        active.serve(0, |chain, mem| {
            let written = match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(MAX_BYTES_PER_REQUEST);
                    buf.resize(n, 0);
                    if fill_random(&mut buf) && w.write_all(&buf).is_ok() {
                        n as u32
                    } else {
                        0
                    }
                }
                Err(_) => 0,
            };
            self.bytes_served += u64::from(written);
            written
        });
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::VirtioDevice;

    fn setup() -> (Rng, VirtQ) {
        let mut dev = Rng::new();
        let mem = memory();
        let vq = VirtQ::new(&mem, 0x1000, 16);
        let (ctx, _epoll) = activate_ctx(&mem, vec![vq.queue()]);
        dev.activate(0, ctx).unwrap();
        (dev, vq)
    }

    #[test]
    fn fills_writable_buffers_only() {
        let (mut dev, vq) = setup();
        vq.desc(0, DATA_BASE, 64, F_WRITE, 0);
        vq.publish(0);
        dev.process_queue();
        assert_eq!(vq.used_elem(0), (0, 64));
        let mut a = [0u8; 64];
        vq.mem.read_slice(&mut a, GuestAddress(DATA_BASE)).unwrap();
        assert!(a.iter().any(|b| *b != 0));
        // A device-readable buffer is not written.
        vq.mem
            .write_slice(&[0u8; 64], GuestAddress(DATA_BASE))
            .unwrap();
        vq.desc(0, DATA_BASE, 64, 0, 0);
        vq.publish(0);
        dev.process_queue();
        assert_eq!(vq.used_elem(1), (0, 0));
        vq.mem.read_slice(&mut a, GuestAddress(DATA_BASE)).unwrap();
        assert!(a.iter().all(|b| *b == 0));
    }

    #[test]
    fn huge_and_out_of_range_requests_are_safe() {
        let (mut dev, vq) = setup();
        vq.desc(0, DATA_BASE, u32::MAX, F_WRITE, 0);
        vq.publish(0);
        vq.desc(1, MEM_SIZE - 16, 4096, F_WRITE, 0);
        vq.publish(1);
        vq.desc(2, DATA_BASE, 8 << 20, F_WRITE, 0);
        vq.publish(2);
        dev.process_queue();
        assert_eq!(vq.used_elem(0).1, 0);
        assert_eq!(vq.used_elem(1).1, 0);
        assert_eq!(vq.used_elem(2).1, MAX_BYTES_PER_REQUEST as u32);
    }
}
