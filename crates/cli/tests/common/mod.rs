//! Shared set-up for end-to-end tests of the `vessel` CLI with real guests
//! (QEMU backend). Missing prerequisites skip loudly, and fail in CI.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config: PathBuf,
}

use vessel_testutil::repo;

/// A state root and config pointing at the guest from `make guest`, or
/// `None` (loudly) when a prerequisite is missing outside CI.
pub fn env() -> Option<Env> {
    let guest = vessel_testutil::guest_dir();
    let (kernel, initramfs) = (guest.join("vmlinux"), guest.join("initramfs.cpio.gz"));
    let mut missing: Vec<String> = [
        kernel.clone(),
        initramfs.clone(),
        "/usr/bin/qemu-system-x86_64".into(),
        "/usr/local/bin/vhost-device-vsock".into(),
        "/usr/local/bin/virtiofsd".into(),
        "/bin/busybox".into(),
    ]
    .iter()
    .filter(|p| !p.is_file())
    .map(|p| p.display().to_string())
    .collect();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".into());
    }
    if !missing.is_empty() {
        vessel_testutil::skip(
            "this test",
            &format!(
                "it boots real guests and needs: {} (run `make guest deps` as root)",
                missing.join(", ")
            ),
        );
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("vt")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path().join("r");
    let config = dir.path().join("config.toml");
    vessel_testutil::write_config(&config, &root, &guest);
    Some(Env { dir, root, config })
}

impl Env {
    /// A busybox bundle running `args`; `edit` adjusts config.json.
    pub fn bundle(
        &self,
        name: &str,
        args: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> PathBuf {
        let b = self.dir.path().join(name);
        let st = Command::new(repo().join("tests/support/busybox-bundle.sh"))
            .arg(&b)
            .arg(VESSEL)
            .arg("--")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "busybox-bundle.sh failed");
        let p = b.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        b
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(VESSEL);
        c.arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root);
        c
    }

    /// Runs `vessel <args>` with stdin from /dev/null; returns the output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `vessel create` with stdout/stderr to files (the supervisor keeps
    /// them open until the container exits, as runc's container process does).
    pub fn create(&self, id: &str, bundle: &Path) -> (PathBuf, PathBuf) {
        let (out, err) = (
            self.dir.path().join(format!("{id}.out")),
            self.dir.path().join(format!("{id}.err")),
        );
        let st = self
            .cmd()
            .args(["create", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "create {id}: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        (out, err)
    }

    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let o = self.run(&["state", id]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)
            .map(|s| s["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "gone".into())
    }

    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.status(id) == want),
            "{id} never became {want} (is {})",
            self.status(id)
        );
    }

    /// Asserts nothing of container `id` is left: state dir, processes, mounts.
    pub fn assert_clean(&self, id: &str) {
        let dir = self.root.join(id);
        assert!(!dir.exists(), "{} left behind", dir.display());
        let needle = format!("{}/", dir.display());
        assert!(
            wait_until(Duration::from_secs(10), || processes_mentioning(&needle)
                .is_empty()),
            "processes left: {:?}",
            processes_mentioning(&needle)
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&needle), "mounts left under {needle}");
    }
}

/// A failed test must not leave VMs running: force-delete what is left.
impl Drop for Env {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = self
                .cmd()
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .output();
        }
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub use vessel_testutil::{processes_mentioning, wait_until};
