//! Host cgroups: `vessel/<id>` under the cgroup root, with memory, CPU and pids limits.
//!
//! Two users: vessel-jailer puts a jailed VMM in one of its own, and vessel-runtime puts
//! every host process of a sandbox (VMM or jailer, virtiofsd, vhost-device-vsock, the
//! supervisor or shim) in one sized from the VM (docs/threat-model.md, "Host limits").
//!
//! cgroup v2 (a unified `/sys/fs/cgroup`): one directory, controllers enabled in the
//! parents' `cgroup.subtree_control`, `memory.max`, `cpu.max` and `pids.max`. Hosts still
//! on v1 or hybrid (v1 controllers, as the development machines are) get `vessel/<id>` in
//! the `memory`, `cpu` and `pids` hierarchies with `memory.limit_in_bytes`,
//! `cpu.cfs_quota_us` and `pids.max`.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The cgroup file system.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The parent of every VM's cgroup.
pub const PARENT: &str = "vessel";
/// CPU bandwidth period (µs) for the CPU limit.
const CPU_PERIOD_US: u64 = 100_000;
/// v1 hierarchies a cgroup gets a directory in (those the host has).
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];
/// How long a removal waits for the cgroup's processes to be gone.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resource limits; `None` leaves the default (no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub mem_mib: Option<u64>,
    pub cpus: Option<f64>,
    /// Most processes and threads at once.
    pub pids: Option<u64>,
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
    /// no cgroup file system at {0:?} (neither cgroup v2 nor v1 memory/cpu/pids hierarchies)
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
    /// cannot tell from /proc/self/cgroup which cgroup this process is in beside {path:?}
    NoOrigin { path: PathBuf },
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
    root: PathBuf,
    layout: Layout,
    dirs: Vec<PathBuf>,
    /// Where the calling process was before [`Cgroup::enter_self`] (one directory per
    /// entry of `dirs`): it goes back there before the cgroup is removed.
    origin: Mutex<Option<Vec<PathBuf>>>,
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
            root: root.to_owned(),
            layout,
            dirs: layout.dirs(root, id),
            origin: Mutex::new(None),
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
        if limits.pids.is_some() {
            needed.push("pids");
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
        if let Some(pids) = limits.pids {
            write(&dir.join("pids.max"), &pids.to_string())?;
        }
        Ok(())
    }

    fn create_v1(&self, root: &Path, limits: Limits) -> Result<(), CgroupError> {
        for (controller, wanted) in [
            ("memory", limits.mem_mib.is_some()),
            ("cpu", limits.cpus.is_some()),
            ("pids", limits.pids.is_some()),
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
            if dir.starts_with(root.join("pids")) {
                if let Some(pids) = limits.pids {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// VM `id`'s cgroup under `root` if it exists (made by another process, or left by
    /// one that was killed), to read or remove it.
    pub fn open(root: &Path, id: &str) -> Option<Cgroup> {
        let layout = Layout::detect(root).ok()?;
        let dirs: Vec<_> = layout
            .dirs(root, id)
            .into_iter()
            .filter(|d| d.is_dir())
            .collect();
        (!dirs.is_empty()).then(|| Cgroup {
            root: root.to_owned(),
            layout,
            dirs,
            origin: Mutex::new(None),
        })
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

    /// The processes in the cgroup (in any of its directories), sorted.
    pub fn procs(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The memory limit in bytes (`None`: no memory controller or no limit).
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_value("memory.max", "memory.limit_in_bytes")
    }

    /// The most memory the cgroup ever used, in bytes (v2 `memory.peak`, which needs
    /// Linux 5.19; v1 `memory.max_usage_in_bytes`).
    pub fn memory_peak(&self) -> Option<u64> {
        self.memory_value("memory.peak", "memory.max_usage_in_bytes")
    }

    fn memory_value(&self, v2: &str, v1: &str) -> Option<u64> {
        let file = match self.layout {
            Layout::V2 => self.dirs.first()?.join(v2),
            Layout::V1 => {
                let memory = self.root.join("memory");
                self.dirs.iter().find(|d| d.starts_with(&memory))?.join(v1)
            }
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Opens each directory's `cgroup.procs` for writing (close-on-exec), for
    /// [`join_in_child`]: a child that writes `0` there before it execs starts its
    /// program in the cgroup, with no window outside it. Keep the files open until
    /// the child has been spawned.
    pub fn procs_files(&self) -> Result<Vec<File>, CgroupError> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io("open", &p))
            })
            .collect()
    }

    /// Moves the calling process (all its threads) into the cgroup; [`Cgroup::remove`]
    /// moves it back where it was first.
    pub fn enter_self(&self) -> Result<(), CgroupError> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io("read", Path::new("/proc/self/cgroup")))?;
        let origin = self
            .dirs
            .iter()
            .map(|d| origin_of(&self.root, self.layout, d, &own))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| CgroupError::NoOrigin {
                path: self.dirs.first().cloned().unwrap_or_default(),
            })?;
        let mut slot = self.origin.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(origin);
        drop(slot);
        self.add(std::process::id() as i32)
    }

    /// Moves the calling process back where it was before [`Cgroup::enter_self`].
    fn leave_self(&self) -> Result<(), CgroupError> {
        let origin = self.origin.lock().unwrap_or_else(|p| p.into_inner()).take();
        for d in origin.iter().flatten() {
            write(&d.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        Ok(())
    }

    /// Kills whatever is left in the cgroup (never the calling process: it moves back
    /// where it was if it had entered), then removes its directories.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let left = self.leave_self();
        remove_dirs(self.layout, &self.dirs)?;
        left
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

/// For `pre_exec` (see [`Cgroup::procs_files`]): writes `0` (the calling process) to
/// each of `procs`. Only write(2), which is async-signal-safe.
pub fn join_in_child(procs: &[RawFd]) -> std::io::Result<()> {
    for fd in procs {
        // SAFETY: write(2) of one byte from a static buffer to an fd number; a bad fd
        // is an error, not UB.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The raw numbers of `files`, for [`join_in_child`].
pub fn raw_fds(files: &[File]) -> Vec<RawFd> {
    files.iter().map(AsRawFd::as_raw_fd).collect()
}

/// The directory of the cgroup that `own` (the text of /proc/self/cgroup) names in the
/// hierarchy of `dir`.
fn origin_of(root: &Path, layout: Layout, dir: &Path, own: &str) -> Option<PathBuf> {
    let controller = match layout {
        Layout::V2 => None,
        Layout::V1 => Some(dir.strip_prefix(root).ok()?.iter().next()?.to_str()?),
    };
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        let rel = path.trim_start_matches('/');
        matches.then(|| match controller {
            None => root.join(rel),
            Some(c) => root.join(c).join(rel),
        })
    })
}

fn remove_dirs(layout: Layout, dirs: &[PathBuf]) -> Result<(), CgroupError> {
    let me = std::process::id() as i32;
    for dir in dirs {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        let has_me = std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|p| p.lines().any(|l| l.trim() == me.to_string()));
        if layout == Layout::V2 && !has_me && dir.join("cgroup.kill").exists() {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        loop {
            // Processes may still be exiting: kill what is listed, retry the rmdir.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                let pids = procs.lines().filter_map(|l| l.trim().parse::<i32>().ok());
                for pid in pids.filter(|p| *p != me) {
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
            pids: Some(512),
        };
        let cg = Cgroup::create(root.path(), "vm1", limits).unwrap();
        let dir = root.path().join("vessel/vm1");
        assert_eq!(cg.dirs(), [dir]);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("vessel/vm1/memory.max"), (256u64 << 20).to_string());
        assert_eq!(read("vessel/vm1/cpu.max"), "150000 100000");
        assert_eq!(read("vessel/vm1/pids.max"), "512");
        // Files overwrite, so the last controller enabled is what a plain file keeps.
        assert_eq!(read("cgroup.subtree_control"), "+pids");
        assert_eq!(read("vessel/cgroup.subtree_control"), "+pids");
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
                ..Limits::default()
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
        let limits = Limits {
            mem_mib: Some(1),
            cpus: Some(0.001),
            pids: None,
        };
        let cg = Cgroup::create(root.path(), "vm4", limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).unwrap();
        assert_eq!(read("memory/vessel/vm4/memory.limit_in_bytes"), "1048576");
        assert_eq!(read("cpu/vessel/vm4/cpu.cfs_quota_us"), "1000");
        assert_eq!(cg.dirs().len(), 2);
        assert_eq!(cg.memory_limit(), Some(1048576));
        // No pids hierarchy: a pids limit cannot be kept, and nothing is left.
        let e = Cgroup::create(
            root.path(),
            "vm5",
            Limits {
                pids: Some(8),
                ..limits
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("pids controller"), "{e}");
        assert!(!root.path().join("memory/vessel/vm5").exists());
        assert!(Cgroup::open(root.path(), "vm5").is_none());
        assert_eq!(Cgroup::open(root.path(), "vm4").unwrap().dirs(), cg.dirs());
    }

    #[test]
    fn origin_from_proc_self_cgroup() {
        let root = Path::new("/sys/fs/cgroup");
        let hybrid = "12:pids:/user.slice/x\n4:cpu,cpuacct:/a\n3:memory:/\n0::/init.scope\n";
        let origin = |layout, dir: &str, own| origin_of(root, layout, Path::new(dir), own);
        assert_eq!(
            origin(Layout::V1, "/sys/fs/cgroup/pids/vessel/x", hybrid),
            Some("/sys/fs/cgroup/pids/user.slice/x".into())
        );
        assert_eq!(
            origin(Layout::V1, "/sys/fs/cgroup/cpu/vessel/x", hybrid),
            Some("/sys/fs/cgroup/cpu/a".into())
        );
        assert_eq!(
            origin(Layout::V1, "/sys/fs/cgroup/memory/vessel/x", hybrid),
            Some("/sys/fs/cgroup/memory/".into())
        );
        assert_eq!(
            origin(
                Layout::V2,
                "/sys/fs/cgroup/vessel/x",
                "0::/system.slice/c\n"
            ),
            Some("/sys/fs/cgroup/system.slice/c".into())
        );
        assert_eq!(
            origin(Layout::V1, "/sys/fs/cgroup/blkio/vessel/x", hybrid),
            None
        );
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
