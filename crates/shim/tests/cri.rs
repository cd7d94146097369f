//! CRI (the kubelet's API) through containerd 1.6 with `runtime_handler = "vessel"`:
//! a pod is one VM, its containers share it, and tearing it down leaves nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{mounts_mentioning, processes_mentioning, wait_until, Containerd, IMAGE};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};

async fn connect(sock: &Path) -> RuntimeServiceClient<Channel> {
    let sock = sock.to_path_buf();
    let channel = Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .unwrap();
    let _ = ImageServiceClient::new(channel.clone());
    RuntimeServiceClient::new(channel)
}

fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_dir.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(rt: &mut RuntimeServiceClient<Channel>, config: &PodSandboxConfig) -> String {
    rt.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "vessel".into(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A container config with the pid namespace mode kubelet sends (CONTAINER by
/// default, POD for `shareProcessNamespace: true`).
fn container_config_pid(name: &str, command: &[&str], pid: NamespaceMode) -> ContainerConfig {
    ContainerConfig {
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    pid: pid as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..container_config(name, command)
    }
}

async fn start_container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> String {
    start(rt, pod, pod_config, container_config(name, command)).await
}

async fn start(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_config: &PodSandboxConfig,
    config: ContainerConfig,
) -> String {
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");
    id
}

async fn status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> ContainerStatus {
    rt.container_status(ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

async fn exec(rt: &mut RuntimeServiceClient<Channel>, id: &str, cmd: &[&str]) -> (i32, String) {
    let r = rt
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 30,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    (r.exit_code, String::from_utf8_lossy(&r.stdout).to_string())
}

async fn wait_exited(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> ContainerStatus {
    let start = Instant::now();
    loop {
        let s = status(rt, id).await;
        if s.state == ContainerState::ContainerExited as i32 || start.elapsed() > timeout {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Shim processes of this containerd and their sockets.
fn shims(c: &Containerd) -> Vec<String> {
    processes_mentioning(&format!("-address {}", c.sock.display()))
}

fn assert_nothing_left(c: &Containerd, sockets: &[String]) {
    let state = c.state_root.display().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || shims(c).is_empty()
            && processes_mentioning(&state).is_empty()),
        "left behind: shims {:?}, VM processes {:?}",
        shims(c),
        processes_mentioning(&state)
    );
    assert!(
        mounts_mentioning(&state).is_empty(),
        "{:?}",
        mounts_mentioning(&state)
    );
    for s in sockets {
        assert!(!Path::new(s).exists(), "shim socket {s} left behind");
    }
}

fn shim_sockets(c: &Containerd) -> Vec<String> {
    shims(c)
        .iter()
        .filter_map(|l| l.split(" -socket unix://").nth(1))
        .map(|s| s.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_with_two_containers_is_one_vm() {
    let Some(c) = Containerd::start() else { return };
    let mut rt = connect(&c.sock).await;
    let logs = c.dir.path().join("logs");
    let mut cfg = pod_config("two", &logs);
    // Sizes the VM (containerd passes io.vessel.* through pod_annotations).
    cfg.annotations
        .insert("io.vessel.vm.memory_mib".into(), "384".into());
    let pod = run_pod(&mut rt, &cfg).await;
    let a = start_container(&mut rt, &pod, &cfg, "a", &["sleep", "1000"]).await;
    let b = start_container(&mut rt, &pod, &cfg, "b", &["sleep", "1000"]).await;
    for id in [&a, &b] {
        assert_eq!(
            status(&mut rt, id).await.state,
            ContainerState::ContainerRunning as i32
        );
    }
    assert_eq!(shims(&c).len(), 1, "one shim per pod: {:?}", shims(&c));
    let qemus = processes_mentioning("qemu-system");
    let ours: Vec<_> = qemus
        .iter()
        .filter(|q| q.contains(&c.state_root.display().to_string()))
        .collect();
    assert_eq!(ours.len(), 1, "one VM per pod: {ours:?}");

    let (code_a, boot_a) = exec(&mut rt, &a, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    let (code_b, boot_b) = exec(&mut rt, &b, &["cat", "/proc/sys/kernel/random/boot_id"]).await;
    eprintln!("boot ids: {boot_a:?} {boot_b:?}");
    assert_eq!((code_a, code_b), (0, 0));
    assert_eq!(boot_a.trim().len(), 36, "{boot_a:?}");
    assert_eq!(
        boot_a, boot_b,
        "both containers run in the same guest kernel"
    );
    let (_, meminfo) = exec(&mut rt, &a, &["cat", "/proc/meminfo"]).await;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal");
    eprintln!("guest MemTotal {total_kib} KiB");
    assert!(
        (300 * 1024..=384 * 1024).contains(&total_kib),
        "VM sized by the pod annotation (384 MiB), guest sees {total_kib} KiB"
    );
    let (code, _) = exec(&mut rt, &b, &["sh", "-c", "exit 4"]).await;
    assert_eq!(code, 4);

    let x = start_container(&mut rt, &pod, &cfg, "x", &["sh", "-c", "exit 3"]).await;
    let s = wait_exited(&mut rt, &x, Duration::from_secs(20)).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 3);

    let sockets = shim_sockets(&c);
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    for id in [&a, &b] {
        let s = status(&mut rt, id).await;
        assert_eq!(s.state, ContainerState::ContainerExited as i32);
        assert_eq!(s.exit_code, 137, "killed by SIGKILL");
    }
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
    assert_nothing_left(&c, &sockets);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_hypervisor_exits_the_containers() {
    let Some(c) = Containerd::start() else { return };
    let mut rt = connect(&c.sock).await;
    let cfg = pod_config("doomed", &c.dir.path().join("logs"));
    let pod = run_pod(&mut rt, &cfg).await;
    let a = start_container(&mut rt, &pod, &cfg, "a", &["sleep", "1000"]).await;
    let state = c.state_root.display().to_string();
    let qemu: Vec<u32> = processes_mentioning("qemu-system")
        .iter()
        .filter(|l| l.contains(&state))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(qemu.len(), 1);
    let sockets = shim_sockets(&c);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let s = wait_exited(&mut rt, &a, Duration::from_secs(5)).await;
    let took = killed.elapsed();
    eprintln!("container exited {took:?} after QEMU was killed: {s:?}");
    assert_eq!(
        s.state,
        ContainerState::ContainerExited as i32,
        "not exited within 5 s"
    );
    assert!(took <= Duration::from_secs(5));
    assert_ne!(s.exit_code, 0, "an error exit");
    // The dead VM is not reused: a new container in the pod is refused
    // (containerd already refuses it, since the pod's sandbox task is gone;
    // the shim would refuse it too, naming the VM's exit).
    let e = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("b", &["true"])),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect_err("a container in a pod whose VM died");
    assert!(
        e.message().contains("the pod's VM has exited") || e.message().contains("no running task"),
        "{e:?}"
    );
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .expect("RemovePodSandbox");
    assert_nothing_left(&c, &sockets);
}

/// Waits until containerd's CRI reports the pod network ready (after
/// [`Containerd::fake_cni`]).
async fn wait_network_ready(rt: &mut RuntimeServiceClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = rt
            .status(StatusRequest { verbose: false })
            .await
            .expect("Status")
            .into_inner()
            .status
            .unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.r#type == "NetworkReady" && c.status);
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CRI network not ready: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `readlink /proc/self/ns/<ns>` in a container.
async fn ns(rt: &mut RuntimeServiceClient<Channel>, id: &str, ns: &str) -> String {
    let (code, link) = exec(rt, id, &["readlink", &format!("/proc/self/ns/{ns}")]).await;
    assert_eq!(code, 0, "readlink {ns} in {id}");
    assert!(link.starts_with(&format!("{ns}:[")), "{link:?}");
    link.trim().to_string()
}

async fn stop_and_remove(rt: &mut RuntimeServiceClient<Channel>, pod: &str) {
    rt.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod.into(),
    })
    .await
    .expect("RemovePodSandbox");
}

/// Runs pod `cfg` with containers a (`sleep 1001`) and b (`sleep 1002`), both
/// with pid namespace `mode`; returns the pod and container ids.
async fn two_sleepers(
    rt: &mut RuntimeServiceClient<Channel>,
    cfg: &PodSandboxConfig,
    mode: NamespaceMode,
) -> (String, String, String) {
    let pod = run_pod(rt, cfg).await;
    let a = start(
        rt,
        &pod,
        cfg,
        container_config_pid("a", &["sleep", "1001"], mode),
    )
    .await;
    let b = start(
        rt,
        &pod,
        cfg,
        container_config_pid("b", &["sleep", "1002"], mode),
    )
    .await;
    (pod, a, b)
}

/// Containers of a pod join the sandbox's ipc and uts namespaces (so they see
/// the pod hostname), and its pid namespace only when the pod asks.
#[tokio::test(flavor = "multi_thread")]
async fn pod_containers_share_ipc_uts_and_on_request_pid() {
    let Some(c) = Containerd::start() else { return };
    c.fake_cni();
    let mut rt = connect(&c.sock).await;
    wait_network_ready(&mut rt).await;
    let logs = c.dir.path().join("logs");
    // A pod network (CNI): containerd drops the UTS namespace of pods on the
    // node's network, and kubelet sets a hostname only for the others.
    let pod_cfg = |name: &str, pid: NamespaceMode| {
        let mut cfg = pod_config(name, &logs);
        cfg.hostname = "vessel-pod".into();
        cfg.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: pid as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        cfg
    };
    let mut sockets = Vec::new();

    // Default: pid namespace per container.
    let cfg = pod_cfg("apart", NamespaceMode::Container);
    let (pod, a, b) = two_sleepers(&mut rt, &cfg, NamespaceMode::Container).await;
    for id in [&a, &b] {
        let (code, host) = exec(&mut rt, id, &["hostname"]).await;
        assert_eq!((code, host.trim()), (0, "vessel-pod"), "hostname in {id}");
    }
    for n in ["ipc", "uts"] {
        assert_eq!(
            ns(&mut rt, &a, n).await,
            ns(&mut rt, &b, n).await,
            "{n} namespace"
        );
    }
    assert_ne!(
        ns(&mut rt, &a, "pid").await,
        ns(&mut rt, &b, "pid").await,
        "pid namespace CONTAINER: one per container"
    );
    let (_, ps) = exec(&mut rt, &b, &["ps"]).await;
    assert!(!ps.contains("sleep 1001"), "b sees a's process: {ps}");
    sockets.extend(shim_sockets(&c));
    stop_and_remove(&mut rt, &pod).await;

    // shareProcessNamespace: true.
    let cfg = pod_cfg("together", NamespaceMode::Pod);
    let (pod, a, b) = two_sleepers(&mut rt, &cfg, NamespaceMode::Pod).await;
    for n in ["ipc", "uts", "pid"] {
        assert_eq!(
            ns(&mut rt, &a, n).await,
            ns(&mut rt, &b, n).await,
            "{n} namespace"
        );
    }
    let (code, ps) = exec(&mut rt, &b, &["ps"]).await;
    eprintln!("ps in b:\n{ps}");
    assert_eq!(code, 0);
    assert!(
        ps.contains("sleep 1001"),
        "b does not see a's process: {ps}"
    );
    // PID 1 is the sandbox's process, not a's or b's.
    let (_, init) = exec(&mut rt, &b, &["cat", "/proc/1/cmdline"]).await;
    assert!(!init.is_empty() && !init.contains("100"), "pid 1: {init:?}");
    sockets.extend(shim_sockets(&c));
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
}

/// cat of a container's own cgroup files (the container has a cgroup namespace).
async fn cgroup_limits(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> String {
    let (code, out) = exec(
        rt,
        id,
        &["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"],
    )
    .await;
    assert_eq!(code, 0, "cat cgroup files: {out}");
    out
}

/// UpdateContainerResources reaches the container's cgroup in the guest; a bad
/// value is refused and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn update_container_resources_in_the_guest() {
    let Some(c) = Containerd::start() else { return };
    let mut rt = connect(&c.sock).await;
    let cfg = pod_config("limits", &c.dir.path().join("logs"));
    let pod = run_pod(&mut rt, &cfg).await;
    let config = container_config_pid("a", &["sleep", "1000"], NamespaceMode::Container);
    let a = start(&mut rt, &pod, &cfg, config).await;
    eprintln!("limits before: {:?}", cgroup_limits(&mut rt, &a).await);
    let update = |quota: i64| UpdateContainerResourcesRequest {
        container_id: a.clone(),
        linux: Some(LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_quota: quota,
            cpu_period: 100_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    rt.update_container_resources(update(50_000))
        .await
        .expect("UpdateContainerResources");
    let want = format!("{}\n50000 100000\n", 64 << 20);
    assert_eq!(cgroup_limits(&mut rt, &a).await, want);

    // 500 us is below the kernel's 1 ms minimum quota.
    let bad = rt.update_container_resources(update(500)).await;
    let e = bad.expect_err("a 500 us CPU quota is refused");
    eprintln!("bad update: {e}");
    assert!(e.message().contains("cpu.quota"), "{e}");
    assert_eq!(
        status(&mut rt, &a).await.state,
        ContainerState::ContainerRunning as i32
    );
    assert_eq!(cgroup_limits(&mut rt, &a).await, want, "nothing changed");

    let sockets = shim_sockets(&c);
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
}
