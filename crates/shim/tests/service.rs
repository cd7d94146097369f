//! The shim's task service (containerd's task API mapped onto the pod
//! model) against the fakes of vessel-testutil: a fake hypervisor whose VMs
//! run a scripted agent in-process, a staging that never mounts, and a fake
//! containerd events endpoint that records what the shim publishes. No root,
//! QEMU, KVM or containerd (the real ones are tests/ctr.rs and tests/cri.rs).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::{create_events, Events};
use containerd_shim::protos::topics;
use containerd_shim::{Task, TtrpcContext};
use containerd_shim_vessel_v2::service::{Backend, TaskService};
use ttrpc::Code;
use vessel_runtime::fake::FakeStaging;
use vessel_runtime::pod::LOST_EXIT_STATUS;
use vessel_runtime::Config;
use vessel_testutil::fake::{FakeHypervisor, FAKE_VMM_PID};

/// containerd's events endpoint: records the topics the shim publishes.
#[derive(Clone, Default)]
struct FakeEvents(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl Events for FakeEvents {
    async fn forward(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: ForwardRequest,
    ) -> ttrpc::Result<Empty> {
        self.0.lock().unwrap().push(req.envelope.topic.clone());
        Ok(Empty::new())
    }
}

impl FakeEvents {
    fn topics(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `topic` was published `n` times.
    async fn wait_for(&self, topic: &str, n: usize) {
        let seen = || self.topics().iter().filter(|t| *t == topic).count();
        for _ in 0..500 {
            if seen() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{topic} published {} times, want {n}: {:?}",
            seen(),
            self.topics()
        );
    }
}

struct Env {
    dir: tempfile::TempDir,
    hv: FakeHypervisor,
    staging: FakeStaging,
    events: FakeEvents,
    svc: TaskService,
    _server: ttrpc::r#async::Server,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let events = FakeEvents::default();
    let addr = format!("unix://{}", dir.path().join("events.sock").display());
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .unwrap()
        .register_service(create_events(Arc::new(events.clone())));
    server.start().await.unwrap();
    let publisher = RemotePublisher::new(&addr).await.unwrap();
    let config = Config {
        state_root: dir.path().join("state"),
        boot_timeout_secs: Some(10),
        ..Config::default()
    };
    let (hv, staging) = (FakeHypervisor::default(), FakeStaging::default());
    let backend = {
        let (hv, staging) = (hv.clone(), staging.clone());
        Backend {
            hypervisor: Box::new(move |_| Ok(Box::new(hv.clone()))),
            staging: staging.maker(),
        }
    };
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(config, "test", publisher, exit, backend);
    Env {
        dir,
        hv,
        staging,
        events,
        svc,
        _server: server,
    }
}

impl Env {
    /// A bundle with a ready rootfs and a spec without a network namespace
    /// (a new one would need root to make).
    fn bundle(&self, id: &str, annotations: serde_json::Value) -> String {
        let bundle = self.dir.path().join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
        let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        spec["annotations"] = annotations;
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        bundle.display().to_string()
    }

    async fn create(&self, id: &str) -> ttrpc::Result<api::CreateTaskResponse> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, serde_json::json!({})),
            ..Default::default()
        };
        self.svc.create(&TtrpcContext::default(), req).await
    }

    async fn start(&self, id: &str) -> ttrpc::Result<api::StartResponse> {
        let req = api::StartRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.start(&TtrpcContext::default(), req).await
    }

    async fn state(&self, id: &str) -> ttrpc::Result<api::StateResponse> {
        let req = api::StateRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.state(&TtrpcContext::default(), req).await
    }

    async fn kill(&self, id: &str, signal: u32) -> ttrpc::Result<api::Empty> {
        let req = api::KillRequest {
            id: id.into(),
            signal,
            ..Default::default()
        };
        self.svc.kill(&TtrpcContext::default(), req).await
    }

    async fn wait(&self, id: &str) -> ttrpc::Result<api::WaitResponse> {
        let req = api::WaitRequest {
            id: id.into(),
            ..Default::default()
        };
        let ctx = TtrpcContext::default();
        let wait = self.svc.wait(&ctx, req);
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("wait answers within 10 s")
    }

    async fn delete(&self, id: &str) -> ttrpc::Result<api::DeleteResponse> {
        let req = api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        self.svc.delete(&TtrpcContext::default(), req).await
    }
}

fn code(r: ttrpc::Result<impl std::fmt::Debug>) -> (Code, String) {
    match r.expect_err("the request fails") {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
        other => panic!("not a status: {other}"),
    }
}

#[tokio::test]
async fn a_task_runs_reports_the_vmm_pid_exits_and_is_deleted() {
    let e = env().await;
    let created = e.create("c1").await.unwrap();
    assert_eq!(
        created.pid, FAKE_VMM_PID,
        "the task pid is the VMM's host pid"
    );
    assert_eq!(e.state("c1").await.unwrap().status(), api::Status::CREATED);
    assert_eq!(e.start("c1").await.unwrap().pid, FAKE_VMM_PID);
    let st = e.state("c1").await.unwrap();
    assert_eq!((st.status(), st.pid), (api::Status::RUNNING, FAKE_VMM_PID));

    e.kill("c1", 9).await.unwrap();
    assert_eq!(e.wait("c1").await.unwrap().exit_status, 137);
    assert_eq!(e.state("c1").await.unwrap().status(), api::Status::STOPPED);
    assert_eq!(e.delete("c1").await.unwrap().exit_status, 137);
    assert_eq!(code(e.state("c1").await).0, Code::NOT_FOUND);

    e.events.wait_for(topics::TASK_DELETE_EVENT_TOPIC, 1).await;
    let want = [
        topics::TASK_CREATE_EVENT_TOPIC,
        topics::TASK_START_EVENT_TOPIC,
        topics::TASK_EXIT_EVENT_TOPIC,
        topics::TASK_DELETE_EVENT_TOPIC,
    ];
    assert_eq!(e.events.topics(), want);
    assert!(e.staging.staged().is_empty(), "unstaged");
    assert_eq!(e.hv.launched().len(), 1);
}

#[tokio::test]
async fn status_guards_refuse_what_the_state_does_not_allow() {
    let e = env().await;
    e.create("c1").await.unwrap();
    let pause = api::PauseRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let (c, msg) = code(e.svc.pause(&TtrpcContext::default(), pause.clone()).await);
    assert_eq!(
        c,
        Code::FAILED_PRECONDITION,
        "pause of a created task: {msg}"
    );
    e.start("c1").await.unwrap();
    let (c, msg) = code(e.delete("c1").await);
    assert_eq!(
        c,
        Code::FAILED_PRECONDITION,
        "delete of a running task: {msg}"
    );
    e.svc.pause(&TtrpcContext::default(), pause).await.unwrap();
    assert_eq!(e.state("c1").await.unwrap().status(), api::Status::PAUSED);
    let (c, _) = code(e.create("c1").await);
    assert_eq!(c, Code::ALREADY_EXISTS);
    assert_eq!(code(e.start("nope").await).0, Code::NOT_FOUND);
}

#[tokio::test]
async fn a_dead_vm_ends_every_task_with_the_lost_status() {
    let e = env().await;
    e.create("c1").await.unwrap();
    e.start("c1").await.unwrap();
    e.hv.kill_all().await;
    assert_eq!(e.wait("c1").await.unwrap().exit_status, LOST_EXIT_STATUS);
    e.events.wait_for(topics::TASK_EXIT_EVENT_TOPIC, 1).await;
    assert_eq!(e.delete("c1").await.unwrap().exit_status, LOST_EXIT_STATUS);
}

#[tokio::test]
async fn agent_errors_keep_their_request_code_and_a_failed_first_create_leaves_no_vm() {
    let e = env().await;
    e.hv.agent
        .fail("CreateContainer", Code::INVALID_ARGUMENT, "bad spec");
    let (c, msg) = code(e.create("c1").await);
    assert_eq!(c, Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("CreateContainer") && msg.contains("c1") && msg.contains("bad spec"),
        "{msg}"
    );
    assert_eq!(code(e.state("c1").await).0, Code::NOT_FOUND, "no pod left");
    assert!(e.staging.staged().is_empty(), "nothing staged");
    assert!(e.events.topics().is_empty(), "{:?}", e.events.topics());
}
