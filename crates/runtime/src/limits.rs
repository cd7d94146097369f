//! Host limits of a sandbox: cgroup `vessel/<vm id>-<hash>` holds every host process of the
//! sandbox (the VMM or its jailer, virtiofsd, vhost-device-vsock, and the supervisor or
//! shim once its pod is up), with memory, CPU and pids limits derived from the VM's
//! size, so that a guest cannot make them take more of the host (docs/threat-model.md,
//! "Host limits"; the `[limits]` keys in docs/configuration.md).

use std::path::Path;
use std::sync::Arc;

use vessel_cgroup::{Cgroup, Limits, CGROUP_ROOT};
use vessel_hypervisor::Hypervisor;

use crate::config::LimitsSection;
use crate::{Error, Result};

/// The cgroup limits of a sandbox with `vcpus` and `memory_mib` on `hv`, or `None` when
/// host limits are off or the backend starts no host process.
pub fn limits_for(
    section: &LimitsSection,
    hv: &dyn Hypervisor,
    vcpus: u32,
    memory_mib: u32,
) -> Option<Limits> {
    let overhead = hv.host_overhead().filter(|_| section.enabled)?;
    let extra = section.memory_overhead_mib.unwrap_or(overhead.memory_mib);
    Some(Limits {
        mem_mib: Some(u64::from(memory_mib) + extra),
        cpus: (section.extra_cpus > 0.0).then(|| f64::from(vcpus) + section.extra_cpus),
        pids: Some(section.pids.unwrap_or(overhead.pids)),
    })
}

/// One line for `vessel env` and `vessel check`: the limits a sandbox of this
/// configuration gets on `hv`, in terms of its VM's size.
pub fn describe(section: &LimitsSection, hv: &dyn Hypervisor) -> String {
    let Some(overhead) = hv.host_overhead() else {
        return format!("none ({} starts no host process)", hv.name());
    };
    if !section.enabled {
        return "off (limits.enabled = false)".into();
    }
    let cpus = match section.extra_cpus {
        x if x > 0.0 => format!("vCPUs + {x}"),
        _ => "no limit".into(),
    };
    format!(
        "cgroup vessel/<vm id>-<hash> per sandbox: memory = VM + {} MiB, CPUs = {cpus}, pids {}",
        section.memory_overhead_mib.unwrap_or(overhead.memory_mib),
        section.pids.unwrap_or(overhead.pids)
    )
}

/// The cgroup name (under `vessel/`) of the sandbox whose run directory is `run_dir`:
/// its id and a hash of the directory, so that two state roots (two containerds, a
/// CLI and a shim) never share one.
pub fn cgroup_name(run_dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    // FNV-1a: stable across builds (the name must be found again after a crash).
    let hash = run_dir
        .as_os_str()
        .as_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    let id = run_dir.file_name().unwrap_or_default().to_string_lossy();
    format!("{id}-{:08x}", hash as u32)
}

/// Creates cgroup `vessel/<name>` ([`cgroup_name`]) with `limits`. One left by a
/// supervisor that was killed (its processes died with it) is removed first; one that
/// still has processes belongs to a running sandbox: an error.
pub fn create(name: &str, limits: Limits) -> Result<Arc<Cgroup>> {
    create_under(Path::new(CGROUP_ROOT), name, limits)
}

fn create_under(root: &Path, name: &str, limits: Limits) -> Result<Arc<Cgroup>> {
    let err = |source| Error::Cgroup {
        name: name.to_string(),
        source,
    };
    if let Some(old) = Cgroup::open(root, name) {
        if old.procs().is_empty() {
            old.remove().map_err(err)?;
        }
    }
    Cgroup::create(root, name, limits)
        .map(Arc::new)
        .map_err(err)
}

/// Moves the calling process into the host cgroup of the sandbox whose run directory is
/// `run_dir`, if it has one: for a process that exists for that sandbox alone and starts
/// after it (the CLI's `exec -d` supervisor), so that the sandbox's limits cover it too.
/// Removing the cgroup with the sandbox kills it.
pub fn join(run_dir: &Path) -> Result<()> {
    let name = cgroup_name(run_dir);
    match Cgroup::open(Path::new(CGROUP_ROOT), &name) {
        Some(cg) => cg
            .add(std::process::id() as i32)
            .map_err(|source| Error::Cgroup { name, source }),
        None => Ok(()),
    }
}

/// Removes the cgroup of the sandbox whose run directory is `run_dir` after its
/// supervisor died, killing what is left in it. Best effort: a failure is logged.
pub fn remove_stale(run_dir: &Path) {
    let name = cgroup_name(run_dir);
    if let Err(e) = Cgroup::remove_stale(Path::new(CGROUP_ROOT), &name) {
        log::error!("sandbox cgroup {name}: {}", crate::chain(&e));
    }
}

/// Removes `cgroup` of sandbox `id`, logging a failure.
pub(crate) fn remove(cgroup: &Cgroup, id: &str) {
    if let Err(e) = cgroup.remove() {
        log::error!(
            "sandbox {id}: removing its host cgroup: {}",
            crate::chain(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_hypervisor::HostOverhead;

    #[test]
    fn limits_follow_the_vm_size_and_the_configuration() {
        let hv = backend();
        let on = LimitsSection::default();
        let l = limits_for(&on, &hv, 2, 256).unwrap();
        assert_eq!(l.mem_mib, Some(256 + 100));
        assert_eq!(l.cpus, Some(2.0 + on.extra_cpus));
        assert_eq!(l.pids, Some(50));
        let set = LimitsSection {
            memory_overhead_mib: Some(10),
            extra_cpus: 0.0,
            pids: Some(7),
            ..on.clone()
        };
        let l = limits_for(&set, &hv, 1, 128).unwrap();
        assert_eq!((l.mem_mib, l.cpus, l.pids), (Some(138), None, Some(7)));
        let off = LimitsSection {
            enabled: false,
            ..on
        };
        assert_eq!(limits_for(&off, &hv, 1, 128), None);
        assert_eq!(describe(&off, &hv), "off (limits.enabled = false)");
        assert_eq!(
            describe(&set, &hv),
            "cgroup vessel/<vm id>-<hash> per sandbox: memory = VM + 10 MiB, CPUs = no limit, pids 7"
        );
    }

    /// A backend with host processes and a known overhead.
    fn backend() -> Overhead {
        Overhead(HostOverhead {
            memory_mib: 100,
            pids: 50,
        })
    }

    struct Overhead(HostOverhead);

    #[async_trait::async_trait]
    impl Hypervisor for Overhead {
        fn name(&self) -> &'static str {
            "overhead"
        }
        fn capabilities(&self) -> vessel_hypervisor::Capabilities {
            unimplemented!()
        }
        fn host_overhead(&self) -> Option<HostOverhead> {
            Some(self.0)
        }
        async fn launch(
            &self,
            _: &vessel_hypervisor::VmConfig,
        ) -> vessel_hypervisor::Result<Box<dyn vessel_hypervisor::Vm>> {
            unimplemented!()
        }
    }

    #[test]
    fn names_are_the_id_and_a_stable_hash_of_the_run_dir() {
        let a = cgroup_name(Path::new("/run/vessel/pod1"));
        assert!(
            a.starts_with("pod1-") && a.len() == "pod1-".len() + 8,
            "{a}"
        );
        assert_eq!(a, cgroup_name(Path::new("/run/vessel/pod1")));
        assert_ne!(a, cgroup_name(Path::new("/tmp/x/pod1")));
        // FNV-1a of the path, low 32 bits: fixed, so a newer build finds an old cgroup.
        assert_eq!(cgroup_name(Path::new("/a")), "a-b49cd92d");
    }

    #[test]
    fn a_stale_empty_cgroup_is_replaced_and_a_busy_one_refused() {
        // A fake v1 root: plain files where the kernel would have its own.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("memory")).unwrap();
        std::fs::write(root.path().join("memory/cgroup.procs"), "").unwrap();
        let limits = Limits {
            mem_mib: Some(64),
            ..Limits::default()
        };
        let stale = root.path().join("memory/vessel/sb");
        std::fs::create_dir_all(&stale).unwrap();
        create_under(root.path(), "sb", limits).unwrap();
        assert!(stale.join("memory.limit_in_bytes").is_file());
        // A plain directory with files is not removable as a cgroup is: clear it.
        std::fs::remove_file(stale.join("memory.limit_in_bytes")).unwrap();
        std::fs::write(stale.join("cgroup.procs"), "4242\n").unwrap();
        let e = create_under(root.path(), "sb", limits).unwrap_err();
        let e = crate::chain(&e).to_string();
        assert!(e.contains("already exists"), "{e}");
    }
}
