//! Helpers shared by the tests of the workspace: skipping loudly (failing in
//! CI), leak checks over /proc, polling with a timeout (never a bare sleep),
//! and [`fake`]: a fake hypervisor, VM and agent for unit tests (the fakes of
//! vessel-runtime's own traits are `vessel_runtime::fake`, feature
//! `test-fakes`: this crate cannot depend on vessel-runtime, whose tests use it).

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

/// Where tests/support/busybox-image.sh builds and caches the test images
/// (busybox and pause): `$VESSEL_IMAGE_DIR`, else /tmp/vessel-test-images. The
/// KVM lane builds them on the host first (every exec is slow in the lane) and
/// points this at that copy.
pub fn image_dir() -> PathBuf {
    std::env::var_os("VESSEL_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/vessel-test-images"))
}

/// The backend the end-to-end tests run their sandboxes on, from
/// `VESSEL_TEST_HYPERVISOR`: unset or `default` (the configuration's defaults:
/// `auto`), `builtin` (the built-in VMM under the jailer) or `qemu-kvm` (QEMU with
/// `accelerator = "kvm"`). The KVM lane (`make test-lane`) runs the suites with the
/// last two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHypervisor {
    Default,
    Builtin,
    QemuKvm,
}

impl TestHypervisor {
    /// Reads `VESSEL_TEST_HYPERVISOR`; an unknown value panics (a typo must not
    /// silently test the default backend).
    pub fn from_env() -> TestHypervisor {
        match std::env::var("VESSEL_TEST_HYPERVISOR").as_deref() {
            Err(_) | Ok("") | Ok("default") => TestHypervisor::Default,
            Ok("builtin") => TestHypervisor::Builtin,
            Ok("qemu-kvm") => TestHypervisor::QemuKvm,
            Ok(other) => {
                panic!("VESSEL_TEST_HYPERVISOR={other:?}: expected default, builtin or qemu-kvm")
            }
        }
    }

    /// The configuration keys selecting this backend: top-level keys, and the
    /// tables that must follow every top-level key.
    fn config_keys(self) -> (String, String) {
        match self {
            TestHypervisor::Default => (String::new(), String::new()),
            TestHypervisor::QemuKvm => (
                "hypervisor = \"qemu\"\n".into(),
                "[qemu]\naccelerator = \"kvm\"\n".into(),
            ),
            TestHypervisor::Builtin => (
                "hypervisor = \"builtin\"\n".into(),
                format!(
                    "[builtin]\nvmm_path = \"{}\"\njailer = true\njailer_path = \"{}\"\n",
                    workspace_binary("VESSEL_VMM", "vessel-vmm").display(),
                    workspace_binary("VESSEL_JAILER", "vessel-jailer").display()
                ),
            ),
        }
    }
}

/// A binary of this workspace: `$var`, else `name` beside the running test's
/// profile directory (`target/<profile>/name`, where cargo puts the workspace's
/// binaries). Panics if it is not there.
pub fn workspace_binary(var: &str, name: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        // The test executable is target/<profile>/deps/<test>-<hash>.
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(Path::parent)
            .map(|profile| profile.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    });
    assert!(
        path.is_file(),
        "{name} not found at {} (cargo build -p {name}, or set {var})",
        path.display()
    );
    path
}

/// Writes a Vessel configuration file at `path`: state under `state_root`,
/// the guest kernel and initramfs from `guest` (see [`guest_dir`]), and the
/// backend [`TestHypervisor::from_env`] names.
pub fn write_config(path: &Path, state_root: &Path, guest: &Path) {
    write_config_for(path, state_root, guest, TestHypervisor::from_env());
}

/// [`write_config`] for backend `hv`. Every test shares one templates directory
/// ([`templates_dir`]), as every sandbox of a host does: a shape's template is made once
/// per test run (or per KVM lane boot), and the tests' sandboxes are clones of it.
pub fn write_config_for(path: &Path, state_root: &Path, guest: &Path, hv: TestHypervisor) {
    let (mut top, tables) = hv.config_keys();
    // The KVM lane's guests run on emulated hardware: a loaded host slows their boots
    // past the KVM default (test-lane.sh sets this).
    if let Some(secs) = std::env::var("VESSEL_TEST_BOOT_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        top = format!("boot_timeout_secs = {secs}\n{top}");
    }
    std::fs::write(
        path,
        format!(
            "state_root = \"{}\"\nguest_kernel = \"{}\"\nguest_initramfs = \"{}\"\n{top}{tables}[templates]\ndir = \"{}\"\n",
            state_root.display(),
            guest.join("vmlinux").display(),
            guest.join("initramfs.cpio.gz").display(),
            templates_dir().display()
        ),
    )
    .unwrap();
}

/// The templates directory of the tests' configurations: `$VESSEL_TEST_TEMPLATES`, else
/// `/tmp/vessel-test-templates`. Templates are keyed by everything they depend on (the
/// binaries, kernel and initramfs included), so a stale one is never used.
pub fn templates_dir() -> PathBuf {
    std::env::var_os("VESSEL_TEST_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/vessel-test-templates"))
}

/// Whether `test`, which needs hardware KVM (Linux user space in a KVM guest),
/// can run here: `hardware` is the caller's detection and `why` its reason.
/// Without hardware KVM the test does not run and says so; that is a failure
/// where `VESSEL_REQUIRE_HARDWARE_KVM` is set (the KVM lane sets it: there these
/// tests must run). On hosts with only PVM or no KVM, `make test` runs them in
/// the lane instead.
pub fn hardware_kvm(test: &str, hardware: bool, why: &str) -> bool {
    if hardware {
        return true;
    }
    assert!(
        std::env::var_os("VESSEL_REQUIRE_HARDWARE_KVM").is_none(),
        "{test} needs hardware KVM, which VESSEL_REQUIRE_HARDWARE_KVM says is here: {why}"
    );
    eprintln!(
        "\n!!!!! NOT RUN HERE {test}: needs hardware KVM ({why}); `make test` runs it in the \
         KVM lane (scripts/kvm-lane.sh)\n"
    );
    false
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

/// `pid` and every process below it (from /proc's parent pids).
pub fn self_and_descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

/// The VMM processes (QEMU, or the built-in VMM, which its jailer runs as a child)
/// at or below `pid`, as (pid, comm).
pub fn vmms_at_or_below(pid: u32) -> Vec<(u32, String)> {
    self_and_descendants(pid)
        .into_iter()
        .filter_map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
            let comm = comm.trim().to_string();
            (comm.starts_with("qemu-system") || comm == "vessel-vmm").then_some((p, comm))
        })
        .collect()
}

/// Polls `cond` until it holds or `timeout` passes; returns its last value.
/// A test's wall-clock bound `d` scaled by `VESSEL_TEST_TIME_SCALE` (default 1). The KVM
/// lane sets it (scripts/test-lane.sh): there the host side itself (L1's kernel, the
/// shim, containerd) runs under emulation, so a bound that a real host meets with room
/// to spare (checked by the same test on the host) would measure the emulator.
pub fn scaled(d: Duration) -> Duration {
    let scale = std::env::var("VESSEL_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(1);
    d * scale
}

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
/// The security events among the JSON lines `vessel events --stats ID` printed
/// (`{"type":"security",...}`); other lines and non-JSON lines are skipped.
pub fn security_events(events_stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(events_stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "security")
        .collect()
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Asserts that `e` wraps a source and that `{:#}` (anyhow's rendering: each
/// error of the chain, joined by ": ") prints every cause once: no error of the
/// chain repeats its source's message in its own.
pub fn assert_cause_printed_once(e: &(dyn std::error::Error + 'static)) {
    let mut chain = vec![e.to_string()];
    let mut cur = e.source();
    assert!(cur.is_some(), "{:?} ({e}) has no source", e);
    while let Some(s) = cur {
        let msg = s.to_string();
        let parent = chain.last().unwrap();
        assert!(
            msg.is_empty() || !parent.contains(&msg),
            "{parent:?} repeats its source {msg:?}; the chain prints as {:?}",
            chain.join(": ")
        );
        chain.push(msg);
        cur = s.source();
    }
}

/// Files in a host directory that the data-loss tests bind into a container:
/// whatever fails on delete, they must all still be there with their contents.
pub struct HostFiles {
    dir: PathBuf,
}

impl HostFiles {
    const FILES: [(&'static str, &'static str); 2] =
        [("a.txt", "alpha\n"), ("sub/b.txt", "beta\n")];

    /// Creates `dir` with the files (`a.txt` holds `alpha`).
    pub fn create(dir: &Path) -> HostFiles {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for (name, body) in Self::FILES {
            std::fs::write(dir.join(name), body).unwrap();
        }
        HostFiles {
            dir: dir.to_path_buf(),
        }
    }

    /// Whether every file is there with its contents.
    pub fn intact(&self) -> bool {
        Self::FILES
            .iter()
            .all(|(n, b)| std::fs::read_to_string(self.dir.join(n)).ok().as_deref() == Some(*b))
    }
}
