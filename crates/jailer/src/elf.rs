//! The shared libraries a dynamically linked VMM needs inside the jail.
//!
//! A static vessel-vmm (`-C target-feature=+crt-static`) needs nothing. A dynamic one
//! needs its ELF interpreter and its `DT_NEEDED` libraries, recursively; the jailer
//! bind-mounts exactly those files read-only at their host paths. Only what the dynamic
//! loader finds without `/etc/ld.so.cache` is supported: libraries in the default
//! directories below (no `RPATH`/`RUNPATH`, no `dlopen`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where the loader looks when there is no cache (Debian multiarch first).
pub const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
/// Bounds that keep a corrupt file from making us read forever.
const MAX_PHDRS: u16 = 512;
const MAX_DYN: usize = 4096;
const MAX_STR: usize = 4096;

/// Why the libraries of a binary cannot be listed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ElfError {
    /// cannot read {path:?}
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {path:?} is not a 64-bit little-endian ELF file ({why}); the VMM must be an x86-64 ELF binary
    Format { path: PathBuf, why: &'static str },
    /// {lib:?} (needed by {by:?}) is not in any of {LIB_DIRS:?}: link the VMM statically
    NotFound { lib: String, by: PathBuf },
}

struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// What one ELF file asks of the dynamic loader.
#[derive(Debug, Default, PartialEq)]
struct Dynamic {
    interp: Option<PathBuf>,
    needed: Vec<String>,
}

/// The interpreter and every library `exe` needs (transitively), as host paths; empty for
/// a static binary.
pub fn dependencies(exe: &Path) -> Result<Vec<PathBuf>, ElfError> {
    let top = read_dynamic(exe)?;
    let mut out: Vec<PathBuf> = top.interp.iter().cloned().collect();
    let mut queue: Vec<(String, PathBuf)> = top
        .needed
        .into_iter()
        .map(|n| (n, exe.to_owned()))
        .collect();
    // libc names the loader as a library too; the interpreter already is it.
    let mut seen: Vec<String> = top
        .interp
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect();
    while let Some((name, by)) = queue.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name.clone());
        let path = find_lib(&name).ok_or_else(|| ElfError::NotFound {
            lib: name.clone(),
            by: by.clone(),
        })?;
        let d = read_dynamic(&path)?;
        queue.extend(d.needed.into_iter().map(|n| (n, path.clone())));
        if !out.contains(&path) {
            out.push(path);
        }
    }
    Ok(out)
}

fn find_lib(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    LIB_DIRS
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn read_dynamic(path: &Path) -> Result<Dynamic, ElfError> {
    let read_err = |source| ElfError::Read {
        path: path.to_owned(),
        source,
    };
    let bad = |why| ElfError::Format {
        path: path.to_owned(),
        why,
    };
    let f = File::open(path).map_err(read_err)?;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0)
        .map_err(|_| bad("shorter than an ELF header"))?;
    if &eh[..4] != b"\x7fELF" {
        return Err(bad("no ELF magic"));
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(bad("not ELFCLASS64/ELFDATA2LSB"));
    }
    let phoff = u64_at(&eh, 0x20);
    let phentsize = u16_at(&eh, 0x36);
    let phnum = u16_at(&eh, 0x38);
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Err(bad("bad program header table"));
    }
    let mut phdrs = Vec::with_capacity(phnum.into());
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * u64::from(phentsize))
            .map_err(|_| bad("truncated program header"))?;
        phdrs.push(Phdr {
            kind: u32_at(&ph, 0),
            offset: u64_at(&ph, 8),
            vaddr: u64_at(&ph, 16),
            filesz: u64_at(&ph, 32),
        });
    }
    let mut d = Dynamic::default();
    if let Some(ph) = phdrs.iter().find(|p| p.kind == PT_INTERP) {
        d.interp = Some(PathBuf::from(read_str(&f, ph.offset).map_err(read_err)?));
    }
    let Some(dynamic) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(d);
    };
    let mut needed_offsets = Vec::new();
    let mut strtab_vaddr = None;
    for i in 0..(dynamic.filesz as usize / 16).min(MAX_DYN) {
        let mut ent = [0u8; 16];
        f.read_exact_at(&mut ent, dynamic.offset + i as u64 * 16)
            .map_err(|_| bad("truncated dynamic section"))?;
        match u64_at(&ent, 0) {
            DT_NULL => break,
            DT_NEEDED => needed_offsets.push(u64_at(&ent, 8)),
            DT_STRTAB => strtab_vaddr = Some(u64_at(&ent, 8)),
            _ => {}
        }
    }
    if needed_offsets.is_empty() {
        return Ok(d);
    }
    let strtab_vaddr = strtab_vaddr.ok_or_else(|| bad("DT_NEEDED without DT_STRTAB"))?;
    let strtab = phdrs
        .iter()
        .find(|p| p.kind == PT_LOAD && (p.vaddr..p.vaddr + p.filesz).contains(&strtab_vaddr))
        .map(|p| strtab_vaddr - p.vaddr + p.offset)
        .ok_or_else(|| bad("DT_STRTAB outside every PT_LOAD segment"))?;
    for off in needed_offsets {
        d.needed.push(read_str(&f, strtab + off).map_err(read_err)?);
    }
    Ok(d)
}

/// Reads a NUL-terminated string at `offset` (at most [`MAX_STR`] bytes).
fn read_str(f: &File, offset: u64) -> std::io::Result<String> {
    let mut buf = vec![0u8; MAX_STR];
    let n = f.read_at(&mut buf, offset)?;
    buf.truncate(n);
    let end = buf.iter().position(|b| *b == 0).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "unterminated ELF string")
    })?;
    buf.truncate(end);
    String::from_utf8(buf)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "non-UTF-8 ELF string"))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_needs_libc_and_the_loader() {
        // Test binaries link glibc dynamically (the release agent is the static one).
        let deps = dependencies(&std::env::current_exe().unwrap()).unwrap();
        let names: Vec<_> = deps
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let loaders = names.iter().filter(|n| n.starts_with("ld-linux")).count();
        assert_eq!(loaders, 1, "the loader once, as the interpreter: {deps:?}");
        assert!(names.iter().any(|n| n == "libc.so.6"), "{deps:?}");
        assert!(
            deps.iter().all(|p| p.is_absolute() && p.is_file()),
            "{deps:?}"
        );
        let mut sorted = deps.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), deps.len(), "duplicates in {deps:?}");
    }

    #[test]
    fn not_elf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("script");
        std::fs::write(&p, "#!/bin/sh\necho hi\n").unwrap();
        let e = dependencies(&p).unwrap_err().to_string();
        assert!(e.contains("not a 64-bit little-endian ELF"), "{e}");
        let e = dependencies(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }
}
