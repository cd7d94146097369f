//! Guest memory: anonymous private memory for a fresh boot, or a snapshot's memory file
//! mapped `MAP_PRIVATE` so that every VM restored from one snapshot shares the pages it has
//! not written (copy-on-write in the host page cache).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::arch::layout;

/// Errors while creating, saving or mapping guest memory.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MemoryError {
    /// Guest memory size {0} MiB is invalid (must be between 16 MiB and 1 TiB)
    BadSize(u64),
    /// Cannot map {0} bytes of guest memory: {1}
    Mmap(u64, String),
    /// Cannot build the guest memory map: {0}
    Collection(String),
    /// Cannot access the memory file {0}: {1}
    File(String, std::io::Error),
    /// The memory file {0} has {1} bytes but the snapshot describes {2}
    FileSize(String, u64, u64),
}

/// Creates fresh, zeroed guest memory of `mib` MiB.
pub fn create(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(16..=(1 << 20)).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    let mut regions = Vec::new();
    for (start, len) in layout::ram_regions(mib << 20) {
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap(len, e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Collection(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Collection(e.to_string()))
}

/// Creates guest memory of `mib` MiB in a memfd mapped shared, so that a vhost-user
/// backend (virtiofsd) can map it too.
pub fn create_shared(mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(16..=(1 << 20)).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    let file = memfd(mib << 20)?;
    map_shared(&file, mib << 20)
}

/// A new memfd of `len` bytes (all holes: pages are allocated when written).
fn memfd(len: u64) -> Result<File, MemoryError> {
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is owned below.
    let fd = unsafe { libc::memfd_create(c"vessel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::File(
            "memfd".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(|e| MemoryError::File("memfd".into(), e))?;
    Ok(file)
}

/// Maps `file` (`total` bytes) shared at the RAM layout for `total` bytes.
fn map_shared(file: &File, total: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in layout::ram_regions(total) {
        let fd = file
            .try_clone()
            .map_err(|e| MemoryError::File("memfd".into(), e))?;
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap(len, e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Collection(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Collection(e.to_string()))
}

/// Copies a memory file written by [`save`] into a new memfd mapped shared, for a VM
/// restored with vhost-user devices: their back ends map guest memory by fd, and a
/// private (copy-on-write) mapping of the snapshot file cannot be shared with them.
/// Only the file's data extents are copied (it is sparse: zero pages are holes), so the
/// copy costs what the guest had touched, not its whole RAM; the pages are the clone's
/// own (no sharing between clones).
pub fn restore_shared(path: &Path, total: u64) -> Result<GuestMemoryMmap, MemoryError> {
    use std::os::unix::fs::FileExt;
    let name = path.display().to_string();
    let err = |e| MemoryError::File(name.clone(), e);
    let src = File::open(path).map_err(err)?;
    let len = src.metadata().map_err(err)?.len();
    if len != total {
        return Err(MemoryError::FileSize(name, len, total));
    }
    let dst = memfd(total)?;
    let mut buf = vec![0u8; 1 << 20];
    for (mut at, end) in data_extents(&src, 0, total).map_err(err)? {
        while at < end {
            let n = buf.len().min((end - at) as usize);
            src.read_exact_at(&mut buf[..n], at).map_err(err)?;
            dst.write_all_at(&buf[..n], at)
                .map_err(|e| MemoryError::File("memfd".into(), e))?;
            at += n as u64;
        }
    }
    map_shared(&dst, total)
}

/// The data extents of `file` within `[start, end)`, as `[from, to)` byte ranges clipped
/// to it (`SEEK_DATA`/`SEEK_HOLE`: holes read as zeros and are left out).
fn data_extents(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on an fd `file` owns; SEEK_DATA/SEEK_HOLE only return offsets.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// Total guest RAM in bytes.
pub fn size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Writes all regions back to back into `path`, leaving holes for zero pages so that the
/// file stays sparse. With `shared_memfd` (guest memory made by [`create_shared`] or
/// [`restore_shared`]) only the memfd's data extents are read: a page the guest never
/// touched, or that free page reporting removed, is a hole there, so the cost follows
/// what the guest uses, not its RAM size. Other memory (anonymous, or a snapshot mapped
/// privately, whose untouched pages are the file's) is read page by page.
pub fn save(mem: &GuestMemoryMmap, path: &Path, shared_memfd: bool) -> Result<(), MemoryError> {
    let name = path.display().to_string();
    let err = |e| MemoryError::File(name.clone(), e);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?;
    const PAGE: usize = 4096;
    let mut offset = 0u64;
    for region in mem.iter() {
        let base = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        let len = region.len() as usize;
        // The byte ranges of the region to read: its memfd's data extents, or all of it.
        let ranges = match region.file_offset().filter(|_| shared_memfd) {
            Some(fo) => data_extents(fo.file(), fo.start(), fo.start() + len as u64)
                .map_err(err)?
                .into_iter()
                .map(|(a, b)| ((a - fo.start()) as usize, (b - fo.start()) as usize))
                .collect(),
            None => vec![(0, len)],
        };
        for (from, to) in ranges {
            let mut at = from - from % PAGE;
            while at < to {
                let m = PAGE.min(len - at);
                // SAFETY: `base + at .. + m` lies inside this region's mapping, which
                // `mem` keeps alive; the vCPUs are paused for a snapshot, so the guest
                // does not write it meanwhile.
                let page = unsafe { std::slice::from_raw_parts(base.add(at), m) };
                if !is_zero(page) {
                    file.seek(SeekFrom::Start(offset + at as u64))
                        .map_err(err)?;
                    file.write_all(page).map_err(err)?;
                }
                at += m;
            }
        }
        offset += region.len();
    }
    file.set_len(offset).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(())
}

/// Whether `page` is all zero bytes (by 8-byte words: this runs over every
/// resident page of a snapshot).
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to only reinterprets
        // the aligned middle part.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Maps a memory file written by [`save`] privately (copy-on-write) at the layout for
/// `total` bytes of guest RAM.
pub fn restore(path: &Path, total: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| MemoryError::File(name.clone(), e))?;
    let len = file
        .metadata()
        .map_err(|e| MemoryError::File(name.clone(), e))?
        .len();
    if len != total {
        return Err(MemoryError::FileSize(name, len, total));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, size) in layout::ram_regions(total) {
        let fd = file
            .try_clone()
            .map_err(|e| MemoryError::File(name.clone(), e))?;
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap(size, e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Collection(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Collection(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn save_and_restore_round_trip_privately() {
        let mem = create(16).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((16 << 20) - 1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        save(&mem, &path, false).unwrap();
        let a = restore(&path, 16 << 20).unwrap();
        let b = restore(&path, 16 << 20).unwrap();
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(a.read_obj::<u8>(GuestAddress((16 << 20) - 1)).unwrap(), 7);
        // A write in one restored copy is private to it and never reaches the file.
        a.write_obj(1u32, GuestAddress(0x1234)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        let c = restore(&path, 16 << 20).unwrap();
        assert_eq!(
            c.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert!(restore(&path, 32 << 20).is_err());
    }

    #[test]
    fn shared_restore_copies_the_data_and_is_private_to_each_clone() {
        let mem = create_shared(16).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((16 << 20) - 1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        save(&mem, &path, true).unwrap();
        let a = restore_shared(&path, 16 << 20).unwrap();
        let b = restore_shared(&path, 16 << 20).unwrap();
        assert!(a.iter().all(|r| r.file_offset().is_some()));
        assert_eq!(
            a.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(a.read_obj::<u8>(GuestAddress((16 << 20) - 1)).unwrap(), 7);
        assert_eq!(a.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0);
        a.write_obj(1u32, GuestAddress(0x1234)).unwrap();
        assert_eq!(
            b.read_obj::<u32>(GuestAddress(0x1234)).unwrap(),
            0xdead_beef
        );
        assert_eq!(std::fs::read(&path).unwrap()[0x1234], 0xef);
        assert!(restore_shared(&path, 32 << 20).is_err());
    }

    #[test]
    fn shared_memory_is_file_backed() {
        let mem = create_shared(16).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_some()));
        mem.write_obj(5u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 5);
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(create(1).is_err());
    }
}
