//! The pod model against the fake hypervisor and agent of vessel-testutil:
//! no QEMU, no KVM, no guest, no root: the staging is vessel-runtime's
//! [`FakeStaging`] that records what it stages and never mounts (the real
//! one is tested with the data-loss tests of the CLI and the shim).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use ttrpc::Code;
use vessel_runtime::agent::AgentError;
use vessel_runtime::container::Status;
use vessel_runtime::fake::{FakeNetwork, FakeStaging};
use vessel_runtime::pod::{
    CreateRequest, Pod, PodError, PodEvent, PodKind, PodSetup, PodSlot, Stdio, StdioPaths,
    LOST_EXIT_STATUS,
};
use vessel_runtime::Config;
use vessel_testutil::fake::{FakeHypervisor, FAKE_VMM_PID};

struct Env {
    dir: tempfile::TempDir,
    config: Config,
    hv: FakeHypervisor,
    staging: FakeStaging,
    events: mpsc::UnboundedReceiver<PodEvent>,
    tx: mpsc::UnboundedSender<PodEvent>,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rootfs")).unwrap();
    let config = Config {
        state_root: dir.path().join("state"),
        boot_timeout_secs: Some(10),
        ..Config::default()
    };
    let (tx, events) = mpsc::unbounded_channel();
    Env {
        dir,
        config,
        hv: FakeHypervisor::default(),
        staging: FakeStaging::default(),
        events,
        tx,
    }
}

impl Env {
    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn setup(&self) -> PodSetup {
        let make = self.staging.maker();
        PodSetup::in_state_root_with(&self.config, "pod1", None, &*make).unwrap()
    }

    async fn boot(&self, spec: &serde_json::Value) -> Pod {
        Pod::boot_with(&self.config, &self.hv, self.setup(), spec, self.tx.clone())
            .await
            .unwrap()
    }

    fn request<'a>(&'a self, id: &'a str, rootfs: &'a Path) -> CreateRequest<'a> {
        CreateRequest {
            id,
            bundle: self.dir.path(),
            rootfs,
            spec: serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}}),
            stdio: Stdio::Fifos(StdioPaths::default()),
        }
    }

    async fn next_event(&mut self) -> PodEvent {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the channel is open")
    }

    /// Nothing of the pod is left staged or on disk.
    fn assert_clean(&self) {
        assert!(self.staging.staged().is_empty(), "staged");
        assert!(self.staging.removed(), "share removed");
        assert!(!self.config.state_root.join("shared/pod1.pids").exists());
        assert!(!self.config.state_root.join("pod1").exists());
    }
}

#[tokio::test]
async fn a_container_runs_exits_once_and_is_deleted_without_leftovers() {
    let mut e = env();
    let pod = e.boot(&serde_json::json!({})).await;
    assert_eq!(
        pod.host_pid(),
        FAKE_VMM_PID,
        "the task pid is a host process"
    );
    let rootfs = e.rootfs();
    let pid = pod.create(e.request("pod1", &rootfs)).await.unwrap();
    assert_eq!(pid, FAKE_VMM_PID, "a container's task pid is the VMM's");
    let p = pod.process("pod1", None).unwrap();
    assert_eq!((p.status, p.pid), (Status::Created, FAKE_VMM_PID));
    assert!(p.guest_pid > 0 && p.guest_pid != FAKE_VMM_PID);
    assert_eq!(pod.start("pod1", None).await.unwrap(), pid);
    assert_eq!(pod.process("pod1", None).unwrap().status, Status::Running);
    e.hv.agent.exit("pod1", "", 3);
    match e.next_event().await {
        PodEvent::Exit {
            container_id,
            exec_id,
            pid: p,
            exit,
        } => {
            assert_eq!((container_id.as_str(), exec_id, p), ("pod1", None, pid));
            assert_eq!(exit.status, 3);
        }
        other => panic!("{other:?}"),
    }
    let p = pod.process("pod1", None).unwrap();
    assert_eq!(
        (p.status, p.exit.map(|x| x.status)),
        (Status::Stopped, Some(3))
    );
    pod.kill("pod1", None, 9, false).await.unwrap();
    pod.delete("pod1", None).await.unwrap();
    assert!(matches!(
        pod.process("pod1", None),
        Err(PodError::NotFound(_))
    ));
    pod.stop().await;
    assert!(e.events.try_recv().is_err(), "one exit event, no more");
    e.assert_clean();
}

#[tokio::test]
async fn status_guards_refuse_before_the_agent_is_asked() {
    let e = env();
    let pod = e.boot(&serde_json::json!({})).await;
    let rootfs = e.rootfs();
    pod.create(e.request("pod1", &rootfs)).await.unwrap();
    let err = pod.pause("pod1").await.unwrap_err();
    assert!(
        matches!(
            err,
            PodError::WrongState {
                status: Status::Created,
                op: "pause",
                ..
            }
        ),
        "{err}"
    );
    assert!(!e
        .hv
        .agent
        .calls()
        .iter()
        .any(|c| c.starts_with("PauseContainer")));
    pod.start("pod1", None).await.unwrap();
    assert!(matches!(
        pod.start("pod1", None).await,
        Err(PodError::WrongState { .. })
    ));
    assert!(matches!(
        pod.resume("pod1").await,
        Err(PodError::WrongState { .. })
    ));
    assert!(matches!(
        pod.delete("pod1", None).await,
        Err(PodError::WrongState {
            status: Status::Running,
            ..
        })
    ));
    pod.pause("pod1").await.unwrap();
    assert_eq!(pod.process("pod1", None).unwrap().status, Status::Paused);
    pod.resume("pod1").await.unwrap();
    pod.kill("pod1", None, 9, false).await.unwrap();
    let mut rx = pod.exit_watch("pod1", None).unwrap();
    let exit = *rx.wait_for(Option::is_some).await.unwrap();
    assert_eq!(exit.map(|x| x.status), Some(137));
    pod.delete("pod1", None).await.unwrap();
    pod.stop().await;
    e.assert_clean();
}

#[tokio::test]
async fn when_the_vm_dies_every_live_process_exits_at_once() {
    let mut e = env();
    let pod = e.boot(&serde_json::json!({})).await;
    let rootfs = e.rootfs();
    pod.create(e.request("pod1", &rootfs)).await.unwrap();
    pod.create(e.request("c2", &rootfs)).await.unwrap();
    pod.start("pod1", None).await.unwrap();
    pod.start("c2", None).await.unwrap();
    pod.add_exec(
        "c2",
        "x1",
        br#"{"args":["sh"]}"#.to_vec(),
        Stdio::Fifos(StdioPaths::default()),
    )
    .unwrap();
    pod.start("c2", Some("x1")).await.unwrap();
    e.hv.kill_all().await;
    let mut exited = Vec::new();
    for _ in 0..3 {
        match e.next_event().await {
            PodEvent::Exit {
                container_id,
                exec_id,
                exit,
                ..
            } => {
                assert_eq!(exit.status, LOST_EXIT_STATUS);
                exited.push(format!("{container_id}/{}", exec_id.unwrap_or_default()));
            }
            other => panic!("{other:?}"),
        }
    }
    exited.sort();
    assert_eq!(exited, ["c2/", "c2/x1", "pod1/"]);
    assert!(matches!(
        pod.create(e.request("c3", &rootfs)).await,
        Err(PodError::VmExited(_))
    ));
    for id in ["c2", "pod1"] {
        pod.delete(id, None).await.unwrap();
    }
    pod.stop().await;
    e.assert_clean();
}

#[tokio::test]
async fn a_failed_first_create_leaves_no_pod_and_no_staging() {
    let e = env();
    e.hv.agent
        .fail("CreateContainer", Code::INVALID_ARGUMENT, "bad spec");
    let mut slot = PodSlot::with_staging(e.staging.maker());
    let rootfs = e.rootfs();
    let make_hv = || -> vessel_runtime::Result<Box<dyn vessel_hypervisor::Hypervisor>> {
        Ok(Box::new(e.hv.clone()))
    };
    let err = slot
        .create(&e.config, make_hv, &e.tx, e.request("pod1", &rootfs))
        .await
        .unwrap_err();
    match err {
        PodError::Agent(AgentError::Rpc {
            rpc: "CreateContainer",
            source: vessel_runtime::agent::RpcFailure(ttrpc::Error::RpcStatus(s)),
        }) => assert_eq!(
            (s.code(), s.message.as_str()),
            (Code::INVALID_ARGUMENT, "bad spec")
        ),
        other => panic!("{other}"),
    }
    assert!(slot.get().is_none(), "the pod booted for it is stopped");
    e.assert_clean();
}

#[tokio::test]
async fn the_vm_is_sized_by_the_first_spec() {
    let e = env();
    let spec = serde_json::json!({"linux": {"resources": {
        "memory": {"limit": 64 << 20}, "cpu": {"quota": 250000, "period": 100000}}}});
    let pod = e.boot(&spec).await;
    let vm = &e.hv.launched()[0];
    assert_eq!(vm.memory_mib, 64 + e.config.memory_overhead_mib);
    assert_eq!(vm.vcpus, 3.min(e.config.max_vcpus));
    assert_eq!(vm.shared_dirs.len(), 1, "the pod's staging share");
    pod.stop().await;
    e.assert_clean();
}

#[tokio::test]
async fn the_network_is_attached_before_boot_configured_after_and_detached_last() {
    let e = env();
    let net = FakeNetwork::default();
    let mut setup = e.setup();
    setup.network = Some(Box::new(net.clone()));
    let spec = serde_json::json!({});
    let pod = Pod::boot_with(&e.config, &e.hv, setup, &spec, e.tx.clone())
        .await
        .unwrap();
    assert_eq!(net.calls(), ["attach", "configure"]);
    pod.stop().await;
    assert_eq!(net.calls(), ["attach", "configure", "detach"]);
    e.assert_clean();
}

#[tokio::test]
async fn a_failed_network_configuration_leaves_no_pod() {
    let e = env();
    let net = FakeNetwork::failing_configure();
    let mut setup = e.setup();
    setup.network = Some(Box::new(net.clone()));
    let spec = serde_json::json!({});
    let err = Pod::boot_with(&e.config, &e.hv, setup, &spec, e.tx.clone())
        .await
        .err()
        .expect("the boot fails");
    assert!(matches!(err, PodError::Invalid(_)), "{err}");
    assert_eq!(net.calls(), ["attach", "configure", "detach"]);
    assert_eq!(e.hv.launched().len(), 1, "the VM was booted, then stopped");
    e.assert_clean();
}

#[tokio::test]
async fn a_staging_failure_detaches_the_network_and_boots_nothing() {
    let e = env();
    let net = FakeNetwork::default();
    let made = net.clone();
    let mut slot = PodSlot::with_parts(
        Box::new(|_, id| Err(PodError::Invalid(format!("no share for {id}")))),
        Box::new(move |_, _, _| Ok(Some(Box::new(made.clone())))),
    );
    let rootfs = e.rootfs();
    let make_hv = || -> vessel_runtime::Result<Box<dyn vessel_hypervisor::Hypervisor>> {
        Ok(Box::new(e.hv.clone()))
    };
    let err = slot
        .create(&e.config, make_hv, &e.tx, e.request("pod1", &rootfs))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PodError::Invalid(m) if m == "no share for pod1"),
        "{err}"
    );
    // The network may own a namespace it made: it is detached (which
    // removes it) although nothing was attached.
    assert_eq!(net.calls(), ["detach"]);
    assert!(e.hv.launched().is_empty(), "no VM booted");
    assert!(slot.get().is_none());
}

/// A CRI container's spec, naming its pod's sandbox `sandbox`.
fn cri_container(sandbox: &str) -> serde_json::Value {
    serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "annotations": {
        vessel_runtime::pod::CONTAINER_TYPE_ANNOTATION: "container",
        vessel_runtime::pod::SANDBOX_ID_ANNOTATION: sandbox}})
}

#[tokio::test]
async fn a_cri_container_joins_its_sandbox_in_a_cri_pod_and_keeps_its_own_namespaces_alone() {
    let e = env();
    let rootfs = e.rootfs();
    // A CRI pod: the container joins the sandbox's namespaces; one whose
    // sandbox is not in the pod is refused.
    let pod = e.boot(&serde_json::json!({})).await;
    pod.create(e.request("pod1", &rootfs)).await.unwrap();
    let mut c2 = e.request("c2", &rootfs);
    c2.spec = cri_container("pod1");
    pod.create(c2).await.unwrap();
    assert_eq!(e.hv.agent.joined("c2").as_deref(), Some("pod1"));
    let mut c3 = e.request("c3", &rootfs);
    c3.spec = cri_container("elsewhere");
    assert!(matches!(pod.create(c3).await, Err(PodError::Invalid(_))));
    for id in ["c2", "pod1"] {
        pod.delete(id, None).await.unwrap();
    }
    pod.stop().await;
    // A pod of one (the CLI's) gets the same spec, annotations untouched:
    // its sandbox is in another VM, so it keeps namespaces of its own; a
    // second container is refused.
    let mut setup = e.setup();
    setup.kind = PodKind::One;
    let pod = Pod::boot_with(
        &e.config,
        &e.hv,
        setup,
        &serde_json::json!({}),
        e.tx.clone(),
    )
    .await
    .unwrap();
    let mut alone = e.request("c4", &rootfs);
    alone.spec = cri_container("pod1");
    pod.create(alone).await.unwrap();
    assert_eq!(e.hv.agent.joined("c4"), None);
    assert!(matches!(
        pod.create(e.request("c5", &rootfs)).await,
        Err(PodError::Invalid(_))
    ));
    pod.delete("c4", None).await.unwrap();
    pod.stop().await;
    e.assert_clean();
}
