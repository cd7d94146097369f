//! cargo-fuzz entry points of the hybrid-vsock muxer (feature `fuzzing`): the VMM side of
//! the `CONNECT <port>` handshake and the muxer's handling of guest packets, host
//! connections and host data, in a fuzzer-chosen order.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use vmm_sys_util::epoll::{Epoll, EventSet};

use super::muxer::{Muxer, FIRST_STREAM_TOKEN};
use super::packet::{Header, TYPE_STREAM};
use super::HOST_CID;
use crate::devices::virtio::Poller;
use crate::fuzzing::Input;

/// The guest port a host listener waits on (guest-initiated connections to it succeed).
const LISTENING_PORT: u32 = 1024;
const GUEST_CID: u64 = 3;
const MAX_OPS: usize = 64;

/// The VMM's parser of a host's `CONNECT <port>` line (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    super::muxer::parse_connect(line)
}

fn dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vessel-fuzz-mux-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the fuzz scratch dir");
        d
    })
    .clone()
}

fn port(inp: &mut Input) -> u32 {
    match inp.u8() % 4 {
        0 => LISTENING_PORT,
        1 => 1 + u32::from(inp.u8() % 4),
        2 => u32::MAX - u32::from(inp.u8() % 4),
        _ => inp.u32(),
    }
}

/// A muxer (guest CID 3) with a host listener on `<uds>_1024`, driven by fuzzer-chosen
/// operations: guest packets of any op, type, ports, flags and credit; host connections
/// sending arbitrary handshake bytes and data; stream events; and the guest reading what
/// the muxer has for it. It must not panic or hang.
pub fn muxer(data: &[u8]) {
    let mut inp = Input::new(data);
    let uds = dir().join("m.sock");
    let mut guest_side = uds.as_os_str().to_owned();
    guest_side.push(format!("_{LISTENING_PORT}"));
    let _ = std::fs::remove_file(&guest_side);
    let Ok(listener) = UnixListener::bind(&guest_side) else {
        return;
    };
    let _ = listener.set_nonblocking(true);
    let poller = Poller::new(Arc::new(Epoll::new().unwrap()), 0);
    let Ok(mut m) = Muxer::new(GUEST_CID, uds.clone()) else {
        return;
    };
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 6 {
            0 => {
                let hdr = Header {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port: port(&mut inp),
                    dst_port: port(&mut inp),
                    len: 0,
                    type_: if inp.u8() < 240 {
                        TYPE_STREAM
                    } else {
                        inp.u16()
                    },
                    op: u16::from(inp.u8() % 9),
                    flags: u32::from(inp.u8()),
                    buf_alloc: inp.u32(),
                    fwd_cnt: inp.u32(),
                };
                let n = usize::from(inp.u16()) % 4096;
                let payload = inp.bytes(n);
                let hdr = Header {
                    len: payload.len() as u32,
                    ..hdr
                };
                m.guest_packet(&hdr, payload, &poller);
            }
            1 => {
                let n = usize::from(inp.u8());
                let line = inp.bytes(n);
                if let Ok(mut s) = UnixStream::connect(&uds) {
                    let _ = s.write_all(line);
                    let _ = s.set_nonblocking(true);
                    hosts.push(s);
                }
                m.accept(&poller);
            }
            2 => {
                let mut buf = Vec::new();
                let _ = m.next_rx(usize::from(inp.u16()), &mut buf, &poller);
            }
            3 => {
                let token = FIRST_STREAM_TOKEN + u32::from(inp.u8() % 8);
                let bits = inp.u8();
                let mut ev = EventSet::empty();
                for (bit, e) in [
                    (1, EventSet::IN),
                    (2, EventSet::OUT),
                    (4, EventSet::READ_HANG_UP),
                    (8, EventSet::HANG_UP),
                    (16, EventSet::ERROR),
                ] {
                    if bits & bit != 0 {
                        ev |= e;
                    }
                }
                m.stream_event(token, ev, &poller);
            }
            4 => {
                let i = usize::from(inp.u8());
                let n = usize::from(inp.u16()) % 8192;
                let bytes = inp.bytes(n);
                let all = hosts.len() + accepted.len();
                if all > 0 {
                    let i = i % all;
                    let s = if i < hosts.len() {
                        &mut hosts[i]
                    } else {
                        &mut accepted[i - hosts.len()]
                    };
                    if inp.u8() & 1 == 0 {
                        let _ = s.write(bytes);
                    } else {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
            _ => {
                while let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    accepted.push(s);
                }
                if inp.u8() & 1 == 1 {
                    m.expire_handshakes(&poller);
                }
            }
        }
    }
    m.clear(&poller);
    drop(m);
    let _ = std::fs::remove_file(&guest_side);
}
