//! Containers inside the guest: the registry behind the Agent service.
//!
//! libcontainer (youki) does the OCI work; it runs in a helper child process
//! (see [`helper`]) and keeps its state under `<work>/containers`
//! (`/run/vessel-agent/containers` in the guest). The agent keeps,
//! per container, the processes it started (init and execs) with their stdio
//! and exit status, and the storages it mounted.

pub mod cgroup;
pub mod executor;
pub mod helper;
pub mod resources;
pub mod seccomp;
pub mod spec;
pub mod storage;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcontainer::container::{Container as LcContainer, ContainerStatus};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType};
use tokio::sync::watch;
use vessel_protocol::agent::{StdioConfig, Storage};
use vessel_protocol::id::valid_id;

use crate::reaper::Reaper;
use crate::stdio::{server::ProcessLookup, ChildStdio, ProcessIo};
use helper::{HelperOp, HelperRequest};

/// Numbers the helper runs (names of their console socket and result file).
static NEXT_SPAWN: AtomicU64 = AtomicU64::new(0);

/// How long a forced removal waits for the init process to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a virtio-fs device the host plugged in (it is probed in
/// the background; ~0.3 s under TCG).
const DEVICE_WAIT: Duration = Duration::from_secs(20);
/// Interval between mount attempts while waiting for it.
const DEVICE_POLL: Duration = Duration::from_millis(10);
/// How long `start` waits for the startContainer hooks (and the exec) of a
/// container that has some; a hook still running then is left to run and
/// start succeeds (as runc's start, which does not wait at all). Below the
/// host's 30 s agent call timeout, so that start does not fail on the host.
const START_REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a container operation failed. Each maps to a ttrpc status code.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ContainerError {
    /// invalid id {0:?}: expected [A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 bytes
    InvalidId(String),
    /// bad OCI spec
    Spec(#[from] spec::SpecError),
    /// invalid OCI process JSON
    ProcessJson(#[source] serde_json::Error),
    /// container {0} already exists
    Exists(String),
    /// exec {1} already exists in container {0}
    ExecExists(String, String),
    /// no container {0}
    NotFound(String),
    /// no sandbox container {0} to share namespaces with: create the pod's sandbox container first
    NoSandbox(String),
    /// no process {1:?} in container {0}
    ProcessNotFound(String, String),
    /// storage
    Storage(#[from] storage::StorageError),
    /// container {0}: resources
    Resources(String, #[source] resources::ResourcesError),
    /// {0}
    Failed(String),
    /// container {0}: {1}
    State(String, String),
    /// signal {0} is not a valid signal number
    BadSignal(u32),
    /// process {0} of container {1} has no terminal
    NoTerminal(String, String),
    /// {0}
    Io(String, #[source] std::io::Error),
    /// {0}
    Denied(vessel_protocol::policy::Denied),
}

/// How a process ended, shell style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal.
    pub code: i32,
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

impl ExitStatus {
    fn from_wait(ws: WaitStatus) -> Self {
        match ws {
            WaitStatus::Exited(_, code) => ExitStatus {
                code,
                signal: None,
                core_dumped: false,
            },
            WaitStatus::Signaled(_, sig, core) => ExitStatus {
                code: 128 + sig as i32,
                signal: Some(sig as i32),
                core_dumped: core,
            },
            // The reaper only reports terminations.
            other => {
                log::warn!("unexpected wait status {other:?}");
                ExitStatus {
                    code: 255,
                    signal: None,
                    core_dumped: false,
                }
            }
        }
    }
}

/// A process the agent started in a container.
pub struct Process {
    pub pid: i32,
    pub io: Arc<ProcessIo>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Process {
    /// `kill_rest_of`: the container whose remaining processes die with this
    /// one (the init of a container without its own pid namespace: as
    /// runc's shim does, or its children would keep the stdio pipes, and so
    /// the reported exit, open forever).
    fn new(pid: i32, io: ProcessIo, reaper: &Reaper, kill_rest_of: Option<String>) -> Self {
        let status = reaper.subscribe(pid);
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            if let Ok(ws) = status.await {
                if let Some(id) = kill_rest_of {
                    for pid in cgroup::pids(&id) {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
                let _ = tx.send(Some(ExitStatus::from_wait(ws)));
            }
        });
        Process {
            pid,
            io: Arc::new(io),
            exit,
        }
    }

    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits for the exit and for all output to reach the host.
    pub async fn wait(&self) -> Result<ExitStatus, ContainerError> {
        let mut rx = self.exit.clone();
        let status = rx
            .wait_for(|s| s.is_some())
            .await
            .map_err(|_| ContainerError::Failed("the child reaper stopped".into()))?
            .expect("wait_for returned a Some");
        self.io.drained().await;
        Ok(status)
    }
}

struct Container {
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    storages: Vec<PathBuf>,
    /// Read end of the start report pipe (see [`executor`]), until start.
    start_report: Option<OwnedFd>,
    /// The user namespace's uid mappings (none: no user namespace).
    uid_mappings: Vec<LinuxIdMapping>,
}

/// All containers of this guest.
pub struct Containers {
    reaper: Reaper,
    /// Agent working directory: libcontainer state, bundles, console sockets.
    work: PathBuf,
    map: Mutex<HashMap<String, Container>>,
    /// Ids being created (not in `map` yet), to refuse duplicates.
    creating: Mutex<HashSet<String>>,
    mounts: Mutex<storage::Mounts>,
    oom: Arc<cgroup::OomWatcher>,
    /// Seccomp notification verdicts of each container (escape monitoring).
    monitor: Arc<crate::monitor::Monitor>,
    /// Tripwires over /proc/sysrq-trigger (escape monitoring).
    tripwires: Arc<crate::tripwire::Tripwires>,
    /// Held by `start` and by an exec into a created container, which
    /// shows libcontainer a running one for the time of the exec.
    status_flip: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_id(id: &str) -> Result<(), ContainerError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ContainerError::InvalidId(id.to_string()))
    }
}

impl Containers {
    /// `work` is the agent's directory (`/run/vessel-agent` in the guest).
    pub fn new(
        reaper: Reaper,
        work: PathBuf,
        oom: Arc<cgroup::OomWatcher>,
        monitor: Arc<crate::monitor::Monitor>,
        tripwires: Arc<crate::tripwire::Tripwires>,
    ) -> Self {
        Containers {
            oom,
            monitor,
            tripwires,
            reaper,
            work,
            map: Mutex::new(HashMap::new()),
            creating: Mutex::new(HashSet::new()),
            mounts: Mutex::new(storage::Mounts::default()),
            status_flip: tokio::sync::Mutex::new(()),
        }
    }

    fn state_root(&self) -> PathBuf {
        self.work.join("containers")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.work.join("bundles").join(id)
    }

    /// Mounts the storages, then creates the container; returns the init pid.
    /// With `sandbox`, the container joins that container's ipc, uts and pid
    /// namespaces where its spec names a namespace path (see [`spec::guest_spec`]).
    pub async fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        storages: &[Storage],
        stdio: &StdioConfig,
        sandbox: Option<&str>,
        policy: &vessel_protocol::policy::Policy,
    ) -> Result<i32, ContainerError> {
        check_id(id)?;
        let sandbox_pid = sandbox.map(|s| self.sandbox_pid(s)).transpose()?;
        let spec::GuestSpec {
            mut spec,
            net_sysctls,
            start_hooks,
        } = spec::guest_spec(spec_json, id, sandbox_pid)?;
        let verdicts = crate::monitor::prepare(&mut spec, &self.work.join(crate::monitor::SOCKET));
        {
            let map = lock(&self.map);
            let mut creating = lock(&self.creating);
            if map.contains_key(id) || creating.contains(id) {
                return Err(ContainerError::Exists(id.to_string()));
            }
            // Under the lock that registers it: concurrent creates cannot all pass.
            policy
                .check_container_count(map.len() + creating.len())
                .map_err(ContainerError::Denied)?;
            creating.insert(id.to_string());
        }
        for (key, value) in &net_sysctls {
            if let Err(e) = spec::write_sysctl(key, value) {
                lock(&self.creating).remove(id);
                return Err(ContainerError::Failed(format!(
                    "set sysctl {key}={value} in the VM's network namespace: {e}"
                )));
            }
        }
        // After the duplicate check: a tripwire is per container id. If it
        // cannot be armed, the spec keeps its own protection of the file.
        if let Err(e) = self.tripwires.arm(id, &mut spec) {
            log::warn!(
                "container {id}: no tripwire over {}: {e}",
                crate::tripwire::TARGET
            );
        }
        let mut mounted = Vec::new();
        let uid_map = uid_mappings(&spec);
        // Before creation: libcontainer hands over the notify fd during it.
        self.monitor.register(id, verdicts);
        let res = self
            .create_inner(id, &spec, start_hooks, storages, stdio, &mut mounted)
            .await;
        lock(&self.creating).remove(id);
        match res {
            Ok((process, start_report)) => {
                let pid = process.pid;
                lock(&self.map).insert(
                    id.to_string(),
                    Container {
                        init: Arc::new(process),
                        execs: HashMap::new(),
                        storages: mounted,
                        start_report,
                        uid_mappings: uid_map,
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                let mut mounts = lock(&self.mounts);
                for m in mounted.iter().rev() {
                    mounts.release(m);
                }
                drop(mounts);
                let _ = std::fs::remove_dir_all(self.bundle(id));
                let _ = std::fs::remove_dir_all(self.state_root().join(id));
                let _ = std::fs::remove_dir(cgroup::dir(id));
                self.monitor.forget(id);
                self.tripwires.disarm(id);
                Err(e)
            }
        }
    }

    /// Mounts `s` (see [`storage::Mounts::acquire`]). A virtio-fs tag that is
    /// not there yet (`EINVAL`) is waited for, up to [`DEVICE_WAIT`]: in a VM
    /// restored from a template the host plugs the share's device in just
    /// before the first container, and the guest probes it in the background.
    async fn acquire_storage(&self, s: &Storage) -> Result<PathBuf, ContainerError> {
        let start = std::time::Instant::now();
        loop {
            match lock(&self.mounts).acquire(s) {
                Err(storage::StorageError::Mount {
                    ref fstype, err, ..
                }) if fstype == "virtiofs"
                    && err == nix::errno::Errno::EINVAL
                    && start.elapsed() < DEVICE_WAIT => {}
                other => {
                    if start.elapsed() > DEVICE_POLL {
                        log::info!("virtio-fs {:?} waited for {:?}", s.source, start.elapsed());
                    }
                    return Ok(other?);
                }
            }
            tokio::time::sleep(DEVICE_POLL).await;
        }
    }

    /// Returns init and, with startContainer hooks, the read end of the
    /// pipe their failure is reported on.
    async fn create_inner(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        start_hooks: Vec<oci_spec::runtime::Hook>,
        storages: &[Storage],
        stdio: &StdioConfig,
        mounted: &mut Vec<PathBuf>,
    ) -> Result<(Process, Option<OwnedFd>), ContainerError> {
        for s in storages {
            let target = self.acquire_storage(s).await?;
            mounted.push(target);
        }
        let bundle = self.bundle(id);
        let io_err = |what: &str| {
            let what = format!("{what} for container {id}");
            move |e| ContainerError::Io(what, e)
        };
        std::fs::create_dir_all(&bundle).map_err(io_err("create bundle dir"))?;
        let json = serde_json::to_vec(spec)
            .map_err(|e| ContainerError::Failed(format!("encode config.json: {e}")))?;
        std::fs::write(bundle.join("config.json"), json).map_err(io_err("write config.json"))?;
        let process = spec.process().as_ref().ok_or(spec::SpecError::NoProcess)?;
        let tty = Tty::of(process, &uid_mappings(spec));
        let own_pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.typ() == LinuxNamespaceType::Pid && n.path().is_none())
            });
        let (report_rd, report_wr) = if start_hooks.is_empty() {
            (None, None)
        } else {
            let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| io_err("create the start report pipe")(e.into()))?;
            (Some(rd), Some(wr))
        };
        let op = HelperOp::Create {
            bundle,
            start_hooks,
        };
        let process = self
            .spawn(
                id,
                op,
                "init",
                tty,
                stdio,
                (!own_pid_ns).then(|| id.to_string()),
                report_wr,
            )
            .await?;
        if spec::dev_read_only(spec) {
            // libcontainer mounts /dev writable whatever its options say
            // (it must create the device nodes); runc remounts it read-only
            // at the end, before the process runs. So does this, in init's
            // mount namespace while init waits for start.
            let op = HelperOp::RemountReadOnly {
                pid: process.pid,
                path: "/dev".into(),
            };
            if let Err(e) = self.helper(id, op).await {
                let _ = kill(Pid::from_raw(process.pid), Signal::SIGKILL);
                return Err(ContainerError::Failed(format!("read-only /dev: {e}")));
            }
        }
        Ok((process, report_rd))
    }

    /// Runs a helper operation that starts no process.
    async fn helper(&self, id: &str, op: HelperOp) -> Result<i32, String> {
        let n = NEXT_SPAWN.fetch_add(1, Ordering::Relaxed);
        let req = HelperRequest {
            root: self.state_root(),
            container_id: id.to_string(),
            op,
            console_socket: None,
            result: self.work.join("console").join(format!("{n}.result")),
            log: (std::process::id() == 1).then(|| "/dev/console".into()),
            debug: log::max_level() >= log::LevelFilter::Debug,
            report: false,
        };
        helper::run(&self.reaper, &req, ChildStdio::default(), None).await
    }

    /// Runs the helper and wires the new process's stdio (`tty`: a terminal).
    /// `report`: the write end of a start report pipe for the helper (closed
    /// here once the helper has run).
    #[allow(clippy::too_many_arguments)]
    async fn spawn(
        &self,
        id: &str,
        op: HelperOp,
        name: &str,
        tty: Option<Tty>,
        stdio: &StdioConfig,
        kill_rest_of: Option<String>,
        report: Option<OwnedFd>,
    ) -> Result<Process, ContainerError> {
        let io_err = |what: String| move |e| ContainerError::Io(what, e);
        let console_dir = self.work.join("console");
        std::fs::create_dir_all(&console_dir)
            .map_err(io_err(format!("create {}", console_dir.display())))?;
        // Short names: a Unix socket path has at most 107 bytes, ids up to 128.
        let n = NEXT_SPAWN.fetch_add(1, Ordering::Relaxed);
        let console_path = console_dir.join(format!("{n}.sock"));
        let result = console_dir.join(format!("{n}.result"));
        log::debug!("spawn {n}: {name} of container {id}");
        let (io, child, console) = if tty.is_some() {
            helper::remove_quietly(&console_path);
            let listener = tokio::net::UnixListener::bind(&console_path)
                .map_err(io_err(format!("bind {}", console_path.display())))?;
            (None, ChildStdio::default(), Some(listener))
        } else {
            let (io, child) = ProcessIo::pipes(stdio.stdin, stdio.stdout, stdio.stderr)
                .map_err(io_err("create stdio pipes".into()))?;
            (Some(io), child, None)
        };
        let req = HelperRequest {
            root: self.state_root(),
            container_id: id.to_string(),
            op,
            console_socket: console.as_ref().map(|_| console_path.clone()),
            result,
            // PID 1's console is the guest console the host captures.
            log: (std::process::id() == 1).then(|| "/dev/console".into()),
            debug: log::max_level() >= log::LevelFilter::Debug,
            report: report.is_some(),
        };
        let pid = helper::run(&self.reaper, &req, child, report.as_ref()).await;
        drop(report);
        let io = match (pid.is_ok(), io, console) {
            (_, Some(io), _) => Ok(io),
            (true, None, Some(listener)) => {
                helper::receive_console(&listener).await.and_then(|master| {
                    if let Some(t) = &tty {
                        t.apply(&master);
                    }
                    ProcessIo::tty(master).map_err(|e| format!("pty master: {e}"))
                })
            }
            _ => Err(String::new()),
        };
        helper::remove_quietly(&console_path);
        let pid = pid.map_err(ContainerError::Failed)?;
        let io = io.map_err(|e| {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            ContainerError::Failed(e)
        })?;
        Ok(Process::new(pid, io, &self.reaper, kill_rest_of))
    }

    /// Starts a created container. With startContainer hooks, waits until
    /// they ran: a failed one fails the start with its reason, as with runc.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let _flip = self.status_flip.lock().await;
        self.init(id)?;
        let report = lock(&self.map)
            .get_mut(id)
            .and_then(|c| c.start_report.take());
        self.libcontainer(id, |c| c.start()).await?;
        let Some(report) = report else {
            return Ok(());
        };
        let read = tokio::task::spawn_blocking(move || read_report(report, START_REPORT_TIMEOUT));
        match read.await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(msg))) => Err(ContainerError::Failed(msg)),
            Ok(Err(e)) => {
                log::warn!("container {id}: start report: {e}");
                Ok(())
            }
            Err(e) => Err(ContainerError::Failed(format!("start report task: {e}"))),
        }
    }

    /// Sets libcontainer's recorded status of container `id`.
    async fn set_status(&self, id: &str, status: ContainerStatus) -> Result<(), ContainerError> {
        self.libcontainer(id, move |c| {
            c.set_status(status);
            c.save()
        })
        .await
    }

    /// Runs `process_json` in the container; returns its pid.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &StdioConfig,
    ) -> Result<i32, ContainerError> {
        check_id(exec_id)?;
        let mut process: oci_spec::runtime::Process =
            serde_json::from_slice(process_json).map_err(ContainerError::ProcessJson)?;
        spec::guest_process(&mut process);
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(spec::SpecError::NoArgs.into());
        }
        let (uid_map, init_pid) = {
            let map = lock(&self.map);
            let c = map
                .get(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            if c.execs.contains_key(exec_id) {
                return Err(ContainerError::ExecExists(id.into(), exec_id.into()));
            }
            if c.init.exited().is_some() {
                return Err(ContainerError::State(
                    id.into(),
                    "container is stopped; exec needs a running container".into(),
                ));
            }
            (c.uid_mappings.clone(), c.init.pid)
        };
        let path = self.bundle(id).join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process).map_err(ContainerError::ProcessJson)?;
        std::fs::write(&path, json)
            .map_err(|e| ContainerError::Io(format!("write {}", path.display()), e))?;
        let op = HelperOp::Exec {
            process_json: path.clone(),
            init_pid,
        };
        // runc execs into a created container (its init waits for start in
        // its namespaces); libcontainer's tenant builder insists on a
        // running one, so it is shown one until the exec has started.
        let flip = self.status_flip.lock().await;
        let created = matches!(self.state(id).await, Ok((ContainerStatus::Created, _)));
        if !created {
            drop(flip);
        } else if let Err(e) = self.set_status(id, ContainerStatus::Running).await {
            helper::remove_quietly(&path);
            return Err(e);
        }
        let res = self
            .spawn(
                id,
                op,
                &format!("exec-{exec_id}"),
                Tty::of(&process, &uid_map),
                stdio,
                None,
                None,
            )
            .await;
        if created {
            if let Err(e) = self.set_status(id, ContainerStatus::Created).await {
                log::error!("container {id}: restoring its created status: {e}");
            }
        }
        helper::remove_quietly(&path);
        let process = res?;
        let pid = process.pid;
        let mut map = lock(&self.map);
        match map.get_mut(id) {
            Some(c) => {
                c.execs.insert(exec_id.to_string(), Arc::new(process));
                Ok(pid)
            }
            None => {
                // Removed while the exec was being set up.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                Err(ContainerError::NotFound(id.to_string()))
            }
        }
    }

    /// Guest pid of the running init process of sandbox container `id`.
    /// (Its pid cannot be reused before the reaper collected it, which is
    /// when `exited` turns Some.)
    fn sandbox_pid(&self, id: &str) -> Result<i32, ContainerError> {
        check_id(id)?;
        let init = match self.init(id) {
            Err(ContainerError::NotFound(_)) => {
                return Err(ContainerError::NoSandbox(id.to_string()))
            }
            other => other?,
        };
        if init.exited().is_some() {
            return Err(ContainerError::State(
                id.into(),
                "the sandbox container has stopped; its namespaces are gone".into(),
            ));
        }
        Ok(init.pid)
    }

    fn init(&self, id: &str) -> Result<Arc<Process>, ContainerError> {
        self.process(id, None)
    }

    /// The process `exec_id` (None or "" = init) of container `id`.
    pub fn process(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<Process>, ContainerError> {
        let map = lock(&self.map);
        let c = map
            .get(id)
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
        match exec_id.filter(|e| !e.is_empty()) {
            None => Ok(c.init.clone()),
            Some(e) => c
                .execs
                .get(e)
                .cloned()
                .ok_or_else(|| ContainerError::ProcessNotFound(id.into(), e.into())),
        }
    }

    /// Signals one process, or with `all` every process of the container.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::BadSignal(signal))?;
        let process = self.process(id, Some(exec_id))?;
        if all {
            for pid in cgroup::pids(id) {
                let _ = kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        if process.exited().is_some() {
            return Err(ContainerError::State(
                id.into(),
                format!("process {exec_id:?} already exited"),
            ));
        }
        kill(Pid::from_raw(process.pid), sig).map_err(|e| {
            ContainerError::State(
                id.into(),
                format!("signal {sig} to pid {}: {e}", process.pid),
            )
        })
    }

    /// Deletes the container; with `force` kills its processes first.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), ContainerError> {
        let init = self.init(id)?;
        if init.exited().is_none() {
            // Like runc, a created but never started container is deleted
            // without --force.
            let created = matches!(
                self.state(id).await,
                Ok((ContainerStatus::Created | ContainerStatus::Creating, _))
            );
            if !force && !created {
                return Err(ContainerError::State(
                    id.into(),
                    "container is running; stop it first or remove with force".into(),
                ));
            }
            for pid in cgroup::pids(id).into_iter().chain([init.pid as u32]) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let mut rx = init.exit.clone();
            let _ = tokio::time::timeout(KILL_TIMEOUT, rx.wait_for(|s| s.is_some())).await;
        }
        // Last look at memory.events before the cgroup goes away.
        self.oom.check(id);
        if let Err(e) = self.libcontainer(id, |c| c.delete(true)).await {
            log::warn!("libcontainer delete {id}: {e}");
        }
        let _ = std::fs::remove_dir_all(self.state_root().join(id));
        let _ = std::fs::remove_dir(cgroup::dir(id));
        let _ = std::fs::remove_dir_all(self.bundle(id));
        self.oom.forget(id);
        self.monitor.forget(id);
        self.tripwires.disarm(id);
        if let Some(c) = lock(&self.map).remove(id) {
            let mut mounts = lock(&self.mounts);
            for m in c.storages.iter().rev() {
                mounts.release(m);
            }
        }
        Ok(())
    }

    /// Applies OCI `linux.resources` JSON to a live container's cgroup.
    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let init = self.init(id)?;
        if init.exited().is_some() {
            return Err(ContainerError::State(
                id.into(),
                "container is stopped; only a live container's limits can be updated".into(),
            ));
        }
        let err = |e| ContainerError::Resources(id.to_string(), e);
        let dir = cgroup::dir(id);
        let cpu_max = std::fs::read_to_string(dir.join("cpu.max")).ok();
        let writes = resources::parse(resources_json)
            .and_then(|r| resources::plan(&r, cpu_max.as_deref()))
            .map_err(err)?;
        log::info!("container {id}: update {writes:?}");
        resources::apply(&dir, &writes).map_err(err)
    }

    pub async fn pause(&self, id: &str) -> Result<(), ContainerError> {
        self.init(id)?;
        self.libcontainer(id, |c| c.pause()).await
    }

    pub async fn resume(&self, id: &str) -> Result<(), ContainerError> {
        self.init(id)?;
        self.libcontainer(id, |c| c.resume()).await
    }

    /// Status and init pid as libcontainer sees them.
    pub async fn state(&self, id: &str) -> Result<(ContainerStatus, i32), ContainerError> {
        self.init(id)?;
        let root = self.state_root().join(id);
        tokio::task::spawn_blocking(move || {
            let mut c = LcContainer::load(root)?;
            c.refresh_status()?;
            Ok((c.status(), c.pid().map_or(0, |p| p.as_raw())))
        })
        .await
        .map_err(|e| ContainerError::Failed(format!("state task: {e}")))?
        .map_err(|e: libcontainer::error::LibcontainerError| {
            ContainerError::State(id.into(), e.to_string())
        })
    }

    /// Runs a libcontainer operation on the container's saved state.
    async fn libcontainer<F>(&self, id: &str, op: F) -> Result<(), ContainerError>
    where
        F: FnOnce(&mut LcContainer) -> Result<(), libcontainer::error::LibcontainerError>
            + Send
            + 'static,
    {
        let root = self.state_root().join(id);
        tokio::task::spawn_blocking(move || {
            let mut c = LcContainer::load(root)?;
            op(&mut c)
        })
        .await
        .map_err(|e| ContainerError::Failed(format!("libcontainer task: {e}")))?
        .map_err(|e| ContainerError::State(id.into(), e.to_string()))
    }

    /// Containers that exist or are being created (for the policy's
    /// `max_containers`; [`Containers::create`] checks it again under its lock).
    pub fn count(&self) -> usize {
        lock(&self.map).len() + lock(&self.creating).len()
    }

    pub fn ids(&self) -> Vec<String> {
        lock(&self.map).keys().cloned().collect()
    }
}

impl ProcessLookup for Containers {
    fn process_io(&self, id: &str, exec_id: Option<&str>) -> Result<Arc<ProcessIo>, String> {
        self.process(id, exec_id)
            .map(|p| p.io.clone())
            .map_err(|e| e.to_string())
    }
}

impl cgroup::Watched for Containers {
    fn container_ids(&self) -> Vec<String> {
        self.ids()
    }
}

/// Reads a start report pipe until end of file (the payload runs, or init
/// died) or `timeout`: the hook's error, if one was written.
fn read_report(fd: OwnedFd, timeout: Duration) -> std::io::Result<Option<String>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    let mut file = std::fs::File::from(fd);
    let mut msg = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the startContainer hooks still run after {timeout:?}"),
            ));
        }
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, ms)? == 0 {
            continue;
        }
        let mut buf = [0u8; 1024];
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if msg.len() < executor::REPORT_CAP {
            msg.extend_from_slice(&buf[..n]);
        }
    }
    msg.truncate(executor::REPORT_CAP);
    Ok((!msg.is_empty()).then(|| String::from_utf8_lossy(&msg).into_owned()))
}

/// A terminal process's pty settings.
struct Tty {
    size: Option<(u64, u64)>,
    /// The process's user, who gets the slave (as with runc).
    uid: u32,
}

impl Tty {
    /// `uid_mappings`: the container's user namespace's, through which the
    /// process's uid is the agent's (runc hands it over inside the namespace).
    fn of(p: &oci_spec::runtime::Process, uid_mappings: &[LinuxIdMapping]) -> Option<Tty> {
        p.terminal().unwrap_or(false).then(|| Tty {
            size: p.console_size().map(|s| (s.height(), s.width())),
            uid: outside_id(p.user().uid(), uid_mappings),
        })
    }

    fn apply(&self, master: &OwnedFd) {
        if let Some((rows, cols)) = self.size {
            let _ = set_winsize(master, rows as u16, cols as u16);
        }
        if let Err(e) = chown_slave(master, self.uid) {
            log::warn!("pty owner {}: {e}", self.uid);
        }
    }
}

/// The uid mappings of a spec's user namespace (empty without one).
fn uid_mappings(spec: &oci_spec::runtime::Spec) -> Vec<LinuxIdMapping> {
    let Some(linux) = spec.linux().as_ref() else {
        return Vec::new();
    };
    let user_ns = linux
        .namespaces()
        .as_ref()
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if !user_ns {
        return Vec::new();
    }
    linux.uid_mappings().clone().unwrap_or_default()
}

/// `id` inside a user namespace with `mappings`, as the agent sees it (the
/// same id without mappings or when none covers it).
fn outside_id(id: u32, mappings: &[LinuxIdMapping]) -> u32 {
    mappings
        .iter()
        .find(|m| id >= m.container_id() && id - m.container_id() < m.size())
        .and_then(|m| m.host_id().checked_add(id - m.container_id()))
        .unwrap_or(id)
}

/// Hands the slave of the pty `master` to `uid`, keeping its group (the
/// devpts `gid=5`, tty), as runc's fixStdioPermissions does. TIOCGPTPEER
/// opens the slave from the master, whichever devpts instance it is in.
fn chown_slave(master: &OwnedFd, uid: u32) -> nix::Result<()> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER on a pty master we own: returns a new fd or -1.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the ioctl just returned this fd to us alone.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    nix::unistd::fchown(
        slave.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        None,
    )
}

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

/// Sets the window size of a pty (master or slave).
pub fn set_winsize(fd: &impl std::os::fd::AsRawFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for
    // the call; a non-tty fd just makes the ioctl fail with ENOTTY.
    unsafe { tiocswinsz(fd.as_raw_fd(), &ws) }.map(drop)
}

/// Ensures the agent's working directory exists.
pub fn prepare_work_dir(work: &Path) -> std::io::Result<()> {
    for d in ["containers", "bundles", "console"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_out_of_a_user_namespace() {
        let maps: Vec<LinuxIdMapping> = serde_json::from_str(
            r#"[{"containerID": 0, "hostID": 100000, "size": 65536},
                {"containerID": 70000, "hostID": 4294967290, "size": 100}]"#,
        )
        .unwrap();
        assert_eq!(outside_id(1000, &maps), 101000);
        assert_eq!(outside_id(0, &maps), 100000);
        assert_eq!(outside_id(65536, &maps), 65536);
        assert_eq!(outside_id(70001, &maps), 4294967291);
        // Past u32: left as is.
        assert_eq!(outside_id(70010, &maps), 70010);
        assert_eq!(outside_id(1000, &[]), 1000);
    }
}
