//! The CLI's operations (`vessel start`, `kill`, `pause`, `resume`, `ps`,
//! `events --stats`, `exec`) as the CLI runs them ([`ops`]), against a
//! supervisor serving its control socket over a pod on the fakes: the fake
//! hypervisor and agent of vessel-testutil and vessel-runtime's
//! [`FakeStaging`]. No root, QEMU, KVM or guest; the supervisor runs in this
//! process (its pid is this test's), the real one is tested end to end by
//! the CLI's suites.

use std::path::PathBuf;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use vessel_runtime::container::control::{Call, Reply, Request};
use vessel_runtime::container::state::{now_rfc3339, process_start_time};
use vessel_runtime::container::{ops, supervisor, ContainerError, State, Status, CONTROL_SOCKET};
use vessel_runtime::fake::FakeStaging;
use vessel_runtime::pod::{CreateRequest, Pod, PodEvent, PodKind, PodSetup, Stdio};
use vessel_runtime::Config;
use vessel_testutil::fake::{FakeHypervisor, FAKE_MEMORY_USAGE};

const ID: &str = "c1";

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    hv: FakeHypervisor,
    staging: FakeStaging,
    pod: Pod,
    events: mpsc::UnboundedReceiver<PodEvent>,
    /// Taken by the test that serves it.
    listener: Option<UnixListener>,
}

impl Env {
    fn dir(&self) -> PathBuf {
        self.root.join(ID)
    }

    fn status(&self) -> Status {
        State::load(&self.dir(), ID).unwrap().status
    }
}

/// A created container `c1` in a pod of one on the fakes, its state as
/// `vessel create` leaves it (the supervisor's pid: this process).
async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let dir = root.join(ID);
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = tmp.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let config = Config {
        state_root: root.clone(),
        boot_timeout_secs: Some(10),
        ..Config::default()
    };
    let (hv, staging) = (FakeHypervisor::default(), FakeStaging::default());
    let setup = PodSetup {
        id: ID.into(),
        kind: PodKind::One,
        vm_root: tmp.path().join("vm"),
        vm_id: ID.into(),
        staging: Box::new(staging.clone()),
        pids_file: None,
        network: None,
    };
    let (tx, events) = mpsc::unbounded_channel();
    let spec = serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "root": {"path": "rootfs"}});
    let pod = Pod::boot_with(&config, &hv, setup, &spec, tx)
        .await
        .unwrap();
    pod.create(CreateRequest {
        id: ID,
        bundle: &bundle,
        rootfs: &bundle.join("rootfs"),
        spec,
        stdio: Stdio::Caller { terminal: false },
    })
    .await
    .unwrap();
    let me = std::process::id();
    let state = State {
        id: ID.into(),
        bundle: bundle.clone(),
        rootfs: bundle.join("rootfs"),
        status: Status::Created,
        pid: me,
        pid_start_time: process_start_time(me).unwrap(),
        guest_pid: 100,
        created: now_rfc3339(),
        annotations: Default::default(),
        exit_status: None,
        vm_dir: tmp.path().join("vm").join(ID),
        vm_root: tmp.path().join("vm"),
        execs: Vec::new(),
    };
    state.save(&dir).unwrap();
    let listener = UnixListener::bind(dir.join(CONTROL_SOCKET)).unwrap();
    Env {
        _tmp: tmp,
        root,
        hv,
        staging,
        pod,
        events,
        listener: Some(listener),
    }
}

fn wrong_state(r: Result<impl std::fmt::Debug, ContainerError>) -> (Status, &'static str) {
    match r {
        Err(ContainerError::WrongState { status, op, .. }) => (status, op),
        other => panic!("not a status refusal: {other:?}"),
    }
}

/// The supervisor serving `$e`'s control socket (in `$dir`) until init
/// exits or a shutdown; never stopped from outside.
macro_rules! serving {
    ($e:ident, $dir:ident) => {
        supervisor::serve(
            ID,
            &$dir,
            $e.listener.take(),
            &$e.pod,
            &mut $e.events,
            std::future::pending(),
        )
    };
}

fn agent_was_asked(hv: &FakeHypervisor, rpc: &str) -> bool {
    hv.agent.calls().iter().any(|c| c.starts_with(rpc))
}

#[tokio::test]
async fn operations_go_through_the_pod_with_its_status_guards() {
    let mut e = env().await;
    let (root, dir, hv) = (e.root.clone(), e.dir(), e.hv.clone());
    let server = serving!(e, dir);
    let client = async {
        // Created: the pod refuses a pause before the agent is asked.
        let err = wrong_state(ops::pause(&root, ID).await);
        assert_eq!(err, (Status::Created, "pause"));
        assert!(!agent_was_asked(&hv, "PauseContainer"));
        assert_eq!(ops::processes(&root, ID).await.unwrap(), [1]);
        assert_eq!(wrong_state(ops::stats(&root, ID).await).0, Status::Created);

        ops::start(&root, ID).await.unwrap();
        assert_eq!(wrong_state(ops::start(&root, ID).await).0, Status::Running);
        let stats = ops::stats(&root, ID).await.unwrap();
        assert_eq!(stats["memory"]["usage"]["usage"], FAKE_MEMORY_USAGE);

        ops::pause(&root, ID).await.unwrap();
        assert!(agent_was_asked(&hv, "PauseContainer"));
        assert_eq!(wrong_state(ops::pause(&root, ID).await).0, Status::Paused);
        ops::resume(&root, ID).await.unwrap();
        assert_eq!(wrong_state(ops::resume(&root, ID).await).0, Status::Running);

        // SIGTERM: the fake init exits with 128 + 15.
        ops::kill(&root, ID, 15, false).await.unwrap();
    };
    let (status, ()) = tokio::join!(server, client);
    assert_eq!(status, 143, "the supervisor ends with init's status");
    assert!(!e.dir().join(CONTROL_SOCKET).exists(), "the socket is gone");
    assert_eq!(
        e.status(),
        Status::Running,
        "state.json until the exit file"
    );
    assert_eq!(
        wrong_state(ops::kill(&e.root, ID, 9, false).await),
        (Status::Stopped, "kill"),
        "a supervisor that no longer serves: stopped"
    );
    e.pod.delete(ID, None).await.unwrap();
    e.pod.stop().await;
    assert!(e.staging.staged().is_empty() && e.staging.removed());
}

#[tokio::test]
async fn pause_and_resume_keep_the_state_file_and_the_pod_in_step() {
    let mut e = env().await;
    let (root, dir) = (e.root.clone(), e.dir());
    let server = serving!(e, dir);
    let client = async {
        ops::start(&root, ID).await.unwrap();
        ops::pause(&root, ID).await.unwrap();
        let state = State::load(&dir, ID).unwrap().status;
        assert_eq!(state, Status::Paused);
        // An exec into a paused container is refused by the pod.
        let exec = Request::Exec {
            exec_id: "x1".into(),
            process: serde_json::json!({"args": ["true"]}),
            terminal: false,
        };
        let refused = Call::send(&dir, &exec, Duration::from_secs(10))
            .await
            .unwrap()
            .0;
        assert_eq!(
            refused,
            Reply::Refused {
                status: Status::Paused
            }
        );
        ops::resume(&root, ID).await.unwrap();
        assert_eq!(State::load(&dir, ID).unwrap().status, Status::Running);
        let shutdown = Call::send(&dir, &Request::Shutdown, Duration::from_secs(10));
        assert_eq!(shutdown.await.unwrap().0, Reply::Done);
    };
    let (status, ()) = tokio::join!(server, client);
    assert_eq!(
        status, 137,
        "a shutdown ends the container as SIGKILL would"
    );
    e.pod.stop().await;
}

#[tokio::test]
async fn an_exec_connection_carries_the_exit_and_the_exec_is_forgotten() {
    let mut e = env().await;
    let (root, dir, hv) = (e.root.clone(), e.dir(), e.hv.clone());
    let server = serving!(e, dir);
    let pod = &e.pod;
    let pod_exec = |pod: &Pod| pod.process(ID, Some("x1")).is_ok();
    let client = async {
        ops::start(&root, ID).await.unwrap();
        let exec = Request::Exec {
            exec_id: "x1".into(),
            process: serde_json::json!({"args": ["sh", "-c", "exit 5"]}),
            terminal: false,
        };
        let (reply, mut call) = Call::send(&dir, &exec, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            matches!(reply, Reply::Started { pid } if pid > 0),
            "{reply:?}"
        );
        assert!(pod_exec(pod), "the pod tracks the exec");
        // Other requests are served while the exec runs.
        assert_eq!(ops::processes(&root, ID).await.unwrap(), [1]);
        hv.agent.exit(ID, "x1", 5);
        assert_eq!(call.next().await.unwrap(), Reply::Exited { status: 5 });
        let forgotten = async {
            while pod_exec(pod) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), forgotten)
            .await
            .expect("the exec is forgotten after its exit");
        // A request the supervisor cannot read fails alone.
        let bad = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::UnixStream::connect(dir.join(CONTROL_SOCKET))
                .await
                .unwrap();
            s.write_all(b"{\"op\":\"reboot\"}\n").await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(bad.await.contains("\"reply\":\"failed\""));
        ops::kill(&root, ID, 9, false).await.unwrap();
    };
    let (status, ()) = tokio::join!(server, client);
    assert_eq!(status, 137);
    e.pod.stop().await;
}
