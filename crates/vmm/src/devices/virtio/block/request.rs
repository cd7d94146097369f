//! Parsing and executing one virtio-blk request. Everything here comes from the guest:
//! descriptor addresses, lengths, directions and the sector are all checked before use.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::SECTOR_SIZE;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: u32 = 16;
/// Most data descriptors accepted in one request.
const MAX_SEGMENTS: usize = 256;

/// Request status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// I/O error (also: out of range, read-only).
    IoErr = 1,
    /// Unsupported request type.
    Unsupported = 2,
}

/// Malformed request chains.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum RequestError {
    /// The chain is empty
    Empty,
    /// The header descriptor is device-writable or shorter than 16 bytes
    BadHeader,
    /// Cannot read the request header from guest memory
    HeaderMemory,
    /// The last descriptor is not a device-writable status byte
    BadStatus,
    /// Data descriptor {0} goes the wrong direction
    WrongDirection(usize),
    /// Too many data descriptors (more than 256)
    TooManySegments,
    /// Data descriptor {0} is outside guest memory
    DataOutOfRange(usize),
    /// The status byte cannot be written ({0})
    StatusUnwritable(u64),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Status byte.
    pub status: GuestAddress,
}

impl Request {
    /// Total data length.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Writes the status byte.
    pub fn write_status(&self, mem: &GuestMemoryMmap, status: Status) -> Result<(), RequestError> {
        mem.write_obj(status as u8, self.status)
            .map_err(|_| RequestError::StatusUnwritable(self.status.0))
    }
}

/// Parses a chain: header (readable), data (direction per type), status (writable).
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<Request, RequestError> {
    // The chain iterator stops after queue-size descriptors, so loops end here.
    let descs: Vec<_> = chain.take(MAX_SEGMENTS + 2).collect();
    let (first, rest) = descs.split_first().ok_or(RequestError::Empty)?;
    if first.is_write_only() || first.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let kind: u32 = mem
        .read_obj(first.addr())
        .map_err(|_| RequestError::HeaderMemory)?;
    let sector: u64 = first
        .addr()
        .0
        .checked_add(8)
        .and_then(|a| mem.read_obj(GuestAddress(a)).ok())
        .ok_or(RequestError::HeaderMemory)?;
    let (status, data) = rest.split_last().ok_or(RequestError::BadStatus)?;
    if !status.is_write_only() || status.len() < 1 {
        return Err(RequestError::BadStatus);
    }
    if !mem.check_range(status.addr(), 1) {
        return Err(RequestError::StatusUnwritable(status.addr().0));
    }
    if data.len() > MAX_SEGMENTS {
        return Err(RequestError::TooManySegments);
    }
    let want_writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let mut out = Vec::with_capacity(data.len());
    for (i, d) in data.iter().enumerate() {
        if matches!(
            kind,
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID
        ) && d.is_write_only() != want_writable
        {
            return Err(RequestError::WrongDirection(i));
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::DataOutOfRange(i));
        }
        out.push((d.addr(), d.len()));
    }
    Ok(Request {
        kind,
        sector,
        data: out,
        status: status.addr(),
    })
}

/// Executes `req` against `file`; returns the status and the bytes written to the guest.
pub fn execute(
    req: &Request,
    mem: &GuestMemoryMmap,
    file: &mut File,
    read_only: bool,
    capacity_sectors: u64,
    id: &[u8; 20],
) -> (Status, u32) {
    match req.kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let len = req.data_len();
            let in_range = req
                .sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len).map(|end| (start, end)))
                .filter(|(_, end)| *end <= capacity_sectors * SECTOR_SIZE);
            let Some((start, _)) = in_range else {
                return (Status::IoErr, 0);
            };
            if req.kind == VIRTIO_BLK_T_OUT && read_only {
                return (Status::IoErr, 0);
            }
            if file.seek(SeekFrom::Start(start)).is_err() {
                return (Status::IoErr, 0);
            }
            let mut written = 0u32;
            for (addr, l) in &req.data {
                let res = if req.kind == VIRTIO_BLK_T_IN {
                    mem.read_exact_volatile_from(*addr, file, *l as usize)
                } else {
                    mem.write_all_volatile_to(*addr, file, *l as usize)
                };
                if res.is_err() {
                    return (Status::IoErr, written);
                }
                if req.kind == VIRTIO_BLK_T_IN {
                    written = written.saturating_add(*l);
                }
            }
            (Status::Ok, written)
        }
        VIRTIO_BLK_T_FLUSH => {
            if read_only {
                return (Status::Ok, 0);
            }
            match file.flush().and_then(|_| file.sync_data()) {
                Ok(()) => (Status::Ok, 0),
                Err(_) => (Status::IoErr, 0),
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some((addr, l)) = req.data.first() else {
                return (Status::IoErr, 0);
            };
            let n = (*l as usize).min(id.len());
            match mem.write_slice(&id[..n], *addr) {
                Ok(()) => (Status::Ok, n as u32),
                Err(_) => (Status::IoErr, 0),
            }
        }
        _ => (Status::Unsupported, 0),
    }
}
