//! The VMM's cgroup: `vessel/<id>` under the cgroup root.
//!
//! cgroup v2 (a unified `/sys/fs/cgroup`): one directory, controllers enabled in the
//! parents' `cgroup.subtree_control`, `memory.max` and `cpu.max`. Hosts still on v1 or
//! hybrid (v1 controllers, as the development machines are) get `vessel/<id>` in the
//! `memory` and `cpu` hierarchies with `memory.limit_in_bytes` and `cpu.cfs_quota_us`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The cgroup file system the jailer uses.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every VM's cgroup.
pub const PARENT: &str = "vessel";
/// CPU bandwidth period (µs) for the CPU limit.
const CPU_PERIOD_US: u64 = 100_000;
/// v1 hierarchies a VM gets a directory in.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu"];
/// How long a removal waits for the cgroup's processes to be gone.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resource limits; `None` leaves the default (no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub mem_mib: Option<u64>,
    pub cpus: Option<f64>,
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Unified hierarchy at the root.
    V2,
    /// One hierarchy per controller under the root (v1, or hybrid).
    V1,
}

/// cgroup failures.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum CgroupError {
    /// no cgroup file system at {0:?} (neither cgroup v2 nor v1 memory/cpu hierarchies)
    NoCgroupFs(PathBuf),
    /// cgroup {path:?} already exists: another VM with this id is running, or a stale one could not be removed
    Exists { path: PathBuf },
    /// the {controller} controller is not available in {path:?}: cannot apply the {controller} limit
    NoController { controller: String, path: PathBuf },
    /// cgroup {what} {path:?}
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// cgroup {path:?} still has processes after {REMOVE_TIMEOUT:?}
    Busy { path: PathBuf },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A VM's cgroup directories (one with v2, one per controller with v1).
#[derive(Debug)]
pub struct Cgroup {
    layout: Layout,
    dirs: Vec<PathBuf>,
}

impl Layout {
    /// Looks at `root` (normally [`CGROUP_ROOT`]).
    pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            Ok(Layout::V2)
        } else if V1_CONTROLLERS
            .iter()
            .any(|c| root.join(c).join("cgroup.procs").is_file())
        {
            Ok(Layout::V1)
        } else {
            Err(CgroupError::NoCgroupFs(root.to_owned()))
        }
    }

    /// The directories of VM `id`'s cgroup; those of absent v1 hierarchies are left out.
    pub fn dirs(self, root: &Path, id: &str) -> Vec<PathBuf> {
        match self {
            Layout::V2 => vec![root.join(PARENT).join(id)],
            Layout::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c))
                .filter(|h| h.join("cgroup.procs").is_file())
                .map(|h| h.join(PARENT).join(id))
                .collect(),
        }
    }
}

impl Cgroup {
    /// Creates VM `id`'s cgroup under `root` and writes `limits`. Nothing is left behind
    /// on error.
    pub fn create(root: &Path, id: &str, limits: Limits) -> Result<Cgroup, CgroupError> {
        let layout = Layout::detect(root)?;
        let cg = Cgroup {
            layout,
            dirs: layout.dirs(root, id),
        };
        if let Some(d) = cg.dirs.iter().find(|d| d.exists()) {
            return Err(CgroupError::Exists { path: d.clone() });
        }
        let result = match layout {
            Layout::V2 => cg.create_v2(root, limits),
            Layout::V1 => cg.create_v1(root, limits),
        };
        match result {
            Ok(()) => Ok(cg),
            Err(e) => {
                for d in &cg.dirs {
                    let _ = std::fs::remove_dir(d);
                }
                Err(e)
            }
        }
    }

    fn create_v2(&self, root: &Path, limits: Limits) -> Result<(), CgroupError> {
        let parent = root.join(PARENT);
        mkdir(&parent)?;
        let mut needed = Vec::new();
        if limits.mem_mib.is_some() {
            needed.push("memory");
        }
        if limits.cpus.is_some() {
            needed.push("cpu");
        }
        for c in needed {
            enable_controller(root, c)?;
            enable_controller(&parent, c)?;
        }
        let dir = &self.dirs[0];
        std::fs::create_dir(dir).map_err(io("create", dir))?;
        if let Some(mib) = limits.mem_mib {
            write(&dir.join("memory.max"), &(mib << 20).to_string())?;
        }
        if let Some(cpus) = limits.cpus {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", cpu_quota_us(cpus)),
            )?;
        }
        Ok(())
    }

    fn create_v1(&self, root: &Path, limits: Limits) -> Result<(), CgroupError> {
        for (controller, wanted) in [
            ("memory", limits.mem_mib.is_some()),
            ("cpu", limits.cpus.is_some()),
        ] {
            let hierarchy = root.join(controller);
            if wanted && !self.dirs.iter().any(|d| d.starts_with(&hierarchy)) {
                return Err(CgroupError::NoController {
                    controller: controller.into(),
                    path: hierarchy,
                });
            }
        }
        for dir in &self.dirs {
            mkdir(dir.parent().expect("vessel/<id> has a parent"))?;
            std::fs::create_dir(dir).map_err(io("create", dir))?;
            if dir.starts_with(root.join("memory")) {
                if let Some(mib) = limits.mem_mib {
                    write(&dir.join("memory.limit_in_bytes"), &(mib << 20).to_string())?;
                }
            }
            if dir.starts_with(root.join("cpu")) {
                if let Some(cpus) = limits.cpus {
                    write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &cpu_quota_us(cpus).to_string(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The cgroup directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves process `pid` (as seen from the caller's PID namespace) into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Kills whatever is left in the cgroup, then removes its directories.
    pub fn remove(self) -> Result<(), CgroupError> {
        remove_dirs(self.layout, &self.dirs)
    }

    /// Removes VM `id`'s cgroup if it exists (a jailer that was SIGKILLed left it),
    /// killing any process still in it.
    pub fn remove_stale(root: &Path, id: &str) -> Result<(), CgroupError> {
        let Ok(layout) = Layout::detect(root) else {
            return Ok(());
        };
        let dirs: Vec<_> = layout
            .dirs(root, id)
            .into_iter()
            .filter(|d| d.exists())
            .collect();
        remove_dirs(layout, &dirs)
    }
}

fn remove_dirs(layout: Layout, dirs: &[PathBuf]) -> Result<(), CgroupError> {
    for dir in dirs {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        if layout == Layout::V2 && dir.join("cgroup.kill").exists() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        loop {
            // Processes may still be exiting: kill what is listed, retry the rmdir.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(CgroupError::Busy { path: dir.clone() })
                }
                Err(e) => return Err(io("remove", dir)(e)),
            }
        }
    }
    Ok(())
}

/// `CPU_PERIOD_US * cpus`, at least 1000 µs (the kernel's minimum quota).
fn cpu_quota_us(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// Enables `controller` for the children of `dir`, unless it already is.
fn enable_controller(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).map_err(io("read", &control))?;
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == controller) {
        return Err(CgroupError::NoController {
            controller: controller.into(),
            path: dir.to_owned(),
        });
    }
    write(&control, &format!("+{controller}"))
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(io("create", dir)(e)),
        _ => Ok(()),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroup v2 root: plain files where the kernel would have its own.
    fn fake_v2(controllers: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(d.path().join("cgroup.subtree_control"), "").unwrap();
        // The kernel fills a new cgroup's files; a plain directory gets them here.
        std::fs::create_dir(d.path().join(PARENT)).unwrap();
        std::fs::write(d.path().join("vessel/cgroup.controllers"), controllers).unwrap();
        std::fs::write(d.path().join("vessel/cgroup.subtree_control"), "").unwrap();
        d
    }

    #[test]
    fn v2_limits_and_controllers() {
        let root = fake_v2("cpuset cpu io memory pids");
        let limits = Limits {
            mem_mib: Some(256),
            cpus: Some(1.5),
        };
        let cg = Cgroup::create(root.path(), "vm1", limits).unwrap();
        let dir = root.path().join("vessel/vm1");
        assert_eq!(cg.dirs(), [dir]);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("vessel/vm1/memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("vessel/vm1/cpu.max"), "150000 100000");
        // Files overwrite, so the last controller enabled is what a plain file keeps.
        assert_eq!(read("cgroup.subtree_control"), "+cpu");
        assert_eq!(read("vessel/cgroup.subtree_control"), "+cpu");
        assert!(matches!(
            Cgroup::create(root.path(), "vm1", limits),
            Err(CgroupError::Exists { .. })
        ));
    }

    #[test]
    fn v2_without_limits_enables_nothing() {
        let root = fake_v2("memory");
        Cgroup::create(root.path(), "vm2", Limits::default()).unwrap();
        let control = std::fs::read_to_string(root.path().join("cgroup.subtree_control"));
        assert_eq!(control.unwrap(), "");
        assert!(root.path().join("vessel/vm2").is_dir());
    }

    #[test]
    fn v2_missing_controller_is_refused_and_leaves_nothing() {
        let root = fake_v2("pids");
        let e = Cgroup::create(
            root.path(),
            "vm3",
            Limits {
                mem_mib: Some(64),
                cpus: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("memory controller"), "{e}");
        assert!(!root.path().join("vessel/vm3").exists());
    }

    #[test]
    fn v1_dirs_per_controller() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
            std::fs::write(root.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(Layout::detect(root.path()).unwrap(), Layout::V1);
        let cg = Cgroup::create(
            root.path(),
            "vm4",
            Limits {
                mem_mib: Some(1),
                cpus: Some(0.001),
            },
        )
        .unwrap();
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("memory/vessel/vm4/memory.limit_in_bytes"), "1048576");
        assert_eq!(read("cpu/vessel/vm4/cpu.cfs_quota_us"), "1000");
        assert_eq!(cg.dirs().len(), 2);
    }

    #[test]
    fn no_cgroup_fs() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            Layout::detect(root.path()),
            Err(CgroupError::NoCgroupFs(_))
        ));
        // Nothing to remove is not an error.
        Cgroup::remove_stale(root.path(), "x").unwrap();
    }
}
