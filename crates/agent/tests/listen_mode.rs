//! The agent outside a VM (`--listen unix://<path>`): ttrpc API on the path,
//! stdio streams on `<path>.stdio`. Runs a container on the host when the
//! host's cgroups let libcontainer do it (root needed); skips that part loudly
//! otherwise.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context;
use vessel_protocol::agent::{
    ContainerRequest, CreateContainerRequest, ProcessRequest, RemoveContainerRequest, StdioConfig,
};
use vessel_protocol::agent_ttrpc::AgentClient;
use vessel_protocol::health::CheckRequest;
use vessel_protocol::health_ttrpc::HealthClient;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

async fn stdio(sock: &Path, header: &str) -> (String, UnixStream) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(header.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.unwrap() == 0 || b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
    }
    (String::from_utf8(reply).unwrap(), s)
}

#[tokio::test]
async fn api_and_stdio_on_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("agent.sock");
    let stdio_sock = dir.path().join("agent.sock.stdio");
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_vessel-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", api.display()))
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .spawn()
            .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !(api.exists() && stdio_sock.exists()) {
        assert!(Instant::now() < end, "agent did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", api.display()))
        .await
        .unwrap();
    let health = HealthClient::new(client.clone());
    health.check(ctx(), &CheckRequest::new()).await.unwrap();
    let agent = AgentClient::new(client);

    let e = agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(format!("{e:?}").contains("NOT_FOUND"), "{e:?}");
    let (reply, _) = stdio(&stdio_sock, "STDIO nope - stdout\n").await;
    assert_eq!(reply, "ERR no container nope");
    let (reply, _) = stdio(&stdio_sock, &format!("{}\n", "x".repeat(400))).await;
    assert!(reply.starts_with("ERR stdio header longer"), "{reply}");

    // A real container on the host, when possible.
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIPPED host container: no busybox");
        return;
    };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED host container: not root");
        return;
    }
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", "echo hi; exit 3"], "cwd": "/", "env": ["PATH=/bin"],
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": rootfs},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "network"}]}
    });
    let req = CreateContainerRequest {
        container_id: "host1".into(),
        spec_json: serde_json::to_vec(&spec).unwrap(),
        stdio: Some(StdioConfig {
            stdout: true,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    if let Err(e) = agent.create_container(ctx(), &req).await {
        eprintln!("SKIPPED host container: libcontainer cannot create here: {e:?}");
        return;
    }
    let (reply, out) = stdio(&stdio_sock, "STDIO host1 - stdout\n").await;
    assert_eq!(reply, "OK");
    let creq = ContainerRequest {
        container_id: "host1".into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &creq).await.unwrap();
    let mut out = out;
    let mut text = String::new();
    out.read_to_string(&mut text).await.unwrap();
    assert_eq!(text, "hi\n");
    let st = agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "host1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(st.exit_status, 3);
    agent
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "host1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    eprintln!("ok: container on the host via --listen");
}
