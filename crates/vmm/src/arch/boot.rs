//! Loading the kernel, initramfs and command line, and writing the boot information the
//! kernel reads: PVH `hvm_start_info` for an ELF `vmlinux` with a PVH note, the Linux zero
//! page for a `bzImage`.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::layout::*;
use super::regs::EntryMode;

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum BootError {
    /// Cannot open {0}: {1}
    Open(String, std::io::Error),
    /// Cannot load the kernel {0} (neither a PVH ELF vmlinux nor a bzImage): {1}
    LoadKernel(String, loader::Error),
    /// The ELF kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use a bzImage or a kernel built with CONFIG_PVH=y
    NoPvhEntry(String),
    /// The initramfs {0} ({1} bytes) does not fit in guest memory below {2:#x}; give the VM more memory
    InitrdTooLarge(String, u64, u64),
    /// Cannot read the initramfs {0} into guest memory: {1}
    ReadInitrd(String, vm_memory::GuestMemoryError),
    /// Cannot write the kernel command line: {0}
    Cmdline(loader::Error),
    /// Invalid kernel command line: {0}
    CmdlineBuild(linux_loader::cmdline::Error),
    /// Cannot write boot information at {0:#x}: {1}
    Write(u64, vm_memory::GuestMemoryError),
}

/// Where the kernel was loaded and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// Entry protocol.
    pub mode: EntryMode,
    /// Entry point address.
    pub entry: u64,
    /// Address of the boot information (`hvm_start_info` or zero page).
    pub boot_info: u64,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Guest RAM as e820 entries: low memory up to the EBDA, then everything from 1 MiB.
fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Top of the RAM region below 4 GiB, where the initramfs goes.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0)
        .min(MMIO_GAP_START)
}

/// Loads `kernel`, `initrd` and `cmdline` into `mem`; returns how to enter the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<KernelEntry, BootError> {
    let name = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| BootError::Open(name.clone(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    let (mode, entry, kernel_end, setup_header) = match Elf::load(mem, None, &mut file, himem) {
        Ok(res) => match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => {
                (EntryMode::Pvh, addr.raw_value(), res.kernel_end, None)
            }
            _ => return Err(BootError::NoPvhEntry(name)),
        },
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let res = BzImage::load(mem, None, &mut file, himem)
                .map_err(|e| BootError::LoadKernel(name.clone(), e))?;
            // The 64-bit entry point is 0x200 past the protected-mode code.
            let entry = res.kernel_load.raw_value() + 0x200;
            (EntryMode::Linux64, entry, res.kernel_end, res.setup_header)
        }
        Err(e) => return Err(BootError::LoadKernel(name, e)),
    };

    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(0);

    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end)?),
        None => None,
    };

    let boot_info = match mode {
        EntryMode::Pvh => write_pvh_info(mem, initrd)?,
        EntryMode::Linux64 => write_zero_page(mem, setup_header, initrd, cmdline_len)?,
    };
    Ok(KernelEntry {
        mode,
        entry,
        boot_info,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::Open(name.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Open(name.clone(), e))?
        .len();
    let top = low_ram_end(mem);
    // Highest page-aligned address that fits, and above the kernel.
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| BootError::InitrdTooLarge(name.clone(), size, top))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::ReadInitrd(name, e))?;
    Ok((addr, size))
}

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemoryMmap,
    addr: u64,
    val: T,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|e| BootError::Write(addr, e))
}

fn write_pvh_info(mem: &GuestMemoryMmap, initrd: Option<(u64, u64)>) -> Result<u64, BootError> {
    let map = e820_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        write_obj(
            mem,
            MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            entry,
        )?;
    }
    let mut info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        write_obj(mem, MODLIST_START, module)?;
        info.nr_modules = 1;
        info.modlist_paddr = MODLIST_START;
    }
    write_obj(mem, PVH_INFO_START, info)?;
    Ok(PVH_INFO_START)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    setup_header: Option<loader::bootparam::setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<u64, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, type_)) in e820_map(mem).into_iter().enumerate() {
        params.e820_table[i].addr = addr;
        params.e820_table[i].size = size;
        params.e820_table[i].r#type = type_;
        params.e820_entries = (i + 1) as u8;
    }
    write_obj(mem, ZERO_PAGE_START, params)?;
    Ok(ZERO_PAGE_START)
}

/// Builds the kernel command line: the user's line, device declarations, and quirks.
pub fn build_cmdline(base: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::CmdlineBuild)?;
    if !base.is_empty() {
        cmdline.insert_str(base).map_err(BootError::CmdlineBuild)?;
    }
    for e in extra {
        cmdline.insert_str(e).map_err(BootError::CmdlineBuild)?;
    }
    Ok(cmdline)
}

/// Adds a `virtio_mmio.device=` declaration for a device window.
pub fn add_virtio_mmio(cmdline: &mut Cmdline, base: u64, irq: u32) -> Result<(), BootError> {
    cmdline
        .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
        .map_err(BootError::CmdlineBuild)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_above_1m() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn rejects_non_kernels() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), vec![0u8; 4096]).unwrap();
        let cmd = build_cmdline("console=ttyS0", &[]).unwrap();
        assert!(load(&mem, f.path(), None, &cmd).is_err());
    }
}
