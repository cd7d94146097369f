//! A CRI client (the kubelet's side) for containerd's CRI plugin, and the
//! "nothing left behind" checks shared by the CRI suites.

use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
pub use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};

use super::{mounts_mentioning, processes_mentioning, wait_until, Containerd, IMAGE};

pub type Runtime = RuntimeServiceClient<Channel>;

pub async fn connect(sock: &Path) -> Runtime {
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

pub fn pod_config(name: &str, log_dir: &Path) -> PodSandboxConfig {
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

/// A pod on the CNI network (not the node's), like a kubelet pod without
/// `hostNetwork`, logging under `log_dir`.
pub fn pod_on_cni(name: &str, log_dir: &Path) -> PodSandboxConfig {
    let mut cfg = pod_config(name, log_dir);
    cfg.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                network: NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

pub async fn run_pod(rt: &mut Runtime, config: &PodSandboxConfig) -> String {
    rt.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: "vessel".into(),
    })
    .await
    .expect("RunPodSandbox")
    .into_inner()
    .pod_sandbox_id
}

pub fn container_config(name: &str, command: &[&str]) -> ContainerConfig {
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
pub fn container_config_pid(name: &str, command: &[&str], pid: NamespaceMode) -> ContainerConfig {
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

pub async fn start_container(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &PodSandboxConfig,
    name: &str,
    command: &[&str],
) -> String {
    start(rt, pod, pod_config, container_config(name, command)).await
}

pub async fn start(
    rt: &mut Runtime,
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

pub async fn status(rt: &mut Runtime, id: &str) -> ContainerStatus {
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

pub async fn exec(rt: &mut Runtime, id: &str, cmd: &[&str]) -> (i32, String) {
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

pub async fn wait_exited(rt: &mut Runtime, id: &str, timeout: Duration) -> ContainerStatus {
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
pub fn shims(c: &Containerd) -> Vec<String> {
    processes_mentioning(&format!("-address {}", c.sock.display()))
}

/// The VMM processes (QEMU or the built-in VMM) of this containerd's shims, as
/// (pid, comm).
pub fn vmms(c: &Containerd) -> Vec<(u32, String)> {
    shims(c)
        .iter()
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .flat_map(vessel_testutil::vmms_at_or_below)
        .collect()
}

pub fn assert_nothing_left(c: &Containerd, sockets: &[String]) {
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

pub fn shim_sockets(c: &Containerd) -> Vec<String> {
    shims(c)
        .iter()
        .filter_map(|l| l.split(" -socket unix://").nth(1))
        .map(|s| s.split(' ').next().unwrap_or_default().to_string())
        .collect()
}

/// Waits until containerd's CRI reports the pod network ready (after
/// [`Containerd::real_cni`]).
pub async fn wait_network_ready(rt: &mut Runtime) {
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

pub async fn stop_and_remove(rt: &mut Runtime, pod: &str) {
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
