//! Tripwires over /proc/sysrq-trigger (escape monitoring).
//!
//! A container that masks /proc/sysrq-trigger (OCI `maskedPaths`) or makes it
//! read-only (`readonlyPaths`, the OCI and CRI default) gets, in place of that
//! protection, a bind mount of a file the agent owns: `trigger` on a one-page
//! tmpfs of its own under `<work>/sysrq/<container id>`. A write never reaches
//! the kernel's SysRq; the agent watches the file with inotify
//! (`IN_CLOSE_WRITE`: one event per writer, when it closes the file or
//! exits), reports a `SYSRQ_TRIGGER` event with the container's id and what
//! was written, and empties the file. Ordinary opens cost nothing: only that
//! one inode is watched.
//!
//! A container that leaves the path alone (privileged) writes the real file;
//! the kernel then logs `sysrq: ...`, which [`crate::kmsg`] reports.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::runtime::{LinuxNamespaceType, MountBuilder, Spec};
use vessel_protocol::agent::security_event::Kind;

/// The path the tripwire covers in a container.
pub const TARGET: &str = "/proc/sysrq-trigger";
/// Directory of the tripwires, under the agent's working directory.
const DIR: &str = "sysrq";
const FILE: &str = "trigger";
/// At most this many written bytes are shown in an event.
const MAX_SHOWN: usize = 32;

/// Whether the spec has a mount namespace of its own, mounts a procfs on
/// /proc and masks /proc/sysrq-trigger or makes it read-only: then a write
/// there is something the container is not meant to do, and a tripwire takes
/// the protection's place (in the container's mount namespace only: without
/// one the mount would land in the agent's).
pub fn wanted(spec: &Spec) -> bool {
    let proc_mounted = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.destination() == Path::new("/proc") && m.typ().as_deref() == Some("proc"));
    let Some(linux) = spec.linux() else {
        return false;
    };
    let own_mount_ns = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::Mount && n.path().is_none());
    let listed = |paths: &Option<Vec<String>>| paths.iter().flatten().any(|p| p == TARGET);
    own_mount_ns && proc_mounted && (listed(linux.masked_paths()) || listed(linux.readonly_paths()))
}

/// Replaces the spec's protection of /proc/sysrq-trigger by a bind mount of
/// `source` over it (after the /proc mount, as the last mount). Read-only
/// would refuse the write before the tripwire saw it, and a mask would hide
/// the tripwire; the tripwire protects the kernel's file as well as they do.
pub fn rewrite(spec: &mut Spec, source: &Path) {
    if let Some(linux) = spec.linux_mut() {
        let drop_target = |paths: Option<Vec<String>>| {
            paths.map(|mut p| {
                p.retain(|x| x != TARGET);
                p
            })
        };
        let masked = drop_target(linux.masked_paths().clone());
        linux.set_masked_paths(masked);
        let readonly = drop_target(linux.readonly_paths().clone());
        linux.set_readonly_paths(readonly);
    }
    let mount = MountBuilder::default()
        .destination(TARGET)
        .typ("bind")
        .source(source)
        .options(
            ["bind", "nosuid", "nodev", "noexec"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .expect("destination is set");
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(mount);
    spec.set_mounts(Some(mounts));
}

/// The written bytes as shown in an event: at most [`MAX_SHOWN`], printable
/// ASCII kept, anything else escaped.
pub fn shown(bytes: &[u8]) -> String {
    let mut s: String = bytes
        .iter()
        .take(MAX_SHOWN)
        .flat_map(|b| std::ascii::escape_default(*b))
        .map(char::from)
        .collect();
    if bytes.len() > MAX_SHOWN {
        s.push_str("...");
    }
    s
}

/// The containers' tripwires and the inotify instance that watches them.
pub struct Tripwires {
    inotify: OwnedFd,
    root: PathBuf,
    /// Watch descriptor -> container id.
    watches: Mutex<HashMap<i32, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
}

impl Tripwires {
    /// Starts the watcher thread; tripwires live under `<work>/sysrq`.
    pub fn start(work: &Path) -> std::io::Result<Arc<Self>> {
        // SAFETY: inotify_init1 takes no pointers; a non-negative result is a
        // new fd that this process owns alone.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let root = work.join(DIR);
        std::fs::create_dir_all(&root)?;
        let t = Arc::new(Tripwires {
            inotify,
            root,
            watches: Mutex::new(HashMap::new()),
        });
        let w = t.clone();
        std::thread::Builder::new()
            .name("tripwire".into())
            .spawn(move || w.watch())?;
        Ok(t)
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Puts a tripwire over the container's /proc/sysrq-trigger when its spec
    /// protects the file ([`wanted`]) and the kernel has one (built without
    /// SysRq it has none: nothing to protect, and nowhere to mount);
    /// returns whether it did.
    pub fn arm(&self, id: &str, spec: &mut Spec) -> std::io::Result<bool> {
        use nix::mount::{mount, MsFlags};
        if !wanted(spec) || !Path::new(TARGET).exists() {
            return Ok(false);
        }
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir)?;
        // One page: a writer cannot fill the guest's memory. 0711: a
        // container init in a user namespace must reach the file to mount it.
        mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("size=4k,nr_inodes=4,mode=0711"),
        )
        .map_err(std::io::Error::from)?;
        let file = dir.join(FILE);
        let armed = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            // The kernel's file is 0200 root: the same writers can write this.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o200)
                .open(&file)?;
            let path = cstring(&file)?;
            // SAFETY: the path is a valid NUL-terminated string for the
            // duration of the call.
            let wd = unsafe {
                libc::inotify_add_watch(
                    self.inotify.as_raw_fd(),
                    path.as_ptr(),
                    libc::IN_CLOSE_WRITE,
                )
            };
            if wd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            lock(&self.watches).insert(wd, id.to_string());
            Ok(())
        })();
        if let Err(e) = armed {
            self.disarm(id);
            return Err(e);
        }
        rewrite(spec, &file);
        Ok(true)
    }

    /// Removes the container's tripwire, if it has one.
    pub fn disarm(&self, id: &str) {
        let wd = {
            let mut w = lock(&self.watches);
            let wd = w.iter().find(|(_, v)| v.as_str() == id).map(|(k, _)| *k);
            if let Some(wd) = wd {
                w.remove(&wd);
            }
            wd
        };
        if let Some(wd) = wd {
            // SAFETY: plain integers; a stale wd only gives EINVAL.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
        }
        let dir = self.dir(id);
        // Detached: the container's mount namespace may still hold the file.
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&dir);
    }

    /// Reads inotify events for as long as the agent runs.
    fn watch(&self) {
        // Room for many events; each is 16 bytes plus a name (none for a
        // watched file).
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: read writes at most buf.len() bytes into buf.
            let n =
                unsafe { libc::read(self.inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::warn!("sysrq tripwires are not watched any more: {e}");
                return;
            }
            for (wd, mask) in events(&buf[..n as usize]) {
                if mask & libc::IN_CLOSE_WRITE == 0 {
                    continue;
                }
                let Some(id) = lock(&self.watches).get(&wd).cloned() else {
                    continue;
                };
                self.tripped(&id);
            }
        }
    }

    fn tripped(&self, id: &str) {
        let file = self.dir(id).join(FILE);
        let mut written = Vec::new();
        if let Ok(f) = std::fs::File::open(&file) {
            let _ = f.take(MAX_SHOWN as u64 + 1).read_to_end(&mut written);
        }
        // truncate(2), not an open for writing: that would trip the wire again.
        if let Ok(path) = cstring(&file) {
            // SAFETY: the path is a valid NUL-terminated string.
            unsafe { libc::truncate(path.as_ptr(), 0) };
        }
        let detail = format!(
            "write to {TARGET} (\"{}\"), stopped by the tripwire",
            shown(&written)
        );
        log::warn!("container {id}: security event SYSRQ_TRIGGER: {detail}");
        crate::journal::get().event(Kind::SYSRQ_TRIGGER, id, None, detail);
    }
}

/// (watch descriptor, mask) of each whole `struct inotify_event` in `buf`.
fn events(buf: &[u8]) -> Vec<(i32, u32)> {
    const HEADER: usize = 16;
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let word = |i: usize| {
            let b = &buf[at + i..at + i + 4];
            [b[0], b[1], b[2], b[3]]
        };
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let len = u32::from_ne_bytes(word(12)) as usize;
        out.push((wd, mask));
        at += HEADER + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion": "1.0.2", "root": {{"path": "/r"}},
                "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}},
                "mounts": [{{"destination": "/proc", "type": "proc", "source": "proc"}}],
                "linux": {{"namespaces": [{{"type": "mount"}}], {extra}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn a_read_only_sysrq_trigger_becomes_a_bind_mount_of_the_tripwire() {
        let mut s = spec(
            r#""readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
                "maskedPaths": ["/proc/kcore"]"#,
        );
        assert!(wanted(&s));
        rewrite(&mut s, Path::new("/run/vessel-agent/sysrq/c1/trigger"));
        let linux = s.linux().as_ref().unwrap();
        assert_eq!(
            linux.readonly_paths().as_deref(),
            Some(&["/proc/sys".to_string()][..])
        );
        assert_eq!(
            linux.masked_paths().as_deref(),
            Some(&["/proc/kcore".to_string()][..])
        );
        let last = s.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(last.destination(), Path::new(TARGET));
        assert_eq!(last.typ().as_deref(), Some("bind"));
        assert_eq!(
            last.source().as_deref(),
            Some(Path::new("/run/vessel-agent/sysrq/c1/trigger"))
        );
        // After the /proc mount.
        assert_eq!(
            s.mounts().as_ref().unwrap()[0].destination(),
            Path::new("/proc")
        );
    }

    #[test]
    fn a_masked_one_is_wanted_and_an_unprotected_or_procless_one_is_not() {
        assert!(wanted(&spec(r#""maskedPaths": ["/proc/sysrq-trigger"]"#)));
        assert!(!wanted(&spec(r#""readonlyPaths": ["/proc/sys"]"#)));
        let mut s = spec(r#""readonlyPaths": ["/proc/sysrq-trigger"]"#);
        s.set_mounts(Some(vec![]));
        assert!(!wanted(&s));
        let mut s = spec(r#""readonlyPaths": ["/proc/sysrq-trigger"]"#);
        s.linux_mut().as_mut().unwrap().set_namespaces(Some(vec![]));
        assert!(!wanted(&s));
    }

    #[test]
    fn written_bytes_are_shown_escaped_and_capped() {
        assert_eq!(shown(b"h\n"), "h\\n");
        assert_eq!(shown(b"\x1b[2J"), "\\x1b[2J");
        let long = shown(&[b'c'; 100]);
        assert_eq!(long, format!("{}...", "c".repeat(MAX_SHOWN)));
    }

    #[test]
    fn inotify_records_are_split_by_their_name_length() {
        let mut buf = Vec::new();
        for (wd, mask, name) in [(3i32, 8u32, 0u32), (4, 8, 16)] {
            buf.extend(wd.to_ne_bytes());
            buf.extend(mask.to_ne_bytes());
            buf.extend(0u32.to_ne_bytes());
            buf.extend(name.to_ne_bytes());
            buf.extend(vec![0u8; name as usize]);
        }
        // A truncated record at the end is ignored.
        buf.extend([1, 2, 3]);
        assert_eq!(events(&buf), vec![(3, 8), (4, 8)]);
    }
}
