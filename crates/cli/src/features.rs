//! `vessel features`: what this runtime supports, in runc's JSON shape
//! (runtime-spec features.md). The values describe the container inside the
//! guest (youki's libcontainer under the guest kernel), not the host.

use std::process::ExitCode;

use std::collections::BTreeMap;

use serde::Serialize;

/// Every capability the guest kernel (6.1) knows.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Mount options the guest's libcontainer parses.
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "remount",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "ro",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

/// runtime-spec's features document; fields in runc's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Features {
    oci_version_min: &'static str,
    oci_version_max: &'static str,
    hooks: &'static [&'static str],
    mount_options: &'static [&'static str],
    linux: Linux,
    annotations: BTreeMap<&'static str, &'static str>,
}

#[derive(Serialize)]
struct Linux {
    namespaces: &'static [&'static str],
    capabilities: &'static [&'static str],
    cgroup: Cgroup,
    seccomp: Seccomp,
    apparmor: Enabled,
    selinux: Enabled,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Cgroup {
    v1: bool,
    v2: bool,
    systemd: bool,
    systemd_user: bool,
}

#[derive(Serialize)]
struct Seccomp {
    enabled: bool,
    actions: &'static [&'static str],
    operators: &'static [&'static str],
    archs: &'static [&'static str],
}

#[derive(Serialize)]
struct Enabled {
    enabled: bool,
}

pub fn document() -> Features {
    Features {
        oci_version_min: "1.0.0",
        oci_version_max: "1.2.0",
        hooks: &[
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop",
        ],
        mount_options: MOUNT_OPTIONS,
        linux: Linux {
            // "network" is the VM's: a container's own is its VM.
            namespaces: &["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            capabilities: CAPABILITIES,
            cgroup: Cgroup {
                v1: false,
                v2: true,
                systemd: false,
                systemd_user: false,
            },
            seccomp: Seccomp {
                enabled: true,
                // No SCMP_ACT_NOTIFY: nothing in the guest receives the listener fd.
                actions: &[
                    "SCMP_ACT_ALLOW",
                    "SCMP_ACT_ERRNO",
                    "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE",
                    "SCMP_ACT_TRAP",
                ],
                operators: &[
                    "SCMP_CMP_EQ",
                    "SCMP_CMP_GE",
                    "SCMP_CMP_GT",
                    "SCMP_CMP_LE",
                    "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ",
                    "SCMP_CMP_NE",
                ],
                archs: &["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
            },
            apparmor: Enabled { enabled: false },
            selinux: Enabled { enabled: false },
        },
        annotations: BTreeMap::from([
            ("org.opencontainers.runc.checkpoint.enabled", "false"),
            ("dev.vessel.version", env!("CARGO_PKG_VERSION")),
            ("dev.vessel.isolation", "microvm"),
        ]),
    }
}

pub fn run() -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(&document())?);
    Ok(ExitCode::SUCCESS)
}
