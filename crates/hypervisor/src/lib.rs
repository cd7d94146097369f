//! Hypervisors behind one small trait.
//!
//! A [`Hypervisor`] launches a [`Vm`] from a [`VmConfig`]; the runtime sees only
//! `dyn Hypervisor` / `dyn Vm`. This crate is the only place that knows a
//! hypervisor's command line or API. Backends: [`qemu`] (KVM when the host has
//! hardware KVM, TCG otherwise) and [`builtin`] (`vessel-vmm`, hardware KVM).

pub mod builtin;
pub mod host;
pub mod nic;
mod process;
mod process_vm;
pub mod qemu;
pub mod snapshot;
mod virtiofs;

pub use process::{exit_log_tail, log_tail};

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use host::{Accelerator, KvmKind};
pub use nic::{MacAddr, Nic, TapNic};
pub use snapshot::SnapshotInfo;

/// Hypervisor errors. A variant that wraps a source does not repeat it: `{:#}`
/// prints the chain once.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum Error {
    /// {what} not found at {path:?}: {hint}
    NotFound {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    /// Failed to start {what}
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    /// Timed out after {after:?} waiting for {what}
    Timeout { what: String, after: Duration },
    /// {what} exited early ({status}): {detail}
    EarlyExit {
        what: &'static str,
        status: String,
        detail: String,
    },
    /// QMP command {command} failed: {reason}
    Qmp { command: String, reason: String },
    /// vessel-vmm request {request} failed
    VmmApi {
        request: &'static str,
        source: crate::builtin::api::ApiCallError,
    },
    /// Operation not supported by the {backend} backend: {operation}
    Unsupported {
        backend: &'static str,
        operation: &'static str,
    },
    /// Invalid VM configuration: {0}
    InvalidConfig(String),
    /// I/O error on {what}
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Cannot start {what} in the sandbox's host cgroup
    Cgroup {
        what: &'static str,
        source: vessel_cgroup::CgroupError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the host reaches the agent inside the guest (`vsock` or `serial` in
/// configuration files and snapshot metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentChannel {
    /// vsock, reached through a hybrid-vsock Unix socket on the host.
    Vsock,
    /// A virtio-serial port, reached through a Unix socket on the host.
    Serial,
}

impl fmt::Display for AgentChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentChannel::Vsock => "vsock",
            AgentChannel::Serial => "serial",
        })
    }
}

/// Where the agent can be reached once the guest is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// Connect to `uds`, send `CONNECT <port>\n`. Guest-initiated connections
    /// to host port P arrive at the Unix socket `<uds>_P`.
    HybridVsock { uds: PathBuf },
    /// Connect to the Unix socket; the stream is the agent's ttrpc connection.
    Serial { path: PathBuf },
}

/// Everything needed to start one sandbox VM. Paths are owned by the caller,
/// which creates `run_dir` and removes it after the VM has stopped.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Sandbox id, used in process names and logs.
    pub id: String,
    /// Private directory for sockets and helper state (short: Unix socket paths
    /// are limited to 107 bytes).
    pub run_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Extra kernel command-line words, appended after the backend's own.
    pub kernel_args: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub channel: AgentChannel,
    /// Host Unix socket of the guest's vsock (hybrid vsock), for the vsock channel.
    pub vsock_uds: PathBuf,
    /// File that receives the guest serial console.
    pub console_log: PathBuf,
    /// Size and rate caps of the console log and of the hypervisor's and
    /// helpers' logs (all of which the guest can make grow).
    pub log_limits: vessel_logcap::Limits,
    /// Directories shared with the guest (virtio-fs), by tag.
    pub shared_dirs: Vec<SharedDir>,
    /// Network devices, in guest order (empty: no network but loopback).
    pub nics: Vec<Nic>,
    /// The sandbox's network namespace (an open nsfs file): the VMM process
    /// runs in it, so that its host pid names the sandbox's network (`None`:
    /// the caller's namespace).
    pub netns: Option<Arc<OwnedFd>>,
    /// The sandbox's host cgroup: every process the backend starts joins it
    /// before it execs (`None`: they stay in the caller's). The caller
    /// creates it, sized with [`Hypervisor::host_overhead`], and removes it.
    pub cgroup: Option<Arc<vessel_cgroup::Cgroup>>,
    /// Start the VM without the devices its backend cannot snapshot, so that
    /// it can be snapshotted once its agent is up (templates): QEMU holds back
    /// its vhost-user devices (the vsock device and the virtio-fs shares) and
    /// reaches the agent on virtio-serial until [`Vm::attach_deferred`] plugs
    /// them in. Backends that snapshot every device they have ignore it.
    pub deferred_devices: bool,
}

/// Processes and threads a sandbox's host processes may have together: QEMU's
/// vCPU, I/O and worker threads (its thread pool grows to 64), virtiofsd's
/// two processes and thread pool, vhost-device-vsock and the supervisor's
/// runtime threads; a sandbox at rest has about 25 (docs/threat-model.md).
pub const HOST_PIDS: u64 = 512;

/// What a backend's host processes need beside the guest's memory and vCPUs
/// (measured figures in docs/threat-model.md, "Host limits").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostOverhead {
    /// MiB beyond the guest's RAM: the hypervisor's own memory (QEMU's TCG
    /// translation cache, device state), virtiofsd, the vsock backend, and
    /// the supervisor's memory after it joins.
    pub memory_mib: u64,
    /// Processes and threads at most, all of them together.
    pub pids: u64,
}

/// A host directory exported to the guest under `tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    pub tag: String,
    pub host_path: PathBuf,
    pub read_only: bool,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code of the hypervisor process, if it exited normally.
    pub code: Option<i32>,
    /// Signal that killed it, if any.
    pub signal: Option<i32>,
}

impl VmExit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown status"),
        }
    }
}

/// What a backend can do on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub accelerator: Accelerator,
    pub channels: Vec<AgentChannel>,
    pub pause_resume: bool,
    pub shared_dirs: bool,
    /// Snapshot and restore (with the limits the backend documents).
    pub snapshot: bool,
}

/// A hypervisor backend.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Short backend name (`qemu`, `builtin`, ...).
    fn name(&self) -> &'static str;
    /// What this backend can do on this host.
    fn capabilities(&self) -> Capabilities;
    /// What its host processes need beside the guest (`None`: it starts no
    /// host process, as the test doubles).
    fn host_overhead(&self) -> Option<HostOverhead> {
        None
    }
    /// Starts a VM. Returns once the hypervisor process runs; the guest boots
    /// in the background (the caller waits for the agent).
    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>>;
    /// Whether a VM launched from `config` could be snapshotted, or why not
    /// (for callers that decide before launching, as templates do).
    fn snapshot_blocker(&self, config: &VmConfig) -> Option<&'static str> {
        let _ = config;
        Some("this backend cannot snapshot VMs")
    }
    /// Starts a VM from the snapshot in `snapshot` (written by [`Vm::snapshot`]
    /// of this backend). `config` must have the snapshot's shape (see
    /// [`SnapshotInfo::check_matches`]); its paths (run directory, sockets,
    /// console) are the new VM's. Returns once the guest runs again.
    async fn restore(&self, snapshot: &Path, config: &VmConfig) -> Result<Box<dyn Vm>> {
        let _ = (snapshot, config);
        Err(Error::Unsupported {
            backend: self.name(),
            operation: "restore",
        })
    }
}

/// A running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    /// How the agent is reached.
    fn agent_endpoint(&self) -> AgentEndpoint;
    /// Accelerator in use.
    fn accelerator(&self) -> Accelerator;
    /// Host pids of the hypervisor and its helper processes.
    fn pids(&self) -> Vec<u32>;
    /// Resolves when the hypervisor process has exited (helpers are then
    /// stopped too). Safe to call from several tasks.
    async fn wait(&self) -> VmExit;
    /// The exit status if the VM has already ended.
    fn try_exit(&self) -> Option<VmExit>;
    /// The last lines the hypervisor and its helpers logged, for error messages.
    fn diagnostics(&self) -> String;
    async fn pause(&self) -> Result<()>;
    async fn resume(&self) -> Result<()>;
    /// Asks the hypervisor to stop, kills it after `grace`, stops helpers.
    async fn stop(&self, grace: Duration) -> Result<VmExit>;
    /// Adds the devices held back by [`VmConfig::deferred_devices`] (a
    /// no-op when none were), after which [`Vm::agent_endpoint`] may name
    /// another endpoint and the VM can no longer be snapshotted. On error the
    /// VM runs on without them: stop it.
    async fn attach_deferred(&self) -> Result<()> {
        Ok(())
    }
    /// Pauses the VM and writes a snapshot of it into `dir` (created, or
    /// empty). The VM stays paused: resume or stop it. On error nothing is
    /// left in `dir`.
    async fn snapshot(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        Err(Error::Unsupported {
            backend: "this",
            operation: "snapshot",
        })
    }
}

/// Checks what every backend needs before starting anything.
pub(crate) fn check_vm_config(cfg: &VmConfig) -> Result<()> {
    for (path, what) in [
        (&cfg.kernel, "guest kernel"),
        (&cfg.initramfs, "guest initramfs"),
    ] {
        if !path.is_file() {
            return Err(Error::NotFound {
                what,
                path: path.clone(),
                hint: "run 'make guest' or set guest_kernel/guest_initramfs in /etc/vessel/config.toml",
            });
        }
    }
    if cfg.memory_mib < 64 || cfg.vcpus == 0 {
        return Err(Error::InvalidConfig(format!(
            "need at least 64 MiB and 1 vCPU (got {} MiB, {} vCPUs)",
            cfg.memory_mib, cfg.vcpus
        )));
    }
    Ok(())
}

/// The guest kernel command line: words every backend uses, the backend's
/// own (how a guest reboot ends the VM), the agent channel, then the
/// configuration's extra words.
pub(crate) fn guest_cmdline(cfg: &VmConfig, backend_words: &[&str]) -> String {
    let mut words: Vec<String> = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        "cryptomgr.notests",
        "no_timer_check",
    ]
    .iter()
    .chain(["rcupdate.rcu_expedited=1", "pci=lastbus=0"].iter())
    .chain(backend_words.iter())
    .map(|w| w.to_string())
    .collect();
    words.push(format!("vessel.channel={}", cfg.channel));
    words.extend(cfg.kernel_args.iter().cloned());
    words.join(" ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A VM configuration with everything under `dir` (nothing need exist).
    pub(crate) fn config(dir: &Path) -> VmConfig {
        VmConfig {
            id: "a".into(),
            run_dir: dir.into(),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs"),
            kernel_args: vec![],
            vcpus: 1,
            memory_mib: 128,
            channel: AgentChannel::Vsock,
            vsock_uds: dir.join("v"),
            console_log: dir.join("c"),
            log_limits: Default::default(),
            shared_dirs: vec![],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        }
    }

    #[test]
    fn errors_print_their_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        for e in [
            Error::Spawn {
                what: "qemu",
                source: io(),
            },
            Error::Io {
                what: "x".into(),
                source: io(),
            },
        ] {
            vessel_testutil::assert_cause_printed_once(&e);
        }
    }

    #[test]
    fn cmdline_names_channel_and_extra_args_last() {
        let cfg = VmConfig {
            id: "a".into(),
            run_dir: "/r".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            kernel_args: vec!["vessel.debug".into()],
            vcpus: 1,
            memory_mib: 128,
            channel: AgentChannel::Serial,
            vsock_uds: "/r/v".into(),
            console_log: "/r/c".into(),
            log_limits: Default::default(),
            shared_dirs: vec![],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        };
        let k = guest_cmdline(&cfg, &["reboot=t"]);
        assert!(k.starts_with("console=ttyS0 panic=-1"), "{k}");
        assert!(k.contains(" reboot=t "), "{k}");
        assert!(k.ends_with("vessel.channel=serial vessel.debug"), "{k}");
    }

    #[test]
    fn launch_needs_kernel_initramfs_and_sane_size() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("vmlinux"), dir.path().join("initramfs"));
        let mut cfg = config(dir.path());
        assert!(check_vm_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("guest kernel not found"));
        std::fs::write(&k, b"").unwrap();
        assert!(check_vm_config(&cfg)
            .unwrap_err()
            .to_string()
            .contains("guest initramfs not found"));
        std::fs::write(&i, b"").unwrap();
        check_vm_config(&cfg).unwrap();
        cfg.memory_mib = 16;
        assert!(matches!(
            check_vm_config(&cfg),
            Err(Error::InvalidConfig(_))
        ));
    }
}
