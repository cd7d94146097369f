//! Helpers shared by the tests of the workspace: skipping loudly (failing in
//! CI), leak checks over /proc, polling with a timeout (never a bare sleep),
//! and [`fake`]: a fake hypervisor, VM and agent for unit tests.

pub mod fake;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guest built by `make guest`: `$VESSEL_GUEST_DIR`, else `build/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("build/guest"))
}

/// Writes a Vessel configuration file at `path`: state under `state_root`,
/// the guest kernel and initramfs from `guest` (see [`guest_dir`]).
pub fn write_config(path: &Path, state_root: &Path, guest: &Path) {
    std::fs::write(
        path,
        format!(
            "state_root = \"{}\"\nguest_kernel = \"{}\"\nguest_initramfs = \"{}\"\n",
            state_root.display(),
            guest.join("vmlinux").display(),
            guest.join("initramfs.cpio.gz").display()
        ),
    )
    .unwrap();
}

/// Reports that `test` cannot run, and `why`. In CI (`CI` set) every
/// prerequisite is installed, so not running is a failure there: this panics.
/// Elsewhere it prints loudly and the caller returns.
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} could not run in CI, which has every prerequisite: {why}"
    );
    eprintln!("\n!!!!! SKIPPED {test}: {why}\n");
}

/// Interval between two evaluations of a [`wait_until`] condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Processes whose command line mentions `needle` (not this test process).
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            found.push(format!("{pid}: {cmd}"));
        }
    }
    found
}

/// Polls `cond` until it holds or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    cond()
}

/// Whether `pid` exists (a reaped process does not; a zombie still does).
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
