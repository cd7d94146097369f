//! The agent policy through containerd's CRI: with a policy that forbids exec
//! and allows two containers (`[agent] policy` in the shim's config.toml), a
//! pod and its container run, a third container is denied, and ExecSync fails with the agent's "denied by the sandbox's agent policy"
//! (gRPC code PermissionDenied from the shim; containerd 1.6 reports Unknown).

mod common;

use common::cri::*;
use common::Containerd;

#[tokio::test(flavor = "multi_thread")]
async fn a_strict_policy_denies_exec_sync_and_a_container_past_the_limit() {
    let Some(c) = Containerd::start() else { return };
    // The shim reads its config when containerd starts it for the pod.
    let policy = c.dir.path().join("policy.toml");
    // The pod's sandbox (pause) container and one more.
    std::fs::write(&policy, "version = 1\nexec = false\nmax_containers = 2\n").unwrap();
    let config = c.dir.path().join("vessel.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[agent]\npolicy = {:?}\n",
        policy.display().to_string()
    ));
    std::fs::write(&config, text).unwrap();

    let mut rt = connect(&c.sock).await;
    let cfg = pod_config("nx", &c.dir.path().join("logs"));
    let pod = run_pod(&mut rt, &cfg).await;
    let a = start_container(&mut rt, &pod, &cfg, "a", &["sleep", "1000"]).await;
    assert_eq!(
        status(&mut rt, &a).await.state,
        ContainerState::ContainerRunning as i32
    );
    let err = rt
        .exec_sync(ExecSyncRequest {
            container_id: a.clone(),
            cmd: vec!["echo".into(), "should-not-run".into()],
            timeout: 30,
        })
        .await
        .expect_err("ExecSync must be denied");
    eprintln!("ExecSync: {:?}: {}", err.code(), err.message());
    assert!(
        err.message()
            .contains("ExecProcess denied by the sandbox's agent policy"),
        "{err:?}"
    );
    // The shim answers PERMISSION_DENIED (tests/error_mapping.rs). containerd 1.6
    // passes on only the codes its errdefs knows (InvalidArgument, NotFound,
    // AlreadyExists, FailedPrecondition, Unavailable, Unimplemented) and makes any
    // other one Unknown, message kept; containerd 2's errgrpc keeps PermissionDenied.
    assert!(
        matches!(
            err.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unknown
        ),
        "{err:?}"
    );
    assert_eq!(
        status(&mut rt, &a).await.state,
        ContainerState::ContainerRunning as i32,
        "a denied exec harms nothing"
    );

    // A third container in the VM is past max_containers.
    let b = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("b", &["sleep", "1000"])),
            sandbox_config: Some(cfg.clone()),
        })
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    let err = rt
        .start_container(StartContainerRequest {
            container_id: b.clone(),
        })
        .await
        .expect_err("a third container must be denied");
    assert!(
        err.message().contains(
            "CreateContainer (a container beyond max_containers = 2) denied by the sandbox's agent policy"
        ),
        "{err:?}"
    );
    assert_eq!(
        status(&mut rt, &a).await.state,
        ContainerState::ContainerRunning as i32,
        "the denied container harms the others nothing"
    );

    let sockets = shim_sockets(&c);
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
}
