//! Randomized hostile-driver tests: every device's queues are filled with random descriptor
//! tables (random addresses inside and far outside guest memory, random lengths up to
//! u32::MAX, random flags and `next` links that form loops) and random available indices.
//! The devices must neither panic nor hang, and must leave host memory alone (all guest
//! accesses go through vm-memory's bounds-checked API; the test also checks that memory
//! outside the rings and buffers the driver named is untouched).

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::test_utils::*;
use super::VirtioDevice;
use crate::config::{BlockConfig, VsockConfig};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const QSIZE: u16 = 16;
/// Buffers point into [DATA_BASE, DATA_BASE + BUF_SPAN) when they point inside memory.
const BUF_SPAN: u64 = 0x10_0000;
/// A canary region no ring or in-range buffer ever covers.
const CANARY: u64 = 0x80_0000;
const CANARY_LEN: usize = 0x1000;

fn random_addr(r: &mut Rng) -> u64 {
    match r.below(6) {
        0 => r.next(),                 // anywhere in the 64-bit space
        1 => MEM_SIZE - r.below(64),   // straddling the end of guest memory
        2 => u64::MAX - r.below(4096), // wrapping
        _ => DATA_BASE + r.below(BUF_SPAN - 0x1000),
    }
}

fn random_len(r: &mut Rng) -> u32 {
    match r.below(5) {
        0 => u32::MAX - r.below(16) as u32,
        1 => 0,
        _ => r.below(4200) as u32,
    }
}

fn scramble(r: &mut Rng, vq: &VirtQ) {
    for i in 0..QSIZE {
        let flags = r.below(8) as u16; // NEXT, WRITE, INDIRECT in any mix
        let next = if r.below(4) == 0 {
            r.below(u64::from(u16::MAX)) as u16
        } else {
            r.below(u64::from(QSIZE)) as u16
        };
        vq.desc(i, random_addr(r), random_len(r), flags, next);
        // Random headers in the buffers the descriptors may point at.
        let at = DATA_BASE + r.below(BUF_SPAN - 64);
        let junk: [u8; 64] = std::array::from_fn(|_| r.next() as u8);
        vq.mem.write_slice(&junk, GuestAddress(at)).unwrap();
    }
    for _ in 0..r.below(u64::from(QSIZE) * 2) {
        vq.publish(r.below(u64::from(QSIZE) + 2) as u16);
    }
    if r.below(8) == 0 {
        vq.set_avail_idx(r.next() as u16);
    }
}

fn run(dev: &mut dyn VirtioDevice, queues: &[VirtQ], seed: u64) {
    let mut r = Rng(seed | 1);
    let mem = &queues[0].mem;
    mem.write_slice(&[0xa5; CANARY_LEN], GuestAddress(CANARY))
        .unwrap();
    let start = Instant::now();
    for _ in 0..200 {
        let q = r.below(queues.len() as u64) as usize;
        scramble(&mut r, &queues[q]);
        dev.handle_event(q as u32, EventSet::IN);
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "device took too long (hang?)"
    );
    let mut canary = [0u8; CANARY_LEN];
    mem.read_slice(&mut canary, GuestAddress(CANARY)).unwrap();
    assert!(
        canary.iter().all(|b| *b == 0xa5),
        "memory outside any buffer changed"
    );
}

fn queues(n: usize) -> Vec<VirtQ> {
    let mem = memory();
    (0..n)
        .map(|i| VirtQ::new(&mem, 0x1000 + 0x4000 * i as u64, QSIZE))
        .collect()
}

fn activate(
    dev: &mut dyn VirtioDevice,
    qs: &[VirtQ],
) -> std::sync::Arc<vmm_sys_util::epoll::Epoll> {
    let (ctx, epoll) = activate_ctx(&qs[0].mem, qs.iter().map(|q| q.queue()).collect());
    dev.activate(0, ctx).unwrap();
    epoll
}

#[test]
fn block_survives_random_queues() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![0u8; 64 * 1024]).unwrap();
    for seed in 1..=20 {
        let mut dev = super::block::Block::new(&BlockConfig {
            path: f.path().into(),
            read_only: seed % 2 == 0,
        })
        .unwrap();
        let qs = queues(1);
        let _e = activate(&mut dev, &qs);
        run(&mut dev, &qs, seed);
    }
}

#[test]
fn vsock_survives_random_queues() {
    for seed in 1..=20 {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = super::vsock::Vsock::new(&VsockConfig {
            uds: dir.path().join("v.sock"),
            cid: 3,
        })
        .unwrap();
        let qs = queues(3);
        let _e = activate(&mut dev, &qs);
        run(&mut dev, &qs, seed);
    }
}

#[test]
fn rng_survives_random_queues() {
    for seed in 1..=20 {
        let mut dev = super::rng::Rng::new();
        let qs = queues(1);
        let _e = activate(&mut dev, &qs);
        run(&mut dev, &qs, seed);
    }
}

#[test]
fn balloon_survives_random_queues() {
    for seed in 1..=20 {
        let mut dev = super::balloon::Balloon::new(0);
        let qs = queues(3);
        let _e = activate(&mut dev, &qs);
        // The balloon legitimately drops pages the guest names; keep the canary out of
        // reach by only checking for panics and hangs here.
        let mut r = Rng(seed);
        let start = Instant::now();
        for _ in 0..200 {
            let q = r.below(3) as usize;
            scramble(&mut r, &qs[q]);
            dev.handle_event(q as u32, EventSet::IN);
        }
        assert!(start.elapsed() < Duration::from_secs(20));
    }
}

#[test]
fn net_survives_random_queues() {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    for seed in 1..=20 {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        // Frames waiting in the backend, so rx has work too.
        let _ = b.send(&[0u8; 100]);
        let _ = b.send(&[1u8; 1600]);
        // SAFETY: the fd was just taken out of `a`; the File is its only owner.
        let backend = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
        let tap = super::net::tap::Tap::fake(backend, true, true);
        let mut dev = super::net::Net::new(tap, [2, 0, 0, 0, 0, 1], None).unwrap();
        let qs = queues(2);
        // Odd seeds: no features; even seeds: every offload and mergeable buffers.
        let features = if seed % 2 == 0 {
            dev.state().avail_features()
        } else {
            0
        };
        let (ctx, _e) = activate_ctx(&qs[0].mem, qs.iter().map(|q| q.queue()).collect());
        dev.activate(features, ctx).unwrap();
        run(&mut dev, &qs, seed);
    }
}
