//! What a test's sandboxes may leave on the host, for the soak and fault suites
//! (issue 14): processes, mounts, host links, host cgroups, sockets, state
//! directories, file descriptors of the long-lived processes, and memory. A
//! [`HostState`] is taken before the work and again after it; [`HostState::leaks`]
//! names everything the second has that the first did not.
//!
//! Everything is scoped to the test's own directory (its containerd, shim state root,
//! CLI state root) and to the ids it used, so that other work on the machine is not
//! counted; the one host-wide set is containerd's shim socket directory, which every
//! containerd on the host shares (`/run/containerd/s`, MACHINE.md).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{mounts_mentioning, processes_mentioning};

/// Where containerd puts every shim's socket, whatever its state directory.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// Host memory may be this much lower at the end than at the start.
pub const MEMORY_SLACK_KIB: u64 = 50 * 1024;

/// One observation of the host.
#[derive(Debug, Clone)]
pub struct HostState {
    /// `pid comm` of every process mentioning the test's directory.
    pub processes: BTreeSet<String>,
    /// Mount points under the test's directory or of a named network namespace.
    pub mounts: BTreeSet<String>,
    /// Host network links attached to the test's bridge, or named like a Vessel tap.
    pub links: BTreeSet<String>,
    /// Host cgroup directories (`vessel/<id>-<hash>`) of the ids the test used.
    pub cgroups: BTreeSet<String>,
    /// Unix sockets under the test's directory and in containerd's shim socket directory.
    pub sockets: BTreeSet<String>,
    /// What the state roots still hold (`state_left`).
    pub state: BTreeSet<String>,
    /// `name pid` → open file descriptors of each long-lived process watched.
    pub fds: Vec<(String, u32, usize)>,
    /// MemAvailable plus the anonymous and shared resident memory of processes outside the
    /// test (not the
    /// test itself, not mentioning its directory), KiB: what the host has for the test's
    /// sandboxes, unmoved by other work on the host (a build starting or ending).
    pub mem_available_kib: u64,
    /// Where host memory is, for explaining a drop of `mem_available_kib`.
    pub memory: Memory,
}

/// A breakdown of host memory, KiB: what a drop of available memory went to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmRSS of the test's own processes: the test, its containerd and the shims and
    /// VMs still running (the long-lived pod).
    pub scope_rss: u64,
    /// Kernel slab that cannot be reclaimed (`SUnreclaim`).
    pub slab_unreclaimable: u64,
    /// Per-CPU allocations (`Percpu`): cgroups that are gone but still charged hold some.
    pub percpu: u64,
    /// `Shmem` (tmpfs, memfd): the page cache a guest's memory file would sit in.
    pub shmem: u64,
    /// `PageTables` + `KernelStack`.
    pub kernel_other: u64,
}

impl Memory {
    fn take(dir: &str) -> Memory {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            scope_rss: scope_rss_kib(dir),
            slab_unreclaimable: field("SUnreclaim"),
            percpu: field("Percpu"),
            shmem: field("Shmem"),
            kernel_other: field("PageTables") + field("KernelStack"),
        }
    }

    /// `name +N MiB` for each part that grew since `before`.
    fn growth(&self, before: &Memory) -> String {
        let parts = [
            ("test's processes' RSS", self.scope_rss, before.scope_rss),
            (
                "unreclaimable slab",
                self.slab_unreclaimable,
                before.slab_unreclaimable,
            ),
            ("percpu", self.percpu, before.percpu),
            ("shmem", self.shmem, before.shmem),
            (
                "page tables + kernel stacks",
                self.kernel_other,
                before.kernel_other,
            ),
        ];
        let grew: Vec<String> = parts
            .iter()
            .map(|(n, now, then)| format!("{n} {:+} MiB", (*now as i64 - *then as i64) / 1024))
            .collect();
        grew.join(", ")
    }
}

/// The test's directories and the long-lived processes whose descriptors are watched.
pub struct Scope<'a> {
    /// The directory holding containerd, its state, the shim state root and the CLI root.
    pub dir: &'a Path,
    /// State roots whose entries are sandboxes or containers.
    pub state_roots: Vec<PathBuf>,
    /// The CNI bridge the pods' veths attach to, if any.
    pub bridge: Option<&'a str>,
    /// (name, pid) of long-lived processes whose descriptors must not grow.
    pub long_lived: Vec<(String, u32)>,
}

impl HostState {
    /// Observes the host for `scope`; `ids` are the sandbox and container ids used so far.
    pub fn take(scope: &Scope, ids: &BTreeSet<String>) -> HostState {
        let dir = scope.dir.display().to_string();
        let own: BTreeSet<u32> = scope.long_lived.iter().map(|(_, p)| *p).collect();
        let processes = processes_mentioning(&dir)
            .into_iter()
            .filter(|l| {
                let pid: u32 = l.split(':').next().unwrap_or("0").parse().unwrap_or(0);
                // The test's containerd is the caller, not a sandbox's (a restart gives it
                // a new pid).
                !own.contains(&pid) && !l.contains(": containerd --config ")
            })
            .collect();
        let mut mounts: BTreeSet<String> = mounts_mentioning(&dir).into_iter().collect();
        mounts.extend(
            mounts_mentioning("/run/netns/")
                .into_iter()
                .filter(|m| ids.iter().any(|id| m.contains(id.as_str())) || m.contains("cni-"))
                .map(|m| format!("netns {m}")),
        );
        let mut links = BTreeSet::new();
        for e in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let master = std::fs::read_link(e.path().join("master"))
                .ok()
                .and_then(|m| m.file_name().map(|n| n.to_string_lossy().into_owned()));
            if name.contains("vessel")
                || (scope.bridge.is_some() && master.as_deref() == scope.bridge)
            {
                links.insert(name);
            }
        }
        let mut cgroups = BTreeSet::new();
        for ctrl in ["", "memory", "cpu", "pids", "unified"] {
            let parent = Path::new(vessel_cgroup::CGROUP_ROOT)
                .join(ctrl)
                .join(vessel_cgroup::PARENT);
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // `<run dir name>-<hash>` (vessel_runtime::limits::cgroup_name).
                let ours = ids.iter().any(|id| name.starts_with(&format!("{id}-")));
                if e.path().is_dir() && ours {
                    cgroups.insert(format!("{}/{name}", parent.display()));
                }
            }
        }
        let mut sockets = BTreeSet::new();
        sockets_under(scope.dir, &mut sockets, 0);
        sockets_under(Path::new(SHIM_SOCKETS), &mut sockets, 0);
        let state = scope
            .state_roots
            .iter()
            .flat_map(|r| {
                state_left(r)
                    .into_iter()
                    .map(move |e| format!("{}/{e}", r.display()))
            })
            .collect();
        let fds = scope
            .long_lived
            .iter()
            .map(|(n, p)| (n.clone(), *p, fd_count(*p)))
            .collect();
        HostState {
            processes,
            mounts,
            links,
            cgroups,
            sockets,
            state,
            fds,
            mem_available_kib: mem_available_kib() + foreign_rss_kib(&dir),
            memory: Memory::take(&dir),
        }
    }

    /// What `self` (taken later) has that `before` did not, one line per leak; memory
    /// counts when MemAvailable fell by more than [`MEMORY_SLACK_KIB`].
    pub fn leaks(&self, before: &HostState) -> Vec<String> {
        let mut out = Vec::new();
        let mut diff = |what: &str, now: &BTreeSet<String>, then: &BTreeSet<String>| {
            out.extend(now.difference(then).map(|x| format!("{what}: {x}")));
        };
        diff("process", &self.processes, &before.processes);
        diff("mount", &self.mounts, &before.mounts);
        diff("link", &self.links, &before.links);
        diff("cgroup", &self.cgroups, &before.cgroups);
        diff("socket", &self.sockets, &before.sockets);
        diff("state", &self.state, &before.state);
        for ((name, pid, now), (_, _, then)) in self.fds.iter().zip(&before.fds) {
            if now > then {
                out.push(format!("fds: {name} (pid {pid}) has {now}, had {then}"));
            }
        }
        let drop = before
            .mem_available_kib
            .saturating_sub(self.mem_available_kib);
        if drop > MEMORY_SLACK_KIB {
            out.push(format!(
                "memory: {} MiB less available than at the start ({} → {} MiB; MemAvailable + other processes' anonymous and shared RSS); since then: {}",
                drop / 1024,
                before.mem_available_kib / 1024,
                self.mem_available_kib / 1024,
                self.memory.growth(&before.memory)
            ));
        }
        out
    }

    /// How many leak categories there are (for the printed table).
    pub fn count(leaks: &[String], what: &str) -> usize {
        leaks
            .iter()
            .filter(|l| l.starts_with(&format!("{what}:")))
            .count()
    }
}

fn sockets_under(dir: &Path, out: &mut BTreeSet<String>, depth: usize) {
    use std::os::unix::fs::FileTypeExt;
    if depth > 12 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_socket() {
            out.insert(e.path().display().to_string());
        } else if t.is_dir() && !t.is_symlink() {
            // Container root file systems hold nothing of ours.
            if e.file_name() == "rootfs" {
                continue;
            }
            sockets_under(&e.path(), out, depth + 1);
        }
    }
}

/// Open descriptors of `pid` (0 when it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Anonymous and shared-memory resident memory (`RssAnon` + `RssShmem`) of every process
/// that is neither this test nor mentions `dir` in its command line, KiB. Not VmRSS: its
/// file pages are page cache, which MemAvailable already counts, so a build or a fuzzer
/// with large mapped files running when the baseline was taken and gone at a check made
/// the host look hundreds of MiB short (209 MiB at a soak check, 2026-12-06).
fn foreign_rss_kib(dir: &str) -> u64 {
    let me = std::process::id().to_string();
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd).contains(dir) {
            continue;
        }
        total += status_kib(&e.path(), "RssAnon:").unwrap_or(0)
            + status_kib(&e.path(), "RssShmem:").unwrap_or(0);
    }
    total
}

/// VmRSS of this test and of every process mentioning `dir`, KiB.
fn scope_rss_kib(dir: &str) -> u64 {
    let me = std::process::id().to_string();
    let mut total = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let ours = name == me
            || std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(dir));
        if ours {
            total += vm_rss_kib(&e.path()).unwrap_or(0);
        }
    }
    total
}

fn vm_rss_kib(proc_dir: &Path) -> Option<u64> {
    status_kib(proc_dir, "VmRSS:")
}

/// A `... kB` field of /proc/<pid>/status, KiB.
fn status_kib(proc_dir: &Path, field: &str) -> Option<u64> {
    std::fs::read_to_string(proc_dir.join("status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
}

/// MemAvailable from /proc/meminfo, KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// What a state root still holds for sandboxes and containers: its entries, except the
/// runtime's shared bookkeeping directories (`netns`, `.locks`, `wired`, `shared`), whose
/// own entries are listed as `dir/name`, and the templates (kept by design).
pub fn state_left(root: &Path) -> Vec<String> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let mut left = Vec::new();
    for n in names(root) {
        if n == "templates" {
            continue;
        }
        if matches!(n.as_str(), "netns" | ".locks" | "wired" | "shared") {
            left.extend(
                names(&root.join(&n))
                    .into_iter()
                    .map(|m| format!("{n}/{m}")),
            );
        } else {
            left.push(n);
        }
    }
    left.sort();
    left
}
