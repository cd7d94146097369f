//! Shared set-up for the `builtin` backend tests with vessel-vmm and its tiny
//! test guest (a vsock echo server).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const T: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub use vessel_testutil::skip;

/// `$var`, or `target/debug/<name>`, if it exists.
pub fn binary(var: &str, name: &str) -> Option<PathBuf> {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug").join(name));
    p.is_file().then_some(p)
}

/// Why /dev/kvm cannot be used, if it cannot.
pub fn kvm_unusable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm is not usable ({e})"))
}

/// Builds the tiny guest into `dir`; returns it and a placeholder initramfs
/// (the backend requires one; the tiny guest ignores it).
pub fn tiny_guest(dir: &Path) -> (PathBuf, PathBuf) {
    let guest = dir.join("tiny-guest.elf");
    let status = Command::new("sh")
        .arg(repo().join("crates/vmm/tests/guest/build.sh"))
        .arg(&guest)
        .status()
        .expect("run crates/vmm/tests/guest/build.sh (needs gcc and binutils)");
    assert!(status.success(), "building the tiny guest failed");
    let initramfs = dir.join("initramfs");
    std::fs::write(&initramfs, b"unused by the tiny guest").unwrap();
    (guest, initramfs)
}

/// Polls `cond` until it holds; fails after [`T`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < T, "{what} within {T:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the file at `path` contains `needle`.
pub fn wait_for_text(path: &Path, needle: &str) {
    wait_for(&format!("{needle:?} in {}", path.display()), || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
    });
}

/// One hybrid-vsock connection to the guest's echo server: `CONNECT port`,
/// then `text` (one line) there and back.
pub fn echo(uds: &Path, port: u32, text: &str) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "handshake reply {line:?}");
    s.write_all(text.as_bytes()).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, text);
}
