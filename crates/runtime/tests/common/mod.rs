//! Shared set-up for tests that boot real guests.

use std::path::Path;

use vessel_runtime::Config;
pub use vessel_testutil::TestHypervisor;

/// The guest built by `make guest`, on the backend `VESSEL_TEST_HYPERVISOR`
/// names (see [`guest_config_with`]).
#[allow(dead_code)]
pub fn guest_config(state_root: &Path) -> Option<Config> {
    guest_config_with(state_root, TestHypervisor::from_env())
}

/// The guest built by `make guest` on backend `hv` (the configuration the CLI and
/// shim tests write, loaded as a user's would be), or `None` (with a loud message)
/// when the prerequisites are missing outside CI. In CI a missing prerequisite
/// fails.
pub fn guest_config_with(state_root: &Path, hv: TestHypervisor) -> Option<Config> {
    let dir = vessel_testutil::guest_dir();
    // Beside the state root, which must stay empty.
    let file = tempfile::NamedTempFile::new().unwrap();
    vessel_testutil::write_config_for(file.path(), state_root, &dir, hv);
    let (cfg, _) = Config::load(Some(file.path())).unwrap();
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
    vessel_testutil::skip(
        "this test",
        &format!(
            "it boots a real guest and needs: {} (run `make guest deps` as root)",
            missing.join(", ")
        ),
    );
    None
}

pub use vessel_testutil::{pid_alive, processes_mentioning, wait_until};

/// Asserts that `pids` have exited and that no process and no state of any
/// sandbox under the state root remain.
pub fn assert_nothing_left(cfg: &Config, pids: &[u32]) {
    for pid in pids {
        assert!(
            wait_until(std::time::Duration::from_secs(5), || !pid_alive(*pid)),
            "process {pid} still running"
        );
    }
    let root = cfg.state_root.to_string_lossy().to_string();
    assert_eq!(
        processes_mentioning(&root),
        Vec::<String>::new(),
        "processes left behind"
    );
    let left: Vec<_> = std::fs::read_dir(&cfg.state_root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}
