//! Serving the request queue.

use super::device::Block;
use super::request::{execute, parse, Status};
use crate::devices::virtio::queue_util::{add_used, pop, MAX_CHAINS_PER_EVENT};

impl Block {
    /// Serves available requests, at most [`MAX_CHAINS_PER_EVENT`] per call.
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        for _ in 0..MAX_CHAINS_PER_EVENT {
            let Some(chain) = pop(&mut active.queue, &mem) else {
                return;
            };
            let head = chain.head_index();
            let used_len = match parse(chain, &mem) {
                Ok(req) => {
                    let (status, written) =
                        execute(&req, &mem, &mut self.file, self.read_only, self.capacity_sectors, &self.id);
                    req.write_status(&mem, status).map_or(0, |_| written + 1)
                }
                Err(e) => {
                    log::debug!("bad block request: {e}");
                    e.status_addr()
                        .and_then(|addr| {
                            vm_memory::Bytes::write_obj(&mem, Status::IoErr as u8, addr).ok()
                        })
                        .map_or(0, |_| 1)
                }
            };
            add_used(&mut active.queue, &mem, &active.irq, head, used_len);
        }
        // More requests may be waiting: come back after other devices had their turn.
        let _ = active.retry.write(1);
    }
}
