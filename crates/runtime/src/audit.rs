//! The configuration audit (`vessel check --audit`): every setting of the effective
//! configuration, and every host fact, that weakens the isolation of sandboxes, each
//! with why and the fix; and the safeguards no setting can turn off.
//!
//! [`audit`] is pure: it takes the configuration and [`HostFacts`] (gathered by
//! [`HostFacts::probe`]) so that each finding is unit-tested for any host. Nothing
//! here starts a VM. docs/configuration-audit.md lists what is flagged.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vessel_hypervisor::host::{detect_kvm, KvmKind};
use vessel_hypervisor::Accelerator;

use crate::backend::Backend;
use crate::config::{AcceleratorChoice, HypervisorKind};
use crate::Config;

/// A `logs.max_bytes` above this is flagged: each sandbox keeps several logs of this
/// size in its run directory (under `/run`, a tmpfs: host memory).
pub const LOG_MAX_BYTES_AUDIT: u64 = 64 << 20;
/// A `limits.memory_overhead_mib` above this is flagged: the memory limit then bounds
/// little beyond the VM's own memory.
pub const MEMORY_OVERHEAD_AUDIT_MIB: u64 = 4096;
/// A `limits.pids` above this is flagged (the backends' default is 512).
pub const PIDS_AUDIT: u64 = 8192;

/// What the audit needs to know about the host (and the calling environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The host's KVM and the detection's one-line reason.
    pub kvm: KvmKind,
    pub kvm_why: String,
    /// The effective uid of the runtime (the state root and templates must be its).
    pub euid: u32,
    /// The state root's owner and mode, if it exists.
    pub state_root: Option<DirFacts>,
    /// The templates directory's owner and mode, if it exists.
    pub template_dir: Option<DirFacts>,
    /// `VESSEL_VMM_SECCOMP` in this environment (an unjailed vessel-vmm inherits it).
    pub vmm_seccomp_env: Option<String>,
}

/// Owner and permission bits of a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirFacts {
    pub uid: u32,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
}

impl DirFacts {
    fn of(path: &Path) -> Option<DirFacts> {
        // Not following a symlink: a link in place of the directory is its own finding
        // (its mode is 0777).
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(DirFacts {
            uid: m.uid(),
            mode: if m.file_type().is_symlink() {
                0o777
            } else {
                m.mode() & 0o7777
            },
        })
    }
}

impl HostFacts {
    /// This host's facts for `config` (reads only: creates nothing).
    pub fn probe(config: &Config) -> HostFacts {
        let (kvm, kvm_why) = detect_kvm();
        HostFacts {
            kvm,
            kvm_why,
            euid: nix::unistd::geteuid().as_raw(),
            state_root: DirFacts::of(&config.state_root),
            template_dir: DirFacts::of(&config.template_dir()),
            vmm_seccomp_env: std::env::var("VESSEL_VMM_SECCOMP").ok(),
        }
    }
}

/// One setting (or host fact) that weakens isolation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The configuration key (`builtin.jailer`), or the host fact or environment
    /// variable, that is flagged.
    pub setting: String,
    /// Its value, and where it matters, what it resolves to.
    pub value: String,
    /// Why it weakens isolation.
    pub why: String,
    /// What to change.
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} = {}\n  why: {}\n  fix: {}",
            self.setting, self.value, self.why, self.fix
        )
    }
}

/// A safeguard that no setting turns off (printed by `--audit` as an ok line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Safeguard {
    pub what: &'static str,
    pub detail: String,
}

fn finding(setting: &str, value: impl fmt::Display, why: &str, fix: &str) -> Finding {
    Finding {
        setting: setting.to_string(),
        value: value.to_string(),
        why: why.to_string(),
        fix: fix.to_string(),
    }
}

/// Every setting of `config` and fact of `host` that weakens isolation, in the order
/// of docs/configuration-audit.md. Empty: nothing is flagged.
pub fn audit(config: &Config, host: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    accelerator(config, host, &mut out);
    builtin(config, host, &mut out);
    kernel_args(config, &mut out);
    logs(config, &mut out);
    limits(config, &mut out);
    directories(config, host, &mut out);
    out
}

fn accelerator(config: &Config, host: &HostFacts, out: &mut Vec<Finding>) {
    let Ok(b) = Backend::resolve_for(config, host.kvm, &host.kvm_why) else {
        // The built-in VMM without hardware KVM: nothing runs (not a weakening;
        // plain `vessel check` reports it).
        return;
    };
    if b.accelerator != Accelerator::Tcg {
        return;
    }
    let why = "TCG emulates the whole machine in software: the device model and a JIT \
               that translates guest code run in one host process, a far larger attack \
               surface than hardware virtualization";
    if config.qemu.accelerator == AcceleratorChoice::Tcg {
        out.push(finding(
            "qemu.accelerator",
            format!("\"tcg\" (forced; {})", b.reason),
            why,
            "set qemu.accelerator = \"auto\" (or \"kvm\") on a host with hardware KVM \
             (kvm_intel or kvm_amd)",
        ));
    } else {
        out.push(finding(
            "qemu.accelerator",
            format!(
                "\"{}\" resolves to tcg ({})",
                accelerator_name(config.qemu.accelerator),
                b.reason
            ),
            why,
            "run sandboxes on a host with hardware KVM (kvm_intel or kvm_amd; nested \
             virtualization in a VM), with qemu.accelerator = \"auto\" or \"kvm\" \
             (hypervisor = \"auto\" then picks the built-in VMM)",
        ));
    }
}

fn accelerator_name(a: AcceleratorChoice) -> &'static str {
    match a {
        AcceleratorChoice::Auto => "auto",
        AcceleratorChoice::Kvm => "kvm",
        AcceleratorChoice::Tcg => "tcg",
    }
}

/// Where the `[builtin]` section applies: `hypervisor = "builtin"`, or `"auto"` (the
/// built-in VMM on any host with hardware KVM). With `"qemu"` it is never used.
fn builtin(config: &Config, host: &HostFacts, out: &mut Vec<Finding>) {
    if config.hypervisor == HypervisorKind::Qemu {
        return;
    }
    let here = if host.kvm == KvmKind::Hardware {
        "the built-in VMM runs sandboxes on this host"
    } else {
        "applies on hosts with hardware KVM, where the built-in VMM runs sandboxes"
    };
    if !config.builtin.jailer {
        out.push(finding(
            "builtin.jailer",
            format!("false ({here})"),
            "vessel-vmm then runs as root in the host's mount namespace with every host \
             file in reach: a guest that escapes into the VMM owns the host (the jailer \
             confines it to its own files after pivot_root, an unprivileged uid/gid, no \
             new privileges and a cleared environment)",
            "set [builtin] jailer = true (the default)",
        ));
        if let Some(mode) = host
            .vmm_seccomp_env
            .as_deref()
            .filter(|m| matches!(*m, "off" | "log"))
        {
            out.push(finding(
                "VESSEL_VMM_SECCOMP",
                format!("{mode} (in this environment; reaches vessel-vmm without the jailer)"),
                "the built-in VMM's per-thread seccomp filters are then off (\"off\") or only \
                 log violations (\"log\"): a compromised VMM thread can make any system call",
                "unset VESSEL_VMM_SECCOMP (debugging only) in the environment of vessel and \
                 of containerd's shim, and keep the jailer on (it clears the environment)",
            ));
        }
    }
}

/// Kernel command-line words that weaken the guest kernel (the container's first
/// barrier) or replace the agent.
const MITIGATION_WORDS: &[&str] = &[
    "nokaslr",
    "nopti",
    "nosmap",
    "nosmep",
    "noibrs",
    "noibpb",
    "nospectre_v1",
    "nospectre_v2",
    "nospectre_bhb",
    "nospec_store_bypass_disable",
    "norandmaps",
    "kpti=0",
];

/// `key=off` words: a CPU vulnerability mitigation or hardening turned off.
const MITIGATION_KEYS: &[&str] = &[
    "mitigations",
    "pti",
    "spectre_v1",
    "spectre_v2",
    "spectre_v2_user",
    "spectre_bhi",
    "spec_store_bypass_disable",
    "l1tf",
    "mds",
    "tsx_async_abort",
    "mmio_stale_data",
    "retbleed",
    "srbds",
    "gather_data_sampling",
    "reg_file_data_sampling",
    "spec_rstack_overflow",
    "randomize_kstack_offset",
];

fn kernel_args(config: &Config, out: &mut Vec<Finding>) {
    for word in &config.kernel_args {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        let value_off = matches!(value, Some("off" | "0"));
        let f = |why: &str, fix: &str| finding("kernel_args", format!("{word:?}"), why, fix);
        let remove = format!("remove {word:?} from kernel_args");
        if MITIGATION_WORDS.contains(&word.as_str())
            || (MITIGATION_KEYS.contains(&key) && value_off)
        {
            out.push(f(
                "it turns off a hardening or CPU vulnerability mitigation of the guest \
                 kernel, the barrier between a container and its VM (and, for side \
                 channels, between the VM and its neighbours)",
                &remove,
            ));
        } else if key == "init" || key == "rdinit" {
            out.push(f(
                "it replaces vessel-agent as the guest's first process: the agent's \
                 policy, the container's seccomp and the guest set-up no longer apply",
                &remove,
            ));
        } else if key == "console" && value != Some("ttyS0") {
            out.push(f(
                "the runtime's console is ttyS0, captured and capped in the sandbox's \
                 console log; another console sends the guest's kernel and agent output \
                 where it is neither captured nor capped",
                &remove,
            ));
        } else if key.starts_with("kgdb") || key == "ekgdboc" {
            out.push(f(
                "it starts the guest kernel debugger on a console: whoever reaches it \
                 reads and writes guest kernel memory",
                &remove,
            ));
        } else if key == "sysrq_always_enabled" {
            out.push(f(
                "magic SysRq is then enabled for everything in the guest that can write \
                 to a console or /proc/sysrq-trigger",
                &remove,
            ));
        } else if word == "vessel.debug" {
            out.push(f(
                "the agent logs at debug level (process spawns, stdio attaches) into the \
                 host's console log: more of the workload's activity in host logs, and \
                 more guest-driven log volume",
                &remove,
            ));
        }
    }
}

fn logs(config: &Config, out: &mut Vec<Finding>) {
    if config.logs.bytes_per_sec == 0 {
        out.push(finding(
            "logs.bytes_per_sec",
            "0 (no rate cap)",
            "a guest can write its console and the helpers' logs as fast as the host \
             can take them: host CPU and disk bandwidth (the size cap still holds)",
            "set [logs] bytes_per_sec to a positive rate (default 262144)",
        ));
    }
    if config.logs.max_bytes > LOG_MAX_BYTES_AUDIT {
        out.push(finding(
            "logs.max_bytes",
            config.logs.max_bytes,
            "each sandbox keeps several logs of this size in its run directory (under \
             /run by default: a tmpfs, host memory) that its guest can fill",
            &format!(
                "set [logs] max_bytes to at most {LOG_MAX_BYTES_AUDIT} (default {})",
                vessel_logcap::DEFAULT_MAX_BYTES
            ),
        ));
    }
}

fn limits(config: &Config, out: &mut Vec<Finding>) {
    let l = &config.limits;
    if !l.enabled {
        out.push(finding(
            "limits.enabled",
            "false",
            "the sandbox's host processes (VMM or jailer, virtiofsd, vhost-device-vsock, \
             supervisor) run without a cgroup: a guest can make them take host memory, CPU \
             and processes without bound",
            "set [limits] enabled = true (the default)",
        ));
        return;
    }
    if l.extra_cpus == 0.0 {
        out.push(finding(
            "limits.extra_cpus",
            "0 (no CPU limit)",
            "a guest can make its VMM and helpers use every host CPU (I/O threads, \
             virtiofsd), starving other sandboxes",
            "set [limits] extra_cpus to a positive number of CPUs (default 1)",
        ));
    }
    if let Some(m) = l
        .memory_overhead_mib
        .filter(|m| *m > MEMORY_OVERHEAD_AUDIT_MIB)
    {
        out.push(finding(
            "limits.memory_overhead_mib",
            format!("{m} MiB"),
            "the memory a sandbox's host processes may take beyond the VM's own is so \
             large that the limit bounds little",
            &format!(
                "remove it (the backend's overhead, 96 to 192 MiB) or set at most \
                 {MEMORY_OVERHEAD_AUDIT_MIB}"
            ),
        ));
    }
    if let Some(p) = l.pids.filter(|p| *p > PIDS_AUDIT) {
        out.push(finding(
            "limits.pids",
            p,
            "a guest can make its host processes spawn threads up to this bound, near the \
             host's own limits",
            &format!("remove it (the backend's default, 512) or set at most {PIDS_AUDIT}"),
        ));
    }
}

fn directories(config: &Config, host: &HostFacts, out: &mut Vec<Finding>) {
    if let Some(d) = host.state_root {
        if d.uid != host.euid || d.mode & 0o066 != 0 {
            out.push(finding(
                "state_root",
                format!(
                    "{} (uid {}, mode {:o})",
                    config.state_root.display(),
                    d.uid,
                    d.mode
                ),
                "the state root holds every sandbox's sockets (agent, VMM API), logs and \
                 state; it must be the runtime user's and not readable or writable by \
                 others, or they can list, replace or reach into sandboxes",
                &format!(
                    "chown {} {} && chmod 0711 {} (what the runtime creates)",
                    host.euid,
                    config.state_root.display(),
                    config.state_root.display()
                ),
            ));
        }
    }
    if let Some(d) = host.template_dir.filter(|_| config.templates.enabled) {
        if d.uid != host.euid || d.mode & 0o077 != 0 {
            let dir = config.template_dir();
            out.push(finding(
                "templates.dir",
                format!("{} (uid {}, mode {:o})", dir.display(), d.uid, d.mode),
                "templates hold snapshots of guest memory and the VM state every clone \
                 starts from; a directory others can read or write leaks or lets them \
                 swap a template (each template is still checked against its manifest)",
                &format!(
                    "chown {} {} && chmod 0700 {}",
                    host.euid,
                    dir.display(),
                    dir.display()
                ),
            ));
        }
    }
}

/// The safeguards no setting turns off, and what is in force where a setting can only
/// be stricter than the default (the agent policy).
pub fn always_on(config: &Config) -> Vec<Safeguard> {
    let s = |what, detail: &str| Safeguard {
        what,
        detail: detail.to_string(),
    };
    vec![
        s(
            "QEMU sandbox",
            "QEMU always runs with -sandbox on,obsolete=deny,elevateprivileges=deny,\
             spawn=deny,resourcecontrol=deny (seccomp); no setting turns it off",
        ),
        s(
            "VMM seccomp",
            "vessel-vmm installs per-thread seccomp filters; no setting turns them off, only \
             VESSEL_VMM_SECCOMP in the environment of an unjailed VMM (flagged above when set \
             here; the jailer clears the environment)",
        ),
        s(
            "jail user",
            "with the jailer on, builtin.jail_uid or jail_gid = 0 (root) is rejected when \
             the configuration is read",
        ),
        s(
            "log size caps",
            &format!(
                "every log a guest can grow is capped at logs.max_bytes ({} bytes here; \
                 less than {} is rejected, there is no 'unlimited')",
                config.logs.max_bytes,
                vessel_logcap::MIN_MAX_BYTES
            ),
        ),
        s(
            "template checks",
            "a template is used only if its directory is the runtime user's with mode \
             0700 (0750 for the jail group) and its files match template.json (SHA-256 of \
             files up to 1 MiB, size and modification time of guest memory); no setting \
             turns this off",
        ),
        s(
            "shared directories",
            "no configuration key shares a host directory: volumes come from each \
             container's OCI mounts, and the guest sees only its bundle's rootfs and those",
        ),
        s(
            "agent policy",
            &match &config.agent.policy {
                Some(p) => format!(
                    "{} (a policy can only be stricter than the built-in default)",
                    p.display()
                ),
                None => "the built-in default (every RPC the runtime needs); set [agent] \
                         policy to restrict it (docs/agent-policy.md)"
                    .to_string(),
            },
        ),
    ]
}

/// The backend `config` resolves to on `host`, or why none can run (for the audit's
/// header line).
pub fn backend_line(config: &Config, host: &HostFacts) -> String {
    match Backend::resolve_for(config, host.kvm, &host.kvm_why) {
        Ok(b) => b.to_string(),
        Err(e) => format!("none: {}", crate::chain(&e)),
    }
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
