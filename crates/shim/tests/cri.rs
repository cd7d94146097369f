//! CRI (the kubelet's API) through containerd 1.6 with `runtime_handler = "vessel"`:
//! a pod is one VM, its containers share it, and tearing it down leaves nothing.

mod common;

use std::time::{Duration, Instant};

use common::cri::*;
use common::Containerd;

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
    let ours = vmms(&c);
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
    let vmm = vmms(&c);
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    let sockets = shim_sockets(&c);
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm[0].0 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // 5 s on a host; scaled in the KVM lane, whose host side runs on an emulated CPU
    // (vessel_testutil::scaled, scripts/test-lane.sh).
    let bound = vessel_testutil::scaled(Duration::from_secs(5));
    let s = wait_exited(&mut rt, &a, bound).await;
    let took = killed.elapsed();
    eprintln!(
        "container exited {took:?} after the VMM ({}) was killed: {s:?}",
        vmm[0].1
    );
    assert_eq!(
        s.state,
        ContainerState::ContainerExited as i32,
        "not exited within {bound:?}; containerd's log (with the shim's):\n{}",
        c.log_tail()
    );
    assert!(took <= bound);
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

/// `readlink /proc/self/ns/<ns>` in a container.
async fn ns(rt: &mut Runtime, id: &str, ns: &str) -> String {
    let (code, link) = exec(rt, id, &["readlink", &format!("/proc/self/ns/{ns}")]).await;
    assert_eq!(code, 0, "readlink {ns} in {id}");
    assert!(link.starts_with(&format!("{ns}:[")), "{link:?}");
    link.trim().to_string()
}

/// Runs pod `cfg` with containers a (`sleep 1001`) and b (`sleep 1002`), both
/// with pid namespace `mode`; returns the pod and container ids.
async fn two_sleepers(
    rt: &mut Runtime,
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
    let (net, bridge) = common::test_net(21);
    let _bridge = c.real_cni("vessel-ns", &bridge, &net);
    let mut rt = connect(&c.sock).await;
    wait_network_ready(&mut rt).await;
    let logs = c.dir.path().join("logs");
    // A pod network (Debian's CNI bridge): containerd drops the UTS namespace of pods on the
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
async fn cgroup_limits(rt: &mut Runtime, id: &str) -> String {
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

/// A container in the pod's pid namespace (CRI's POD mode) whose init forks:
/// when the init is killed its children die too (as under runc's shim), else
/// they would hold its stdio open and its exit would never be reported.
#[tokio::test(flavor = "multi_thread")]
async fn a_forking_init_in_the_pod_pid_namespace_takes_its_children_along() {
    let Some(c) = Containerd::start() else { return };
    let mut rt = connect(&c.sock).await;
    let cfg = pod_config("forks", &c.dir.path().join("logs"));
    let pod = run_pod(&mut rt, &cfg).await;
    let script = ["sh", "-c", "sleep 1003 & sleep 1004 & wait"];
    let a = start(
        &mut rt,
        &pod,
        &cfg,
        container_config_pid("a", &script, NamespaceMode::Pod),
    )
    .await;
    let b = start(
        &mut rt,
        &pod,
        &cfg,
        container_config_pid("b", &["sleep", "1000"], NamespaceMode::Pod),
    )
    .await;
    let (_, ps) = exec(&mut rt, &b, &["ps"]).await;
    assert!(
        ps.contains("sleep 1003"),
        "b does not see a's children: {ps}"
    );

    // Timeout 0: SIGKILL to a's init, then containerd waits for its exit.
    let stop = rt.stop_container(StopContainerRequest {
        container_id: a.clone(),
        timeout: 0,
    });
    tokio::time::timeout(Duration::from_secs(60), stop)
        .await
        .expect("StopContainer returned within 60 s")
        .expect("StopContainer");
    let s = status(&mut rt, &a).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 137);
    let (_, ps) = exec(&mut rt, &b, &["ps"]).await;
    assert!(
        !ps.contains("sleep 1003") && !ps.contains("sleep 1004"),
        "a's children outlived it: {ps}"
    );

    let sockets = shim_sockets(&c);
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
}
