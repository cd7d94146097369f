//! Helpers for tests that run the VMM binary against /dev/kvm with the tiny test guest.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The VMM binary under test.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vessel-vmm")
}

pub use vessel_testutil::skip;

/// Whether /dev/kvm can be opened, and if not, why.
pub fn kvm_error() -> Option<std::io::Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
}

/// True if /dev/kvm can be opened; otherwise skips `test` (see [`skip`]).
pub fn kvm_available(test: &str) -> bool {
    match kvm_error() {
        None => true,
        Some(e) => {
            skip(
                test,
                &format!("/dev/kvm is not usable ({e}); this test needs KVM (hardware or PVM)"),
            );
            false
        }
    }
}

/// The project's guest kernel (PVH vmlinux): `VESSEL_GUEST_KERNEL` or `build/guest/vmlinux`.
pub fn guest_kernel() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/guest/vmlinux")
        })
}

/// The same kernel as a bzImage: in `VESSEL_GUEST_DIR`, else beside [`guest_kernel`]
/// (guest/kernel/build.sh builds both).
pub fn guest_bzimage() -> PathBuf {
    match std::env::var_os("VESSEL_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir).join("bzImage"),
        None => guest_kernel().with_file_name("bzImage"),
    }
}

/// Builds the tiny guest once per test binary and returns its path.
pub fn tiny_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("vessel-tiny-guest-{}.elf", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build.sh");
        let status = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run tests/guest/build.sh (needs gcc and binutils)");
        assert!(status.success(), "building the tiny guest failed");
        out
    })
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vmm-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// Polls `f` every few ms until it returns Some or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `path` contains `needle`; returns the file's contents.
pub fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> String {
    poll(timeout, || {
        let s = std::fs::read_to_string(path).ok()?;
        s.contains(needle).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "{needle:?} did not appear in {} within {timeout:?}; it has:\n{}",
            path.display(),
            std::fs::read_to_string(path).unwrap_or_default()
        )
    })
}

/// Waits for the child to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    match poll(timeout, || child.try_wait().ok().flatten()) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("VMM did not exit within {timeout:?}");
        }
    }
}

/// Starts the VMM with `args`.
pub fn spawn(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .args(args)
        .spawn()
        .expect("spawn vessel-vmm")
}

/// Sends one API request and returns the parsed response.
pub fn api(sock: &Path, request: &str) -> serde_json::Value {
    let mut s = poll(Duration::from_secs(10), || UnixStream::connect(sock).ok())
        .unwrap_or_else(|| panic!("API socket {} never accepted", sock.display()));
    // Generous: in the KVM lane (nested under TCG) a snapshot of a Linux guest's memory
    // under load took more than 30 s.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad API response {line:?}: {e}"))
}

/// Kills the child on drop (so a failing test leaves no VMM behind).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A virtiofsd binary: `VESSEL_VIRTIOFSD`, `virtiofsd` on PATH, or a distribution's.
pub fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VESSEL_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("virtiofsd"))
            .find(|p| p.exists())
    });
    on_path.or_else(|| {
        ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

/// Starts virtiofsd on `sock` sharing `dir` and waits for its socket. Debian's C daemon
/// (under /usr/lib/qemu) takes `-o` options; the Rust one takes `--shared-dir`.
pub fn start_virtiofsd(bin: &Path, sock: &Path, dir: &Path) -> Option<Guard> {
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--socket-path={}", sock.display()));
    if bin.to_string_lossy().contains("qemu") {
        cmd.args([
            "-o",
            &format!("source={}", dir.display()),
            "-o",
            "cache=none",
        ]);
    } else {
        cmd.args(["--shared-dir", dir.to_str()?, "--cache", "never"]);
    }
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let guard = Guard(child);
    poll(Duration::from_secs(10), || sock.exists().then_some(()))?;
    Some(guard)
}
