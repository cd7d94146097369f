//! The work the soak and fault suites (issue 14) put sandboxes through, on every client
//! Vessel has: the `vessel` CLI (run; create, start, exec, kill, delete), `ctr run`, and
//! CRI pods with containers on a real CNI bridge. Each step returns an error instead of
//! panicking so that a soak counts failures and goes on.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::cri::*;
use super::leaks::{HostState, Scope};
use super::{test_net, wait_until, Bridge, Containerd, IMAGE, RUNTIME};

pub type Step = Result<(), String>;

/// A private containerd with the shim, a CRI client, a CNI bridge, and the `vessel`
/// CLI with its own state root, all under one directory.
pub struct Rig {
    pub c: Containerd,
    pub rt: Runtime,
    pub bridge: Bridge,
    pub cli_root: PathBuf,
    pub vessel: PathBuf,
    /// A busybox bundle running `sh -c "$SOAK_CMD"`-style commands per run (see [`Rig::bundle`]).
    pub bundles: PathBuf,
    /// Every sandbox and container id used (host cgroups are named after them).
    pub ids: BTreeSet<String>,
}

impl Rig {
    /// Starts containerd and the CNI network, or `None` when prerequisites are missing
    /// outside CI (`Containerd::start` says which).
    pub async fn start(tag: u32) -> Option<Rig> {
        let c = Containerd::start()?;
        let (net, bridge) = test_net(tag);
        let bridge = c.real_cni("vessel-soak", &bridge, &net);
        let mut rt = connect(&c.sock).await;
        wait_network_ready(&mut rt).await;
        let cli_root = c.dir.path().join("cli");
        let bundles = c.dir.path().join("bundles");
        std::fs::create_dir_all(&bundles).unwrap();
        Some(Rig {
            c,
            rt,
            bridge,
            cli_root,
            vessel: vessel_testutil::workspace_binary("VESSEL_BIN", "vessel"),
            bundles,
            ids: BTreeSet::new(),
        })
    }

    /// The leak scope: this rig's directory, both state roots, its bridge, containerd
    /// and `extra` long-lived processes.
    pub fn scope(&self, extra: &[(String, u32)]) -> Scope<'_> {
        let mut long_lived = vec![("containerd".to_string(), self.containerd_pid())];
        long_lived.extend_from_slice(extra);
        Scope {
            dir: self.c.dir.path(),
            state_roots: vec![self.c.state_root.clone(), self.cli_root.clone()],
            bridge: Some(&self.bridge.0),
            long_lived,
        }
    }

    pub fn observe(&self, extra: &[(String, u32)]) -> HostState {
        HostState::take(&self.scope(extra), &self.ids)
    }

    pub fn containerd_pid(&self) -> u32 {
        std::fs::read_to_string(self.c.dir.path().join("c/containerd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A busybox bundle `name` whose process runs `args` (made once, reused).
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let b = self.bundles.join(name);
        if !b.join("config.json").exists() {
            let o = Command::new(vessel_testutil::repo().join("tests/support/busybox-bundle.sh"))
                .arg(&b)
                .arg(&self.vessel)
                .arg("--")
                .args(args)
                .output()
                .unwrap();
            assert!(o.status.success(), "busybox-bundle: {}", text(&o));
        }
        b
    }

    /// `vessel --config <the shim's config> --root <cli root> args...`
    pub fn vessel(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vessel);
        cmd.arg("--config")
            .arg(self.c.dir.path().join("vessel.toml"))
            .arg("--root")
            .arg(&self.cli_root)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn vessel_ok(&self, args: &[&str]) -> Result<Output, String> {
        let o = self.vessel(args).output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(o)
        } else {
            Err(format!("vessel {}: {}", args.join(" "), text(&o)))
        }
    }

    /// `vessel status` of `id` ("gone" when `vessel state` fails).
    pub fn cli_status(&self, id: &str) -> String {
        let Ok(o) = self.vessel(&["state", id]).output() else {
            return "gone".into();
        };
        if !o.status.success() {
            return "gone".into();
        }
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_else(|| "gone".into())
    }

    /// `vessel run` of a bundle that prints a line and exits 0.
    pub fn cli_run(&mut self, id: &str) -> Step {
        self.ids.insert(id.into());
        let b = self.bundle("echo", &["sh", "-c", "echo soak-run"]);
        let o = self.vessel_ok(&["run", "--bundle", b.to_str().unwrap(), id])?;
        expect_out(&o, "soak-run\n")
    }

    /// `vessel create` (supervisor output to files) of a sleeping container.
    pub fn cli_create(&mut self, id: &str) -> Step {
        let b = self.bundle("sleep", &["sleep", "100000"]);
        self.cli_create_from(id, &b)
    }

    /// `vessel create` of `bundle` as `id`, the supervisor's output to files.
    pub fn cli_create_from(&mut self, id: &str, bundle: &Path) -> Step {
        self.ids.insert(id.into());
        let log = self.bundles.join(format!("{id}.log"));
        let st = self
            .vessel(&["create", "--bundle", bundle.to_str().unwrap(), id])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .status()
            .map_err(|e| e.to_string())?;
        let err = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(log.with_extension("err"));
        if !st.success() {
            return Err(format!("vessel create {id}: {st}: {err}"));
        }
        Ok(())
    }

    /// create, start, exec, kill, delete through the CLI.
    pub fn cli_lifecycle(&mut self, id: &str) -> Step {
        self.cli_create(id)?;
        self.vessel_ok(&["start", id])?;
        let o = self.vessel_ok(&["exec", id, "echo", "soak-exec"])?;
        expect_out(&o, "soak-exec\n")?;
        self.vessel_ok(&["kill", id, "KILL"])?;
        if !wait_until(Duration::from_secs(30), || self.cli_status(id) == "stopped") {
            return Err(format!(
                "{id} not stopped 30 s after kill: {}",
                self.cli_status(id)
            ));
        }
        self.vessel_ok(&["delete", id])?;
        Ok(())
    }

    /// `vessel delete --force` (cleanup after a failure or a fault; errors ignored).
    pub fn cli_force_delete(&self, id: &str) {
        let _ = self.vessel(&["delete", "--force", id]).output();
    }

    /// `ctr run --rm` printing a line.
    pub fn ctr_run(&mut self, id: &str) -> Step {
        self.ids.insert(id.into());
        let o = self.c.ctr(&[
            "run",
            "--runtime",
            RUNTIME,
            "--rm",
            IMAGE,
            id,
            "sh",
            "-c",
            "echo soak-ctr",
        ]);
        if !o.status.success() {
            return Err(format!("ctr run {id}: {}", text(&o)));
        }
        expect_out(&o, "soak-ctr\n")
    }

    /// A pod on the CNI bridge.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        pod_on_cni(name, &self.c.dir.path().join("logs"))
    }
}

/// Runs pod `name` with two containers on `rt` (a clone of the rig's client): one writes
/// `lines` lines to stdout and sleeps, the other sleeps; an exec in each (one returning
/// 64 KiB), the first's log checked; then the pod is stopped and removed. Returns the pod
/// id (if the pod was made) and how it went.
pub async fn cri_pod_two_containers(
    rt: Runtime,
    cfg: PodSandboxConfig,
    log_dir: PathBuf,
    lines: u32,
) -> (Option<String>, Step) {
    let mut pod = None;
    let r = pod_two_containers(rt, cfg, log_dir, lines, &mut pod).await;
    (pod, r)
}

async fn pod_two_containers(
    mut rt: Runtime,
    cfg: PodSandboxConfig,
    log_dir: PathBuf,
    lines: u32,
    made: &mut Option<String>,
) -> Step {
    let pod = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(cfg.clone()),
            runtime_handler: "vessel".into(),
        })
        .await
        .map_err(|e| format!("RunPodSandbox: {}", e.message()))?
        .into_inner()
        .pod_sandbox_id;
    *made = Some(pod.clone());
    let r = pod_work(&mut rt, &pod, &cfg, &log_dir, lines).await;
    let stop = rt
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    let remove = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await;
    r?;
    stop.map_err(|e| format!("StopPodSandbox: {}", e.message()))?;
    remove.map_err(|e| format!("RemovePodSandbox: {}", e.message()))?;
    Ok(())
}

async fn pod_work(
    rt: &mut Runtime,
    pod: &str,
    cfg: &PodSandboxConfig,
    log_dir: &Path,
    lines: u32,
) -> Step {
    let name = cfg.metadata.as_ref().unwrap().name.clone();
    let script = format!(
        "i=0; while [ $i -lt {lines} ]; do echo {name}-line-$i; i=$((i+1)); done; exec sleep 100000"
    );
    let a = create_start(rt, pod, cfg, container_config("a", &["sh", "-c", &script])).await?;
    let b = create_start(rt, pod, cfg, container_config("b", &["sleep", "100000"])).await?;
    let big = exec_sync(
        rt,
        &a,
        &["sh", "-c", "head -c 65536 /dev/zero | tr '\\0' x"],
    )
    .await?;
    if big.len() != 65536 || big.iter().any(|&c| c != b'x') {
        return Err(format!(
            "exec in {name}/a returned {} bytes, not 64 KiB of x",
            big.len()
        ));
    }
    let hi = exec_sync(rt, &b, &["echo", "soak-exec"]).await?;
    if hi != b"soak-exec\n" {
        return Err(format!(
            "exec in {name}/b: {:?}",
            String::from_utf8_lossy(&hi)
        ));
    }
    // The last line the first container wrote reaches its CRI log.
    let log = log_dir.join("a.log");
    let last = format!("{name}-line-{}", lines - 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&last) {
            let n = text
                .lines()
                .filter(|l| l.contains(&format!("{name}-line-")))
                .count();
            if n != lines as usize {
                return Err(format!("{name}/a's log has {n} of {lines} lines"));
            }
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{name}/a's log lacks {last} after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// CreateContainer + StartContainer, as errors.
pub async fn create_start(
    rt: &mut Runtime,
    pod: &str,
    cfg: &PodSandboxConfig,
    config: ContainerConfig,
) -> Result<String, String> {
    let name = config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .map_err(|e| format!("CreateContainer {name}: {}", e.message()))?
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .map_err(|e| format!("StartContainer {name}: {}", e.message()))?;
    Ok(id)
}

/// ExecSync's stdout, an error for a non-zero exit or a failed call.
pub async fn exec_sync(rt: &mut Runtime, id: &str, cmd: &[&str]) -> Result<Vec<u8>, String> {
    let r = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        })
        .await
        .map_err(|e| format!("ExecSync {cmd:?}: {}", e.message()))?
        .into_inner();
    if r.exit_code != 0 {
        return Err(format!(
            "ExecSync {cmd:?} exited {}: {}",
            r.exit_code,
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(r.stdout)
}

/// Starts `n` pods at once, each with two containers, exec and stdio traffic
/// ([`cri_pod_two_containers`]); returns every error.
pub async fn concurrent_pods(rig: &mut Rig, n: u32, round: u32) -> Vec<String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let name = format!("conc{round}x{i}");
        let mut cfg = rig.pod_config(&name);
        let logs = rig.c.dir.path().join("logs").join(&name);
        cfg.log_directory = logs.display().to_string();
        let rt = rig.rt.clone();
        tasks.push(tokio::spawn(cri_pod_two_containers(rt, cfg, logs, 2000)));
    }
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok((pod, r)) => {
                rig.ids.extend(pod);
                errors.extend(r.err());
            }
            Err(e) => errors.push(format!("pod task panicked: {e}")),
        }
    }
    errors
}

fn expect_out(o: &Output, want: &str) -> Step {
    let got = String::from_utf8_lossy(&o.stdout);
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "stdout {got:?}, expected {want:?}; stderr {:?}",
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "{} stdout={:?} stderr={:?}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
