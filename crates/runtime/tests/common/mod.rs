//! Shared set-up for tests that boot real guests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vessel_runtime::Config;

/// The guest built by `make guest`, or `None` (with a loud message) when the
/// prerequisites are missing outside CI. In CI a missing prerequisite fails.
pub fn guest_config(state_root: &Path) -> Option<Config> {
    let dir = std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/guest"));
    let mut cfg = Config {
        state_root: state_root.to_path_buf(),
        ..Config::default()
    };
    cfg.guest_kernel = dir.join("vmlinux");
    cfg.guest_initramfs = dir.join("initramfs.cpio.gz");
    let mut missing = Vec::new();
    for p in [
        &cfg.guest_kernel,
        &cfg.guest_initramfs,
        &cfg.qemu.path,
        &cfg.qemu.vhost_vsock_path,
    ] {
        if !p.is_file() {
            missing.push(p.display().to_string());
        }
    }
    if nix::unistd::geteuid().as_raw() != 0 {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return Some(cfg);
    }
    let msg = format!(
        "SKIPPED: this test boots a real guest and needs: {} (run `make guest deps` as root)",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; prerequisites are installed in CI, so this is a failure");
    }
    eprintln!("\n!!!!! {msg}\n");
    None
}

/// Processes whose command line mentions `needle`.
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

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

pub fn pid_alive(pid: u32) -> bool {
    // A reaped process no longer exists; a zombie would still count as alive.
    Path::new(&format!("/proc/{pid}")).exists()
}
