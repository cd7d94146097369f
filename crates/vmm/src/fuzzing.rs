//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`; never in a
//! production build). Each takes the fuzzer's bytes and drives the real code: the virtio
//! devices' queue handling through the fixture of the device unit tests
//! ([`crate::devices::virtio::test_utils`]), snapshot state parsing and restore into
//! devices, and the control API's request framing and parsing. A panic, a hang or a
//! sanitizer report is a bug; errors returned for bad input are not.

use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BlockConfig, VsockConfig};
use crate::devices::virtio::test_utils::{activate_ctx, memory, VirtQ, DATA_BASE, MEM_SIZE};
use crate::devices::virtio::transport::mmio::{MmioTransport, ACTIVATE_TOKEN};
use crate::devices::virtio::{
    balloon, block, net, rng, vsock, IrqTrigger, Poller, VirtioDevice, DEVICE_TOKEN_BASE,
    TYPE_BALLOON, TYPE_BLOCK, TYPE_RNG,
};

/// Fuzzer bytes read as numbers; reads past the end give zeros.
#[derive(Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn uint<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let src = self.bytes(N);
        b[..src.len()].copy_from_slice(src);
        b
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.uint::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.uint())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.uint())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.uint())
    }
}

/// Queue size of the fixture queues.
const QSIZE: u16 = 16;
/// In-memory buffers point into [DATA_BASE, DATA_BASE + BUF_SPAN).
const BUF_SPAN: u64 = 0x10_0000;
/// A canary region that no ring and no in-range buffer covers.
const CANARY: u64 = 0x80_0000;
const CANARY_LEN: usize = 0x1000;
/// Most queue rounds per input (keeps one input fast).
const MAX_ROUNDS: usize = 48;

/// The devices [`virtio_queues`] drives, chosen by the first input byte.
pub const DEVICES: [&str; 5] = ["block", "net", "vsock", "balloon", "rng"];

fn addr(inp: &mut Input) -> u64 {
    match inp.u8() {
        0..=199 => DATA_BASE + u64::from(inp.u32()) % BUF_SPAN,
        200..=219 => MEM_SIZE - u64::from(inp.u8()),
        220..=229 => u64::MAX - u64::from(inp.u16()),
        _ => inp.u64(),
    }
}

fn len(inp: &mut Input) -> u32 {
    match inp.u8() {
        0..=219 => u32::from(inp.u16()) % 0x2000,
        220..=239 => 0,
        _ => inp.u32(),
    }
}

/// A per-process scratch directory for device back ends (block image, vsock socket).
fn scratch() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vessel-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the fuzz scratch dir");
        std::fs::write(d.join("block.img"), vec![0u8; 64 * 1024]).expect("write the block image");
        d
    })
    .clone()
}

fn queues(mem: &GuestMemoryMmap, n: usize) -> Vec<VirtQ> {
    (0..n)
        .map(|i| VirtQ::new(mem, 0x1000 + 0x4000 * i as u64, QSIZE))
        .collect()
}

/// A device of kind `kind` (index into [`DEVICES`]), activated on fixture queues in `mem`.
/// Returns it with its queues, the epoll it registered with and, for net, the peer of its
/// back end (to inject frames).
#[allow(clippy::type_complexity)]
fn device(
    kind: u8,
    mem: &GuestMemoryMmap,
    inp: &mut Input,
) -> Option<(
    Box<dyn VirtioDevice>,
    Vec<VirtQ>,
    Arc<Epoll>,
    Option<std::os::unix::net::UnixDatagram>,
)> {
    let mut peer = None;
    let (mut dev, n): (Box<dyn VirtioDevice>, usize) = match kind {
        0 => {
            let cfg = BlockConfig {
                path: scratch().join("block.img"),
                read_only: inp.u8() & 1 == 1,
            };
            (Box::new(block::Block::new(&cfg).ok()?), 1)
        }
        1 => {
            let (a, b) = std::os::unix::net::UnixDatagram::pair().ok()?;
            b.set_nonblocking(true).ok()?;
            // SAFETY: the fd was just taken out of `a`; the File is its only owner.
            let backend = unsafe { std::fs::File::from_raw_fd(a.into_raw_fd()) };
            let tap = net::tap::Tap::fake(backend, true, true);
            peer = Some(b);
            (
                Box::new(net::Net::new(tap, [2, 0, 0, 0, 0, 1], None).ok()?),
                2,
            )
        }
        2 => {
            let cfg = VsockConfig {
                uds: scratch().join("v.sock"),
                cid: 3,
            };
            (Box::new(vsock::Vsock::new(&cfg).ok()?), 3)
        }
        3 => (Box::new(balloon::Balloon::new(u64::from(inp.u8()))), 3),
        _ => (Box::new(rng::Rng::new()), 1),
    };
    let qs = queues(mem, n);
    let features = dev.state().avail_features() & inp.u64();
    let (ctx, epoll) = activate_ctx(mem, qs.iter().map(|q| q.queue()).collect());
    dev.activate(features, ctx).ok()?;
    Some((dev, qs, epoll, peer))
}

/// One virtio device (first byte: index into [`DEVICES`]) driven by a hostile driver: each
/// round writes fuzzer-chosen descriptors (addresses inside, at the end of and far outside
/// guest memory, any length, flags and `next` links), buffer contents, available-ring
/// entries and index, then notifies a queue or fires a device event. The device must not
/// panic or hang, and must not write guest memory that no descriptor names (the balloon,
/// which drops pages the guest names, is only checked for panics and hangs).
pub fn virtio_queues(data: &[u8]) {
    let mut inp = Input::new(data);
    let kind = inp.u8() % DEVICES.len() as u8;
    let mem = memory();
    mem.write_slice(&[0xa5; CANARY_LEN], GuestAddress(CANARY))
        .unwrap();
    let Some((mut dev, qs, _epoll, peer)) = device(kind, &mem, &mut inp) else {
        return;
    };
    let mut rounds = 0;
    while !inp.is_empty() && rounds < MAX_ROUNDS {
        rounds += 1;
        let q = usize::from(inp.u8()) % qs.len();
        let vq = &qs[q];
        for _ in 0..inp.u8() % (QSIZE as u8 + 1) {
            let i = inp.u16() % QSIZE;
            let (a, l, flags) = (addr(&mut inp), len(&mut inp), inp.u16());
            let next = match inp.u8() {
                0..=239 => inp.u16() % QSIZE,
                _ => inp.u16(),
            };
            vq.desc(i, a, l, flags, next);
        }
        for _ in 0..inp.u8() % 4 {
            let at = DATA_BASE + u64::from(inp.u32()) % (BUF_SPAN - 256);
            let n = usize::from(inp.u8());
            let bytes = inp.bytes(n);
            mem.write_slice(bytes, GuestAddress(at)).unwrap();
        }
        for _ in 0..inp.u8() % (2 * QSIZE as u8) {
            vq.publish(inp.u16() % (QSIZE + 2));
        }
        match inp.u8() {
            0..=15 => vq.set_avail_idx(inp.u16()),
            16..=31 => {
                // A frame waiting in the net back end.
                let n = usize::from(inp.u16()) % 2048;
                let frame = inp.bytes(n);
                if let Some(p) = &peer {
                    let _ = p.send(frame);
                }
            }
            32..=47 => {
                let token = DEVICE_TOKEN_BASE + u32::from(inp.u8() % 4);
                dev.handle_event(token, EventSet::IN | EventSet::OUT);
            }
            _ => {}
        }
        dev.handle_event(q as u32, EventSet::IN);
    }
    if kind != 3 {
        let mut canary = [0u8; CANARY_LEN];
        mem.read_slice(&mut canary, GuestAddress(CANARY)).unwrap();
        assert!(
            canary.iter().all(|b| *b == 0xa5),
            "{} wrote guest memory outside any buffer",
            DEVICES[usize::from(kind)]
        );
    }
    dev.reset();
}

/// A snapshot `state.json` as the VMM reads it on restore: parsed and version-checked,
/// its VM config validated, then each rng, balloon and block device's transport and device
/// state restored into a real device on fixture memory (re-activating it when the snapshot
/// says the driver had it running) and its queues notified.
pub fn snapshot_state(data: &[u8]) {
    let Ok(snap) = crate::snapshot::parse_state(data, "state.json") else {
        return;
    };
    let _ = snap.config.validate();
    let mem = memory();
    let epoll = Arc::new(Epoll::new().unwrap());
    for (i, d) in snap.devices.iter().take(8).enumerate() {
        let dev: Box<dyn VirtioDevice> = match d.device_type {
            TYPE_RNG => Box::new(rng::Rng::new()),
            TYPE_BALLOON => Box::new(balloon::Balloon::new(0)),
            TYPE_BLOCK => {
                let cfg = BlockConfig {
                    path: scratch().join("block.img"),
                    read_only: true,
                };
                match block::Block::new(&cfg) {
                    Ok(b) => Box::new(b),
                    Err(_) => continue,
                }
            }
            _ => continue,
        };
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let poller = Poller::new(epoll.clone(), i as u32);
        let Ok(mut t) = MmioTransport::new(dev, mem.clone(), irq, poller) else {
            continue;
        };
        if t.restore_state(&d.transport, &d.device).is_err() {
            continue;
        }
        t.handle_event(ACTIVATE_TOKEN, EventSet::IN);
        for q in 0..t.queue_evts().len() as u32 {
            t.handle_event(q, EventSet::IN);
        }
        let _ = t.save_state();
    }
}

/// The control API as the VMM serves it: the fuzzer's bytes arrive in chunks on one
/// connection and are framed and parsed as the server does ([`crate::api::server::take_requests`]);
/// every request parsed must survive a round trip through its own wire form, and a
/// configuration in one is validated as `configure` does. The same bytes are also read as
/// a response line, as the host's client reads one.
pub fn api_requests(data: &[u8]) {
    use crate::api::{parse_request, Request, Response};
    let _ = Response::parse(data);
    let mut inp = Input::new(data);
    let mut buf = Vec::new();
    while !inp.is_empty() {
        let n = usize::from(inp.u8()) * 4 + 1;
        buf.extend_from_slice(inp.bytes(n));
        let (requests, bad) = crate::api::server::take_requests(&mut buf);
        for req in &requests {
            let line = req.to_line();
            let back = parse_request(line.trim_end().as_bytes())
                .unwrap_or_else(|e| panic!("request {req:?} does not parse back: {e}"));
            assert_eq!(&back, req, "request changed in a round trip");
            if let Request::Configure { config } = req {
                let _ = config.validate();
            }
        }
        if bad.is_some() {
            return;
        }
    }
}
