//! Turns the host's config.json into the one libcontainer runs in the guest.

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, Spec};

/// Guest cgroup (relative to /sys/fs/cgroup) of a container.
pub fn cgroup_path(container_id: &str) -> String {
    format!("/vessel/{container_id}")
}

/// Why a spec cannot run in the guest.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SpecError {
    /// invalid OCI spec JSON
    Json(#[from] serde_json::Error),
    /// the spec has no root; root.path must be an absolute guest path
    NoRoot,
    /// root.path {0:?} must be an absolute guest path (the host rewrites it)
    RelativeRoot(String),
    /// the spec has no process
    NoProcess,
    /// process.args is empty
    NoArgs,
    /// invalid sysctl name {0:?}
    BadSysctl(String),
}

/// Namespaces a container of a pod shares with the pod's sandbox container.
const SHARED_WITH_SANDBOX: [(LinuxNamespaceType, &str); 3] = [
    (LinuxNamespaceType::Ipc, "ipc"),
    (LinuxNamespaceType::Uts, "uts"),
    (LinuxNamespaceType::Pid, "pid"),
];

/// Parses and rewrites a spec for the guest:
/// - hooks are dropped; `startContainer` ones (run in the container, so in the
///   guest) move to [`GuestSpec::start_hooks`]; the other hooks run on the host;
/// - a seccomp profile answers ENOSYS to syscalls newer than it names
///   ([`super::seccomp::add_enosys_rules`]), as runc's does;
/// - the network namespace is dropped: the VM is the pod's network namespace;
/// - namespace paths name host files. With `sandbox_pid` (the guest pid of the
///   pod's sandbox container), an ipc, uts or pid entry with a path joins that
///   namespace of the sandbox (`/proc/<sandbox_pid>/ns/<type>`): the host path
///   named the sandbox's namespace too. Any other path is dropped and a fresh
///   namespace is created instead;
/// - a cgroup namespace is added if the spec has none: the guest is cgroup v2
///   only, where a private cgroup namespace is the default (containerd leaves
///   it out on cgroup v1 or hybrid hosts), so the container's /sys/fs/cgroup
///   is its own cgroup and shows its limits, not the whole guest tree;
/// - linux.cgroupsPath becomes [`cgroup_path`] (the host's path means nothing here);
/// - host LSM labels are dropped and `noNewPrivileges: false` made absent
///   ([`guest_process`], linux.mountLabel);
/// - `net.*` sysctls move out of the spec into [`GuestSpec::net_sysctls`]: they
///   belong to the VM's network namespace, which the agent sets itself
///   (libcontainer refuses net.* sysctls without a new network namespace).
pub fn guest_spec(
    json: &[u8],
    container_id: &str,
    sandbox_pid: Option<i32>,
) -> Result<GuestSpec, SpecError> {
    let mut spec: Spec = serde_json::from_slice(json)?;
    let root = spec.root().as_ref().ok_or(SpecError::NoRoot)?;
    if !root.path().is_absolute() {
        return Err(SpecError::RelativeRoot(root.path().display().to_string()));
    }
    let process = spec.process().as_ref().ok_or(SpecError::NoProcess)?;
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    // startContainer hooks run in the container's namespaces, that is inside
    // the VM: the agent's executor runs them in the container's init before
    // it executes the process (see `executor`), not libcontainer, which could
    // not report their failure. Every other kind runs on the host.
    let start_hooks = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().clone())
        .unwrap_or_default();
    spec.set_hooks(None);
    if let Some(process) = spec.process_mut() {
        guest_process(process);
    }
    if let Some(linux) = spec.linux_mut() {
        linux.set_mount_label(None);
        if let Some(namespaces) = linux.namespaces_mut() {
            namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
            for ns in namespaces.iter_mut() {
                let Some(path) = ns.path() else { continue };
                let shared = SHARED_WITH_SANDBOX
                    .iter()
                    .find(|(typ, _)| *typ == ns.typ())
                    .map(|(_, name)| name);
                match (sandbox_pid, shared) {
                    (Some(pid), Some(name)) => {
                        ns.set_path(Some(format!("/proc/{pid}/ns/{name}").into()));
                    }
                    _ => {
                        log::info!(
                            "container {container_id}: {:?} namespace path {} is a host path; creating a new namespace",
                            ns.typ(),
                            path.display()
                        );
                        ns.set_path(None);
                    }
                }
            }
            if !namespaces
                .iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Cgroup)
            {
                let mut cgroup = LinuxNamespace::default();
                cgroup.set_typ(LinuxNamespaceType::Cgroup);
                namespaces.push(cgroup);
            }
        }
        linux.set_cgroups_path(Some(cgroup_path(container_id).into()));
    }
    sysfs_bind_in_user_namespace(&mut spec);
    let enosys = super::seccomp::add_enosys_rules(&mut spec);
    if enosys > 0 {
        log::debug!(
            "container {container_id}: ENOSYS for {enosys} syscalls newer than its seccomp profile"
        );
    }
    let mut net_sysctls = Vec::new();
    if let Some(sysctls) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.sysctl_mut().as_mut())
    {
        let net: Vec<String> = sysctls
            .keys()
            .filter(|k| k.starts_with("net."))
            .cloned()
            .collect();
        for key in net {
            if let Some(value) = sysctls.remove(&key) {
                if key.contains('/') {
                    return Err(SpecError::BadSysctl(key));
                }
                net_sysctls.push((key, value));
            }
        }
    }
    net_sysctls.sort();
    Ok(GuestSpec {
        spec,
        net_sysctls,
        start_hooks,
    })
}

/// With a user namespace, a `sysfs` mount becomes a read-only rbind of the
/// VM's /sys: the container keeps the VM's network namespace, which its user
/// namespace does not own, and the kernel allows sysfs only to the owner of
/// the network namespace (runc binds /sys in that case too). It shows what a
/// fresh sysfs in that network namespace would.
fn sysfs_bind_in_user_namespace(spec: &mut Spec) {
    let user_ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if !user_ns {
        return;
    }
    for m in spec.mounts_mut().iter_mut().flatten() {
        if m.typ().as_deref() != Some("sysfs") {
            continue;
        }
        // Read-only whatever the spec says: it is the VM's own /sys.
        let mut options: Vec<String> = vec!["rbind".into()];
        options.extend(
            m.options()
                .iter()
                .flatten()
                .filter(|o| matches!(o.as_str(), "nosuid" | "nodev" | "noexec"))
                .cloned(),
        );
        options.push("ro".into());
        m.set_typ(Some("bind".into()));
        m.set_source(Some("/sys".into()));
        m.set_options(Some(options));
    }
}

/// A spec ready for libcontainer, and what the agent applies itself.
pub struct GuestSpec {
    pub spec: Spec,
    /// `net.*` sysctls (key, value) for the VM's network namespace.
    pub net_sysctls: Vec<(String, String)>,
    /// The `startContainer` hooks, for the agent's executor.
    pub start_hooks: Vec<oci_spec::runtime::Hook>,
}

/// Sets a sysctl of the agent's (the VM's) namespaces.
pub fn write_sysctl(key: &str, value: &str) -> std::io::Result<()> {
    let path = std::path::Path::new("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(path, value)
}

/// Drops the AppArmor profile and SELinux label of a process: they name
/// host LSM policy, the guest kernel has no such LSM (libcontainer refuses a
/// profile it cannot apply), and the VM is the isolation boundary.
///
/// `noNewPrivileges: false` becomes absent (the same in the OCI spec):
/// libcontainer tests `is_none()`, so an explicit false made it load the
/// seccomp filter after dropping capabilities and without no_new_privs,
/// which the kernel refuses (runc loads it before dropping them).
pub fn guest_process(process: &mut Process) {
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
    if let Some(profile) = process.apparmor_profile() {
        log::info!("ignoring AppArmor profile {profile:?}: no AppArmor in the guest");
        process.set_apparmor_profile(None);
    }
    if process.selinux_label().is_some() {
        process.set_selinux_label(None);
    }
}

/// Whether the spec mounts /dev with `ro` (libcontainer mounts it writable
/// regardless; the agent remounts it, see `Containers::create`).
pub fn dev_read_only(spec: &Spec) -> bool {
    spec.mounts().iter().flatten().any(|m| {
        m.destination() == std::path::Path::new("/dev")
            && m.options().iter().flatten().any(|o| o == "ro")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_is_bound_in_a_user_namespace_only() {
        let spec = |ns: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion": "1.0.2", "root": {{"path": "/r"}},
                    "process": {{"args": ["sh"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}},
                    "mounts": [{{"destination": "/sys", "type": "sysfs", "source": "sysfs",
                                 "options": ["nosuid", "noexec", "nodev"]}}],
                    "linux": {{"namespaces": [{{"type": "mount"}}{ns}]}}}}"#
            ))
            .unwrap()
        };
        let json = |s: &Spec| serde_json::to_vec(s).unwrap();
        let g = guest_spec(&json(&spec(r#", {"type": "user"}"#)), "c1", None).unwrap();
        let m = &g.spec.mounts().as_ref().unwrap()[0];
        assert_eq!(m.typ().as_deref(), Some("bind"));
        assert_eq!(m.source().as_deref(), Some(std::path::Path::new("/sys")));
        assert_eq!(
            m.options().as_ref().unwrap(),
            &["rbind", "nosuid", "noexec", "nodev", "ro"]
        );
        let g = guest_spec(&json(&spec("")), "c1", None).unwrap();
        assert_eq!(
            g.spec.mounts().as_ref().unwrap()[0].typ().as_deref(),
            Some("sysfs")
        );
    }

    #[test]
    fn no_new_privileges_false_is_absent() {
        let mut p: Process =
            serde_json::from_str(r#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "noNewPrivileges": false}"#)
                .unwrap();
        guest_process(&mut p);
        assert_eq!(p.no_new_privileges(), None);
        let mut p: Process =
            serde_json::from_str(r#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "noNewPrivileges": true}"#)
                .unwrap();
        guest_process(&mut p);
        assert_eq!(p.no_new_privileges(), Some(true));
    }

    #[test]
    fn dev_read_only_only_for_an_ro_dev_mount() {
        let with = |opts: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion": "1.0.2", "root": {{"path": "/r"}}, "mounts": [
                    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": [{opts}]}},
                    {{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]}}]}}"#
            ))
            .unwrap()
        };
        assert!(dev_read_only(&with(r#""nosuid", "ro""#)));
        assert!(!dev_read_only(&with(r#""nosuid", "mode=755""#)));
    }

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "root": {"path": "/run/vessel/shared/c1/rootfs", "readonly": true},
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "apparmorProfile": "docker-default", "selinuxLabel": "system_u:r:x"},
        "hostname": "h",
        "hooks": {"prestart": [{"path": "/usr/bin/true"}],
                  "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "true"]}]},
        "linux": {
            "cgroupsPath": "/kubepods/pod1/c1",
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.msgmax": "4096"},
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "mount"}
            ]
        }
    }"#;

    #[test]
    fn rewrites_for_guest() {
        let GuestSpec {
            spec,
            net_sysctls,
            start_hooks,
        } = guest_spec(SPEC.as_bytes(), "c1", None).unwrap();
        assert_eq!(
            net_sysctls,
            [(
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string()
            )]
        );
        let sysctl = spec.linux().as_ref().unwrap().sysctl().as_ref().unwrap();
        assert_eq!(sysctl.len(), 1);
        assert_eq!(sysctl["kernel.msgmax"], "4096");
        // No hooks for libcontainer; startContainer ones for the executor.
        assert!(spec.hooks().is_none());
        assert_eq!(start_hooks.len(), 1);
        assert_eq!(start_hooks[0].path(), std::path::Path::new("/bin/sh"));
        let process = spec.process().as_ref().unwrap();
        assert!(process.apparmor_profile().is_none());
        assert!(process.selinux_label().is_none());
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(std::path::Path::new("/vessel/c1"))
        );
        let ns = linux.namespaces().as_ref().unwrap();
        let types: Vec<_> = ns.iter().map(|n| n.typ()).collect();
        assert_eq!(
            types,
            [
                LinuxNamespaceType::Pid,
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Cgroup
            ]
        );
        assert!(ns.iter().all(|n| n.path().is_none()));
        assert_eq!(spec.hostname().as_deref(), Some("h"));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    }

    #[test]
    fn joins_the_sandbox_namespaces() {
        let mut pod: serde_json::Value = serde_json::from_str(SPEC).unwrap();
        pod["linux"]["namespaces"] = serde_json::json!([
            {"type": "pid", "path": "/proc/42/ns/pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts", "path": "/proc/42/ns/uts"},
            {"type": "mount"},
            {"type": "cgroup", "path": "/proc/42/ns/cgroup"}
        ]);
        let json = pod.to_string();
        let namespaces = |sandbox_pid| {
            let spec = guest_spec(json.as_bytes(), "c1", sandbox_pid).unwrap().spec;
            let linux = spec.linux().clone().unwrap();
            linux
                .namespaces()
                .clone()
                .unwrap()
                .into_iter()
                .map(|n| (n.typ(), n.path().clone().map(|p| p.display().to_string())))
                .collect::<Vec<_>>()
        };
        let path = |s: &str| Some(s.to_string());
        assert_eq!(
            namespaces(Some(7)),
            [
                (LinuxNamespaceType::Pid, path("/proc/7/ns/pid")),
                (LinuxNamespaceType::Ipc, path("/proc/7/ns/ipc")),
                (LinuxNamespaceType::Uts, path("/proc/7/ns/uts")),
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Cgroup, None),
            ]
        );
        // Without a sandbox (the vessel CLI): every namespace is new.
        assert!(namespaces(None).iter().all(|(_, p)| p.is_none()));
        // A pid entry without a path (pod pid namespace not shared) stays new.
        let ns = guest_spec(SPEC.as_bytes(), "c1", Some(7)).unwrap().spec;
        let ns = ns.linux().clone().unwrap().namespaces().clone().unwrap();
        let pid = ns.iter().find(|n| n.typ() == LinuxNamespaceType::Pid);
        assert_eq!(pid.unwrap().path(), &None);
        let ipc = ns.iter().find(|n| n.typ() == LinuxNamespaceType::Ipc);
        assert_eq!(
            ipc.unwrap().path().as_deref(),
            Some(std::path::Path::new("/proc/7/ns/ipc"))
        );
    }

    #[test]
    fn refuses_bad_specs() {
        assert!(matches!(
            guest_spec(b"{", "c", None),
            Err(SpecError::Json(_))
        ));
        let slash = SPEC.replace("net.ipv4.ip_unprivileged_port_start", "net.ipv4/../../x");
        assert!(matches!(
            guest_spec(slash.as_bytes(), "c", None),
            Err(SpecError::BadSysctl(_))
        ));
        let rel = SPEC.replace("/run/vessel/shared/c1/rootfs", "rootfs");
        assert!(matches!(
            guest_spec(rel.as_bytes(), "c", None),
            Err(SpecError::RelativeRoot(_))
        ));
        let no_args = SPEC.replace(r#""args": ["sh"], "#, r#""args": [], "#);
        assert!(matches!(
            guest_spec(no_args.as_bytes(), "c", None),
            Err(SpecError::NoArgs)
        ));
        let v: serde_json::Value = serde_json::from_str(SPEC).unwrap();
        let mut no_proc = v.clone();
        no_proc.as_object_mut().unwrap().remove("process");
        assert!(matches!(
            guest_spec(no_proc.to_string().as_bytes(), "c", None),
            Err(SpecError::NoProcess)
        ));
    }
}
