//! Fault injection (issue 14 item 3), with real parts: containerd 1.6 with the shim, CRI
//! pods on Debian's CNI bridge plugin, the `vessel` CLI, and QEMU/TCG guests here.
//!
//! Each injection starts a sandbox, brings it to a random point of its lifecycle (CRI:
//! pod up with no container, a container running, an ExecSync in flight; CLI: created,
//! started, an exec in flight), then injects one fault:
//!
//! - SIGKILL of the VMM, of virtiofsd, of the vsock backend (vhost-device-vsock) or of
//!   the pod's shim (CRI);
//! - SIGKILL of the per-sandbox supervisor (the CLI's `vessel supervise`);
//! - the agent's death inside the guest (CLI): PID 1 ignores SIGKILL from its own PID
//!   namespace and the guest kernel's SysRq spares it, so a container in the VM's PID
//!   namespace with CAP_SYS_PTRACE makes it exit_group(9) (tests/support/kill-agent.c);
//! - a containerd restart (SIGKILL, then started again) under a running pod (CRI).
//!
//! Then it checks that the caller is told (CRI: the container EXITED with a non-zero
//! code, or the pod NOTREADY, within 5 s; CLI: `vessel state` says stopped within 5 s; an
//! exec in flight fails instead of hanging; after the agent's exit, `vessel events` shows
//! an `agent_exited` security event within 5 s), that the sandbox's host processes are
//! gone within 5 s, or, after a containerd restart, that the pod and its container are still
//! running and exec works (the shim was reconnected); and that once the caller removes
//! the sandbox, nothing is left within 5 s (processes, mounts, links, cgroups, sockets,
//! state; memory is the soak's measure).
//!
//! `make faults` runs [`faults`]: 100 injections (`FAULTS`), kinds and points drawn from
//! `FAULTS_SEED` (printed); `make test` runs [`faults_ci`]: each kind once.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cri::*;
use common::leaks::{HostState, Scope};
use common::processes_mentioning;
use common::workload::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Vmm,
    Virtiofsd,
    VsockBackend,
    Supervisor,
    Shim,
    Agent,
    ContainerdRestart,
}

const FAULTS: [Fault; 7] = [
    Fault::Vmm,
    Fault::Virtiofsd,
    Fault::VsockBackend,
    Fault::Supervisor,
    Fault::Shim,
    Fault::Agent,
    Fault::ContainerdRestart,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Vmm => "SIGKILL VMM",
            Fault::Virtiofsd => "SIGKILL virtiofsd",
            Fault::VsockBackend => "SIGKILL vsock backend",
            Fault::Supervisor => "SIGKILL supervisor",
            Fault::Shim => "SIGKILL shim",
            Fault::Agent => "agent exits (guest)",
            Fault::ContainerdRestart => "containerd restart",
        }
    }
}

/// The faults the configured backend has a process for: the built-in VMM has no vsock
/// back end process (its vsock device is in the VMM).
fn applicable() -> Vec<Fault> {
    let builtin =
        vessel_testutil::TestHypervisor::from_env() == vessel_testutil::TestHypervisor::Builtin;
    FAULTS
        .into_iter()
        .filter(|f| !(builtin && *f == Fault::VsockBackend))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// CRI: the pod is up, no container yet; CLI: created, not started.
    Ready,
    Running,
    /// An exec is in flight.
    Exec,
}

const POINTS: [Point; 3] = [Point::Ready, Point::Running, Point::Exec];

/// What an injection ended with: problems with what the caller was told, and leaks.
#[derive(Default)]
struct Outcome {
    problems: Vec<String>,
    leaks: Vec<String>,
}

/// How long the caller may wait to be told, and the host to be clean.
const T: Duration = Duration::from_secs(5);

/// A seeded xorshift64: the same seed replays the same injections.
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn observe(rig: &Rig) -> HostState {
    // containerd's descriptors are the soak's business: a restart replaces it here.
    let scope = Scope {
        long_lived: Vec::new(),
        ..rig.scope(&[])
    };
    // Host memory is the soak's measure too: over one injection, other work on the host
    // moves MemAvailable more than a sandbox's leak would.
    HostState {
        mem_available_kib: 0,
        ..HostState::take(&scope, &rig.ids)
    }
}

/// Leaks against `base`, waited for up to [`T`].
fn leaks_after(rig: &Rig, base: &HostState) -> Vec<String> {
    let mut leaks = Vec::new();
    common::wait_until(T, || {
        leaks = observe(rig).leaks(base);
        leaks.is_empty()
    });
    leaks
}

fn sigkill(pid: u32) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// Processes at or below `pid` whose comm starts with `prefix`.
fn below(pid: u32, prefix: &str) -> Vec<u32> {
    vessel_testutil::self_and_descendants(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim().starts_with(prefix))
        })
        .collect()
}

/// The sandbox processes (VMM, virtiofsd, vsock backend) of the rig still running.
fn vm_processes(rig: &Rig, under: &std::path::Path) -> Vec<String> {
    let shims: Vec<String> = shims(&rig.c)
        .iter()
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect();
    processes_mentioning(&under.display().to_string())
        .into_iter()
        .filter(|l| !shims.contains(&l.split(':').next().unwrap_or("").to_string()))
        .filter(|l| !l.contains(" supervise ") && !l.contains("containerd "))
        .collect()
}

async fn pod_state(rt: &mut Runtime, pod: &str) -> i32 {
    rt.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: pod.into(),
        verbose: false,
    })
    .await
    .map(|r| r.into_inner().status.map(|s| s.state).unwrap_or(-1))
    .unwrap_or(-1)
}

/// Polls `cond` (async) for up to `timeout`.
async fn poll<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fault injected into a CRI pod.
async fn cri_fault(rig: &mut Rig, fault: Fault, point: Point, n: u32, rng: &mut Rng) -> Outcome {
    let mut out = Outcome::default();
    let base = observe(rig);
    let cfg = rig.pod_config(&format!("f{n}"));
    let pod = match rig
        .rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: "vessel".into(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => {
            out.problems.push(format!("RunPodSandbox: {}", e.message()));
            return out;
        }
    };
    rig.ids.insert(pod.clone());
    let mut container = None;
    if point != Point::Ready {
        match create_start(
            &mut rig.rt,
            &pod,
            &cfg,
            container_config("a", &["sleep", "100000"]),
        )
        .await
        {
            Ok(id) => container = Some(id),
            Err(e) => out.problems.push(e),
        }
    }
    let exec = match (&container, point) {
        (Some(id), Point::Exec) => {
            let (mut rt, id) = (rig.rt.clone(), id.clone());
            let t = tokio::spawn(async move {
                exec_sync(&mut rt, &id, &["sh", "-c", "echo begun; sleep 20"]).await
            });
            // A random moment of the exec: before the guest got it, or while it runs.
            tokio::time::sleep(Duration::from_millis(rng.next(800) as u64)).await;
            Some(t)
        }
        _ => None,
    };
    let shim = shims(&rig.c)
        .first()
        .and_then(|l| l.split(':').next()?.parse::<u32>().ok());
    let Some(shim) = shim else {
        out.problems.push("no shim for the pod".into());
        return out;
    };
    let victims = match fault {
        Fault::Vmm => {
            let mut v = below(shim, "qemu-system");
            v.extend(below(shim, "vessel-vmm"));
            v
        }
        Fault::Virtiofsd => below(shim, "virtiofsd"),
        Fault::VsockBackend => below(shim, "vhost-device-vs"),
        Fault::Shim => vec![shim],
        Fault::ContainerdRestart => vec![rig.containerd_pid()],
        Fault::Supervisor | Fault::Agent => unreachable!("CLI faults"),
    };
    if victims.is_empty() {
        out.problems
            .push(format!("nothing to inject {} into", fault.name()));
    }
    for v in &victims {
        sigkill(*v);
    }
    if fault == Fault::ContainerdRestart {
        // containerd comes back on the same state; the pod must still be running.
        common::wait_until(T, || !vessel_testutil::pid_alive(victims[0]));
        let o = Command::new(vessel_testutil::repo().join("tests/support/containerd-harness.sh"))
            .arg("start")
            .arg(rig.c.dir.path().join("c"))
            .env("VESSEL_CONFIG", rig.c.dir.path().join("vessel.toml"))
            .env(
                "VESSEL_SHIM_DIR",
                PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-vessel-v2"))
                    .parent()
                    .unwrap(),
            )
            .env("VESSEL_IMAGE_DIR", vessel_testutil::image_dir())
            .output()
            .unwrap();
        if !o.status.success() {
            out.problems
                .push(format!("containerd did not restart: {}", text(&o)));
            return out;
        }
        rig.rt = connect(&rig.c.sock).await;
        let mut rt = rig.rt.clone();
        let ready = poll(Duration::from_secs(30), || {
            let (mut rt, pod) = (rt.clone(), pod.clone());
            async move { pod_state(&mut rt, &pod).await == PodSandboxState::SandboxReady as i32 }
        })
        .await;
        if !ready {
            out.problems
                .push("pod not READY after containerd restarted".into());
        }
        if let Some(id) = &container {
            let s = status(&mut rt, id).await;
            if s.state != ContainerState::ContainerRunning as i32 {
                out.problems
                    .push(format!("container not running after the restart: {s:?}"));
            }
            match exec_sync(&mut rt, id, &["echo", "after-restart"]).await {
                Ok(o) if o == b"after-restart\n" => {}
                r => out
                    .problems
                    .push(format!("exec after containerd restarted: {r:?}")),
            }
        }
        if let Some(t) = exec {
            // An exec through the old containerd fails or finishes; it must not hang.
            if tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .is_err()
            {
                out.problems
                    .push("an exec in flight hung over the restart".into());
            }
        }
    } else {
        let mut rt = rig.rt.clone();
        if let Some(id) = &container {
            let s = wait_exited(&mut rt, id, T).await;
            if s.state != ContainerState::ContainerExited as i32 || s.exit_code == 0 {
                out.problems.push(format!(
                    "container not EXITED with an error code within 5 s: state {} exit {}",
                    s.state, s.exit_code
                ));
            }
        } else {
            let notready =
                poll(T, || {
                    let (mut rt, pod) = (rt.clone(), pod.clone());
                    async move {
                        pod_state(&mut rt, &pod).await == PodSandboxState::SandboxNotready as i32
                    }
                })
                .await;
            if !notready {
                out.problems.push("pod not NOTREADY within 5 s".into());
            }
        }
        if let Some(t) = exec {
            match tokio::time::timeout(Duration::from_secs(10), t).await {
                Err(_) => out.problems.push("the exec in flight hung".into()),
                Ok(Ok(Ok(o))) => out.problems.push(format!(
                    "the exec in flight succeeded: {:?}",
                    String::from_utf8_lossy(&o)
                )),
                Ok(_) => {}
            }
        }
        let sandbox = rig.c.state_root.clone();
        if !common::wait_until(T, || vm_processes(rig, &sandbox).is_empty()) {
            out.problems.push(format!(
                "sandbox processes still running 5 s after the fault: {:?}",
                vm_processes(rig, &sandbox)
            ));
        }
    }
    if let Err(e) = remove_pod(&mut rig.rt, &pod).await {
        out.problems.push(e);
    }
    out.leaks = leaks_after(rig, &base);
    out
}

async fn remove_pod(rt: &mut Runtime, pod: &str) -> Step {
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .map_err(|e| format!("StopPodSandbox after the fault: {}", e.message()))?;
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .map_err(|e| format!("RemovePodSandbox after the fault: {}", e.message()))?;
    Ok(())
}

/// The bundle whose container may kill the agent: the VM's PID namespace,
/// CAP_SYS_PTRACE, a seccomp profile that allows ptrace itself, and
/// tests/support/kill-agent.c built static into /bin.
fn agent_killer_bundle(rig: &Rig) -> PathBuf {
    let b = rig.bundle("agentkill", &["sleep", "100000"]);
    let bin = b.join("rootfs/bin/kill-agent");
    if !bin.exists() {
        let o = Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&bin)
            .arg(vessel_testutil::repo().join("tests/support/kill-agent.c"))
            .output()
            .unwrap();
        assert!(o.status.success(), "gcc kill-agent.c: {}", text(&o));
        let p = b.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push("CAP_SYS_PTRACE".into());
        }
        // A profile with its own ptrace rule: the agent's escape monitor then adds none
        // (its rule would deny ptrace of the agent, also for exec'd processes).
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_LOG"}],
        });
        std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    }
    b
}

/// A fault injected into a container of the `vessel` CLI.
fn cli_fault(rig: &mut Rig, fault: Fault, point: Point, n: u32, rng: &mut Rng) -> Outcome {
    let mut out = Outcome::default();
    let base = observe(rig);
    let id = format!("f{n}");
    // The agent is killed from a running container.
    let point = if fault == Fault::Agent && point == Point::Ready {
        Point::Running
    } else {
        point
    };
    let created = if fault == Fault::Agent {
        let b = agent_killer_bundle(rig);
        rig.cli_create_from(&id, &b)
    } else {
        rig.cli_create(&id)
    };
    if let Err(e) = created {
        out.problems.push(e);
        rig.cli_force_delete(&id);
        out.leaks = leaks_after(rig, &base);
        return out;
    }
    if point != Point::Ready {
        let o = rig.vessel(&["start", &id]).output().unwrap();
        if !o.status.success() {
            out.problems.push(format!("start: {}", text(&o)));
        }
    }
    let exec = (point == Point::Exec).then(|| {
        let child = rig
            .vessel(&["exec", &id, "sh", "-c", "echo begun; sleep 20"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.next(800) as u64));
        child
    });
    // The VM's run directory (the container's state names it).
    let vm_dir = std::fs::read(rig.cli_root.join(&id).join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["vm_dir"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| rig.cli_root.join(&id));
    // The VM's console, held open: the sandbox's run directory goes with the VM.
    let consoles = consoles(&vm_dir);
    match fault {
        Fault::Supervisor => {
            let o = rig.vessel(&["state", &id]).output().unwrap();
            let pid = serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .ok()
                .and_then(|v| v["pid"].as_u64());
            match pid {
                Some(pid) => sigkill(pid as u32),
                None => out
                    .problems
                    .push(format!("no supervisor pid: {}", text(&o))),
            }
        }
        Fault::Agent => {
            let o = rig
                .vessel(&["exec", &id, "/bin/kill-agent"])
                .output()
                .unwrap();
            // The exec itself may or may not report back before the VM ends.
            eprintln!("kill-agent: {}", text(&o));
        }
        _ => unreachable!("CRI faults"),
    }
    if fault == Fault::Agent {
        // The guest kernel says why the VM ended: its init, the agent, exited.
        let mut console = String::new();
        common::wait_until(T, || {
            console = read_all(&consoles);
            console.contains(AGENT_EXIT_PANIC)
        });
        if !console.contains(AGENT_EXIT_PANIC) {
            out.problems.push(format!(
                "the guest console does not show the agent's exit: {}",
                &console[console.len().saturating_sub(2000)..]
            ));
        }
    }
    if !common::wait_until(T, || rig.cli_status(&id) == "stopped") {
        out.problems.push(format!(
            "`vessel state` says {} 5 s after the fault, not stopped",
            rig.cli_status(&id)
        ));
    }
    if let Some(child) = exec {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Err(_) => out.problems.push("the exec in flight hung".into()),
            Ok(Ok(o)) if o.status.success() => out
                .problems
                .push(format!("the exec in flight succeeded: {}", text(&o))),
            Ok(_) => {}
        }
    }
    if !common::wait_until(T, || vm_processes(rig, &vm_dir).is_empty()) {
        out.problems.push(format!(
            "sandbox processes still running 5 s after the fault: {:?}",
            vm_processes(rig, &vm_dir)
        ));
    }
    if fault == Fault::Agent {
        // The host read the agent's exit off the dead VM's console: an `agent_exited`
        // security event, kept with the container until it is deleted.
        // Scaled: in the KVM lane the host side runs on an emulated CPU.
        let bound = vessel_testutil::scaled(T);
        let mut seen = Vec::new();
        if !common::wait_until(bound, || {
            seen = security_events(rig, &id);
            seen.iter().any(|v| {
                v["data"]["kind"] == "agent_exited"
                    && v["data"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with(AGENT_EXIT_PANIC))
            })
        }) {
            out.problems.push(format!(
                "no agent_exited event starting {AGENT_EXIT_PANIC:?} {bound:?} after the VM ended: {seen:?}"
            ));
        }
    }
    let o = rig.vessel(&["delete", &id]).output().unwrap();
    if !o.status.success() {
        out.problems
            .push(format!("delete after the fault: {}", text(&o)));
        rig.cli_force_delete(&id);
    }
    out.leaks = leaks_after(rig, &base);
    out
}

/// The guest kernel's panic when the agent, its init, exits.
const AGENT_EXIT_PANIC: &str = "Kernel panic - not syncing: Attempted to kill init";

/// The security events `vessel events --stats` prints for container `id` (a stopped
/// container's too: they come before its failing stats).
fn security_events(rig: &Rig, id: &str) -> Vec<serde_json::Value> {
    let Ok(o) = rig.vessel(&["events", "--stats", id]).output() else {
        return Vec::new();
    };
    vessel_testutil::security_events(&o.stdout)
}

/// Every console.log under `dir`, open.
fn consoles(dir: &std::path::Path) -> Vec<std::fs::File> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() && e.file_name() != "rootfs" {
            files.extend(consoles(&p));
        } else if e.file_name() == "console.log" {
            files.extend(std::fs::File::open(&p));
        }
    }
    files
}

/// The text of `files`, each from its start.
fn read_all(files: &[std::fs::File]) -> String {
    use std::io::{Read, Seek};
    let mut text = Vec::new();
    for mut f in files {
        let _ = f.rewind();
        let _ = f.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

async fn run_faults(plan: Vec<(Fault, Point)>, seed: u64) {
    let Some(mut rig) = Rig::start(40).await else {
        return;
    };
    let started = Instant::now();
    let mut rng = Rng(seed | 1);
    // fault -> (injections, recovered, leaks)
    let mut table: BTreeMap<Fault, (u32, u32, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for (n, (fault, point)) in plan.into_iter().enumerate() {
        let n = n as u32;
        let t = Instant::now();
        let out = match fault {
            Fault::Supervisor | Fault::Agent => cli_fault(&mut rig, fault, point, n, &mut rng),
            _ => cri_fault(&mut rig, fault, point, n, &mut rng).await,
        };
        let row = table.entry(fault).or_default();
        row.0 += 1;
        row.1 += out.problems.is_empty() as u32;
        row.2 += out.leaks.len();
        eprintln!(
            "faults: #{n} {} at {point:?}: {} in {:.1} s{}",
            fault.name(),
            if out.problems.is_empty() && out.leaks.is_empty() {
                "recovered, nothing left"
            } else {
                "FAILED"
            },
            t.elapsed().as_secs_f64(),
            out.problems
                .iter()
                .chain(&out.leaks)
                .map(|p| format!("\n    {p}"))
                .collect::<String>()
        );
        failures.extend(
            out.problems
                .into_iter()
                .chain(out.leaks)
                .map(|p| format!("#{n} {} at {point:?}: {p}", fault.name())),
        );
    }
    println!(
        "\nfault injection: seed {seed}, {} s in all",
        started.elapsed().as_secs()
    );
    println!("| fault | injections | recovered | leaks |");
    println!("|---|---|---|---|");
    for (f, (n, ok, leaks)) in &table {
        println!("| {} | {n} | {ok} | {leaks} |", f.name());
    }
    for f in FAULTS.iter().filter(|f| !applicable().contains(f)) {
        println!(
            "| {} | n/a: no such process with this backend | | |",
            f.name()
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `make test`: every fault once, at a running container (the VMM, virtiofsd and the
/// supervisor also with an exec in flight / before start).
#[tokio::test(flavor = "multi_thread")]
async fn faults_ci() {
    let faults = applicable();
    let plan = [
        (Fault::Vmm, Point::Exec),
        (Fault::Virtiofsd, Point::Running),
        (Fault::VsockBackend, Point::Running),
        (Fault::Supervisor, Point::Ready),
        (Fault::Shim, Point::Running),
        (Fault::Agent, Point::Running),
        (Fault::ContainerdRestart, Point::Exec),
    ]
    .into_iter()
    .filter(|(f, _)| faults.contains(f))
    .collect();
    run_faults(plan, 1).await;
}

/// `make faults`: `FAULTS` (100) injections of random kinds at random points, drawn from
/// `FAULTS_SEED` (default: the clock; printed).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: make faults"]
async fn faults() {
    let n: usize = std::env::var("FAULTS")
        .map(|v| v.parse().expect("FAULTS"))
        .unwrap_or(100);
    let seed: u64 = std::env::var("FAULTS_SEED")
        .map(|v| v.parse().expect("FAULTS_SEED"))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = Rng(seed | 1);
    let faults = applicable();
    let plan = (0..n)
        .map(|_| {
            (
                faults[rng.next(faults.len())],
                POINTS[rng.next(POINTS.len())],
            )
        })
        .collect();
    run_faults(plan, seed).await;
}
