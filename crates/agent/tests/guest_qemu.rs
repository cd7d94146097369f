//! End-to-end: the agent as PID 1 of a real guest (QEMU/TCG), driven over
//! ttrpc and stdio streams the way the host runtime drives it.
//!
//! Needs build/guest/vmlinux, the static agent
//! (target-agent/x86_64-unknown-linux-gnu/release/vessel-agent or
//! $VESSEL_GUEST_AGENT), qemu-system-x86_64, vhost-device-vsock and
//! busybox-static; skips loudly without them.

mod guest;

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use ttrpc::context;
use vessel_protocol::agent::{
    state_container_response::Status, ContainerRequest, CreateContainerRequest, ExecProcessRequest,
    GetOOMEventRequest, ProcessRequest, RemoveContainerRequest, ReseedRandomRequest,
    ResizeTtyRequest, SetTimeRequest, SignalProcessRequest, StdioConfig, Storage,
    UpdateContainerRequest, WaitProcessResponse,
};
use vessel_protocol::stdio::StdioStream;

use guest::{read_all, Guest, ROOTFS};

/// 64 characters, like a containerd exec id: socket paths must stay short.
const LONG_EXEC: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

fn process(args: &[&str], terminal: bool) -> Value {
    json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true,
        // As podman/docker on an AppArmor host write it; the guest has none.
        "apparmorProfile": "containers-default-0.50.1"
    })
}

fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process(args, false),
        "root": {"path": ROOTFS, "readonly": false},
        "hostname": "vessel-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/host-only"}
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn stdio(stdin: bool, stdout: bool, stderr: bool) -> StdioConfig {
    StdioConfig {
        stdin,
        stdout,
        stderr,
        ..Default::default()
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

impl Guest {
    async fn create(&self, id: &str, spec: &Value, io: StdioConfig) -> ttrpc::Result<u32> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            spec_json: serde_json::to_vec(spec).unwrap(),
            storages: vec![Storage {
                source: "rootfs0".into(),
                fstype: "9p".into(),
                options: vec!["trans=virtio,version=9p2000.L,msize=512000".into()],
                mount_point: ROOTFS.into(),
                ..Default::default()
            }],
            stdio: Some(io).into(),
            ..Default::default()
        };
        Ok(self.agent.create_container(ctx(), &req).await?.pid)
    }

    async fn start(&self, id: &str) {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent.start_container(ctx(), &req).await.unwrap();
    }

    async fn wait(&self, id: &str, exec: &str) -> WaitProcessResponse {
        let req = ProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.agent.wait_process(ctx(), &req).await.unwrap()
    }

    async fn signal(&self, id: &str, exec: &str, signal: u32) {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            signal,
            ..Default::default()
        };
        self.agent.signal_process(ctx(), &req).await.unwrap();
    }

    async fn remove(&self, id: &str, force: bool) -> ttrpc::Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            force,
            ..Default::default()
        };
        self.agent.remove_container(ctx(), &req).await.map(drop)
    }

    async fn state(&self, id: &str) -> Status {
        let req = ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let st = self.agent.state_container(ctx(), &req).await.unwrap();
        st.status.enum_value_or_default()
    }

    /// Runs `args` as a container; returns (stdout, stderr, exit status).
    async fn run(&self, id: &str, spec: &Value) -> (String, String, WaitProcessResponse) {
        self.create(id, spec, stdio(false, true, true))
            .await
            .unwrap();
        let out = self.stdio(id, None, StdioStream::Stdout).await;
        let err = self.stdio(id, None, StdioStream::Stderr).await;
        self.start(id).await;
        let out = tokio::spawn(read_all(out));
        let err = tokio::spawn(read_all(err));
        let status = self.wait(id, "").await;
        let out = String::from_utf8(out.await.unwrap()).unwrap();
        let err = String::from_utf8(err.await.unwrap()).unwrap();
        self.remove(id, false).await.unwrap();
        (out, err, status)
    }
}

fn code(e: &ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_a_real_guest() {
    let g = match guest::boot().await {
        Ok(g) => g,
        Err(why) => return vessel_testutil::skip("containers_in_a_real_guest", &why),
    };
    let g = std::sync::Arc::new(g);
    let run = tokio::spawn({
        let g = g.clone();
        async move { cases(&g).await }
    });
    match tokio::time::timeout(Duration::from_secs(600), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("cases failed: {e}; guest console:\n{}", g.console()),
        Err(_) => panic!("cases timed out; guest console:\n{}", g.console()),
    }
}

async fn cases(g: &Guest) {
    // echo: stdout and exit 0, hostname and env applied.
    let (out, err, st) = g
        .run(
            "echo",
            &spec(&["sh", "-c", "echo hi; hostname; echo $TERM >&2"]),
        )
        .await;
    assert_eq!(out, "hi\nvessel-test\n", "stderr: {err}");
    assert_eq!(err, "xterm\n");
    assert_eq!(st.exit_status, 0);
    eprintln!("ok: echo");

    // Loopback in a container with its own network namespace (no path): a
    // listener and a client on 127.0.0.1 in one container ("Network is
    // unreachable" while lo is down).
    let mut own_net = spec(&[
        "sh",
        "-c",
        "nc -l -p 7777 -e echo pong & \
         for i in $(seq 300); do \
           out=$(nc 127.0.0.1 7777 </dev/null 2>&1) && [ \"$out\" = pong ] && { echo $out; exit 0; }; \
           sleep 0.1; \
         done; echo \"last: $out\"; ip link show lo; exit 1",
    ]);
    own_net["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "network"}
    ]);
    let (out, err, st) = g.run("loopback", &own_net).await;
    assert_eq!(
        (out.as_str(), st.exit_status),
        ("pong\n", 0),
        "stderr: {err}"
    );
    eprintln!("ok: loopback");

    // Exit code propagation.
    let (_, _, st) = g.run("exit3", &spec(&["sh", "-c", "exit 3"])).await;
    assert_eq!((st.exit_status, st.signal), (3, 0));
    eprintln!("ok: exit 3");

    // 10 MiB of stdout, attached after start: buffered, then backpressure,
    // all of it delivered before WaitProcess returns.
    let big: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(g.rootfs.join("data/big"), &big).unwrap();
    g.create(
        "big",
        &spec(&["cat", "/data/big"]),
        stdio(false, true, false),
    )
    .await
    .unwrap();
    g.start("big").await;
    let wait = {
        let agent = g.agent.clone();
        tokio::spawn(async move {
            let req = ProcessRequest {
                container_id: "big".into(),
                ..Default::default()
            };
            agent.wait_process(ctx(), &req).await.unwrap()
        })
    };
    let out = g.stdio("big", None, StdioStream::Stdout).await;
    let got = read_all(out).await;
    assert_eq!(got.len(), big.len());
    assert!(got == big, "10 MiB stdout corrupted");
    assert_eq!(wait.await.unwrap().exit_status, 0);
    g.remove("big", false).await.unwrap();
    eprintln!("ok: 10 MiB stdout");

    // stdin piped in, half-close ends it.
    g.create("stdin", &spec(&["cat"]), stdio(true, true, false))
        .await
        .unwrap();
    let mut input = g.stdio("stdin", None, StdioStream::Stdin).await;
    let out = g.stdio("stdin", None, StdioStream::Stdout).await;
    g.start("stdin").await;
    input.write_all(b"ping\n").await.unwrap();
    input.shutdown().await.unwrap();
    assert_eq!(read_all(out).await, b"ping\n");
    assert_eq!(g.wait("stdin", "").await.exit_status, 0);
    g.remove("stdin", false).await.unwrap();
    eprintln!("ok: stdin");

    // A long-running container: exec, ps, stats, pause/resume, SIGTERM trap.
    let trap = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done";
    let mut long = spec(&["sh", "-c", trap]);
    long["linux"]["resources"] = json!({
        "pids": {"limit": 50},
        "cpu": {"quota": 50000, "period": 100000}
    });
    g.create("long", &long, stdio(false, true, false))
        .await
        .unwrap();
    let mut out = g.stdio("long", None, StdioStream::Stdout).await;
    g.start("long").await;
    let mut ready = [0u8; 6];
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::AsyncReadExt::read_exact(&mut out, &mut ready),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&ready, b"ready\n");
    assert_eq!(g.state("long").await, Status::RUNNING);

    let exec = |exec_id: &str, args: &[&str]| ExecProcessRequest {
        container_id: "long".into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process(args, false)).unwrap(),
        stdio: Some(stdio(false, true, false)).into(),
        ..Default::default()
    };
    g.agent
        .exec_process(ctx(), &exec("e1", &["sh", "-c", "echo exec-ok; hostname"]))
        .await
        .unwrap();
    let eout = g.stdio("long", Some("e1"), StdioStream::Stdout).await;
    assert_eq!(read_all(eout).await, b"exec-ok\nvessel-test\n");
    assert_eq!(g.wait("long", "e1").await.exit_status, 0);
    let dup = g
        .agent
        .exec_process(ctx(), &exec("e1", &["true"]))
        .await
        .unwrap_err();
    assert_eq!(code(&dup), ttrpc::Code::ALREADY_EXISTS);
    g.agent
        .exec_process(ctx(), &exec("e2", &["sh", "-c", "exit 5"]))
        .await
        .unwrap();
    let _ = g.stdio("long", Some("e2"), StdioStream::Stdout).await;
    assert_eq!(g.wait("long", "e2").await.exit_status, 5);
    eprintln!("ok: exec");

    // Exec with a terminal.
    let mut tproc = process(&["sh", "-c", "tty; echo exec-tty-ok"], true);
    tproc["consoleSize"] = json!({"height": 40, "width": 120});
    let treq = ExecProcessRequest {
        container_id: "long".into(),
        exec_id: LONG_EXEC.into(),
        process_json: serde_json::to_vec(&tproc).unwrap(),
        ..Default::default()
    };
    g.agent.exec_process(ctx(), &treq).await.unwrap();
    let t = g.stdio("long", Some(LONG_EXEC), StdioStream::Tty).await;
    let text = String::from_utf8_lossy(&read_all(t).await).into_owned();
    assert!(
        text.contains("/dev/pts/") && text.contains("exec-tty-ok"),
        "{text:?}"
    );
    assert_eq!(g.wait("long", LONG_EXEC).await.exit_status, 0);
    eprintln!("ok: exec -t");

    // A second container while the first runs: user, groups, cwd, umask,
    // rlimits, sysctl, env, tmpfs and a read-only bind mount.
    std::fs::write(g.rootfs.join("data/hello"), "from-bind\n").unwrap();
    let script = "id; pwd; umask; ulimit -n; cat /proc/sys/kernel/msgmax; \
                  cat /proc/sys/net/ipv4/ip_unprivileged_port_start; echo $FOO; \
                  cat /mnt/hello; touch /mnt/x 2>/dev/null || echo bind-ro; \
                  touch /tmp/ok && echo tmpfs-rw; \
                  test -f /sys/fs/cgroup/cgroup.procs && echo cgroupfs";
    let mut f = spec(&["sh", "-c", script]);
    f["process"]["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 23});
    f["process"]["cwd"] = json!("/tmp");
    f["process"]["env"] = json!(["PATH=/bin", "FOO=bar"]);
    f["linux"]["sysctl"] = json!({
        "kernel.msgmax": "4096",
        "net.ipv4.ip_unprivileged_port_start": "0"
    });
    // As podman and docker write it: cgroup namespace + read-only cgroup mount.
    f["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "cgroup"}));
    f["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
        "options": ["ro", "nosuid", "noexec", "nodev", "relatime"]
    }));
    f["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/mnt", "type": "bind",
        "source": format!("{ROOTFS}/data"), "options": ["rbind", "ro"]
    }));
    let (fout, err, st) = g.run("features", &f).await;
    assert_eq!(st.exit_status, 0, "{fout} {err}");
    let lines: Vec<&str> = fout.lines().collect();
    assert_eq!(
        lines,
        [
            "uid=1000 gid=1000 groups=10,20",
            "/tmp",
            "0027",
            "1024",
            "4096",
            "0",
            "bar",
            "from-bind",
            "bind-ro",
            "tmpfs-rw",
            "cgroupfs"
        ],
        "stderr: {err}"
    );
    eprintln!("ok: user, cwd, umask, rlimits, sysctl, env, mounts");

    let creq = ContainerRequest {
        container_id: "long".into(),
        ..Default::default()
    };
    let pids = g.agent.list_processes(ctx(), &creq).await.unwrap().pids;
    assert!(!pids.is_empty(), "no pids");
    let stats = g.agent.stats_container(ctx(), &creq).await.unwrap();
    assert!(stats.memory.usage_bytes > 0, "{stats:?}");
    assert!(stats.pids.current > 0, "{stats:?}");
    assert_eq!(stats.pids.limit, 50, "{stats:?}");
    g.agent.pause_container(ctx(), &creq).await.unwrap();
    assert_eq!(g.state("long").await, Status::PAUSED);
    g.agent.resume_container(ctx(), &creq).await.unwrap();
    assert_eq!(g.state("long").await, Status::RUNNING);
    eprintln!("ok: ps, stats, pause/resume");

    // UpdateContainer: applied to the cgroup; a bad or unsupported value is
    // refused before anything is written.
    let update = |resources: Value| UpdateContainerRequest {
        container_id: "long".into(),
        resources_json: serde_json::to_vec(&resources).unwrap(),
        ..Default::default()
    };
    let limits = json!({"memory": {"limit": 64 << 20}, "pids": {"limit": 60},
                        "devices": [{"allow": false, "access": "rwm"}]});
    g.agent
        .update_container(ctx(), &update(limits))
        .await
        .unwrap();
    let stats = g.agent.stats_container(ctx(), &creq).await.unwrap();
    assert_eq!(
        (stats.memory.limit_bytes, stats.pids.limit),
        (64 << 20, 60),
        "{stats:?}"
    );
    for bad in [
        json!({"memory": {"limit": 1 << 20}, "cpu": {"quota": 500}}),
        json!({"memory": {"limit": 1 << 20}, "cpu": {"cpus": "0"}}),
    ] {
        let e = g.agent.update_container(ctx(), &update(bad)).await;
        assert_eq!(code(&e.unwrap_err()), ttrpc::Code::INVALID_ARGUMENT);
    }
    let stats = g.agent.stats_container(ctx(), &creq).await.unwrap();
    assert_eq!(stats.memory.limit_bytes, 64 << 20, "unchanged: {stats:?}");
    eprintln!("ok: update");

    // A pod container: joins long's uts and pid namespaces where its spec
    // names a (host) path, so it sees long's hostname and processes.
    let mut joiner = spec(&["sh", "-c", "hostname; tr '\\0' ' ' </proc/1/cmdline"]);
    joiner["hostname"] = json!("ignored-when-joined");
    joiner["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/4242/ns/pid"},
        {"type": "ipc", "path": "/proc/4242/ns/ipc"},
        {"type": "uts", "path": "/proc/4242/ns/uts"},
        {"type": "mount"},
        {"type": "network", "path": "/var/run/netns/cni-1"}
    ]);
    let join = |id: &str, sandbox: &str| CreateContainerRequest {
        container_id: id.into(),
        spec_json: serde_json::to_vec(&joiner).unwrap(),
        stdio: Some(stdio(false, true, true)).into(),
        share_namespaces_with: sandbox.into(),
        ..Default::default()
    };
    let e = g.agent.create_container(ctx(), &join("j0", "nope")).await;
    assert_eq!(code(&e.unwrap_err()), ttrpc::Code::INVALID_ARGUMENT);
    g.agent
        .create_container(ctx(), &join("joiner", "long"))
        .await
        .unwrap();
    let jout = g.stdio("joiner", None, StdioStream::Stdout).await;
    let jerr = g.stdio("joiner", None, StdioStream::Stderr).await;
    g.start("joiner").await;
    let jout = String::from_utf8(read_all(jout).await).unwrap();
    let jerr = String::from_utf8(read_all(jerr).await).unwrap();
    assert_eq!(g.wait("joiner", "").await.exit_status, 0, "{jout} {jerr}");
    g.remove("joiner", false).await.unwrap();
    assert!(
        jout.starts_with("vessel-test\n") && jout.contains("got-term"),
        "joiner sees long's hostname and its init as pid 1: {jout:?} {jerr:?}"
    );
    eprintln!("ok: share namespaces");

    g.signal("long", "", 15).await;
    assert_eq!(read_all(out).await, b"got-term\n");
    let st = g.wait("long", "").await;
    assert_eq!(st.exit_status, 7);
    assert_eq!(g.state("long").await, Status::STOPPED);
    g.remove("long", false).await.unwrap();
    eprintln!("ok: SIGTERM trap");

    // SIGKILL to every process (kill --all), exec after the container stopped.
    g.create(
        "all",
        &spec(&["sh", "-c", "sleep 1000 & sleep 1000"]),
        stdio(false, false, false),
    )
    .await
    .unwrap();
    g.start("all").await;
    let all = SignalProcessRequest {
        container_id: "all".into(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    g.agent.signal_process(ctx(), &all).await.unwrap();
    assert_eq!(g.wait("all", "").await.exit_status, 137);
    let late = ExecProcessRequest {
        container_id: "all".into(),
        exec_id: "late".into(),
        process_json: serde_json::to_vec(&process(&["true"], false)).unwrap(),
        ..Default::default()
    };
    let e = g.agent.exec_process(ctx(), &late).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
    g.remove("all", false).await.unwrap();
    eprintln!("ok: kill --all, exec into a stopped container refused");

    // SIGKILL: 128 + 9.
    g.create("k9", &spec(&["sleep", "1000"]), stdio(false, false, false))
        .await
        .unwrap();
    g.start("k9").await;
    g.signal("k9", "", 9).await;
    let st = g.wait("k9", "").await;
    assert_eq!((st.exit_status, st.signal), (137, 9));
    g.remove("k9", false).await.unwrap();
    eprintln!("ok: kill -9");

    // Forced removal of a running container.
    g.create(
        "force",
        &spec(&["sleep", "1000"]),
        stdio(false, false, false),
    )
    .await
    .unwrap();
    g.start("force").await;
    let e = g.remove("force", false).await.unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::FAILED_PRECONDITION);
    g.remove("force", true).await.unwrap();
    eprintln!("ok: delete --force");

    // A created, never started container is removed without force.
    g.create("created", &spec(&["true"]), stdio(false, false, false))
        .await
        .unwrap();
    assert_eq!(g.state("created").await, Status::CREATED);
    g.remove("created", false).await.unwrap();
    eprintln!("ok: delete of a created container");

    // Terminal.
    let mut tspec = spec(&["sh", "-c", "tty; echo tty-ok; read x; stty size"]);
    tspec["process"]["terminal"] = json!(true);
    tspec["process"]["consoleSize"] = json!({"height": 30, "width": 100});
    g.create("tty", &tspec, stdio(false, false, false))
        .await
        .unwrap();
    let mut t = g.stdio("tty", None, StdioStream::Tty).await;
    g.start("tty").await;
    let resize = ResizeTtyRequest {
        container_id: "tty".into(),
        rows: 50,
        cols: 132,
        ..Default::default()
    };
    g.agent.resize_tty(ctx(), &resize).await.unwrap();
    t.write_all(b"go\n").await.unwrap();
    let text = String::from_utf8_lossy(&read_all(t).await).into_owned();
    assert!(text.contains("tty-ok"), "{text:?}");
    assert!(!text.contains("not a tty"), "{text:?}");
    assert!(text.contains("50 132"), "{text:?}");
    assert_eq!(g.wait("tty", "").await.exit_status, 0);
    g.remove("tty", false).await.unwrap();
    eprintln!("ok: tty");

    // CloseStdin without a host stdin connection ends `cat`.
    g.create("close", &spec(&["cat"]), stdio(true, false, false))
        .await
        .unwrap();
    g.start("close").await;
    let preq = ProcessRequest {
        container_id: "close".into(),
        ..Default::default()
    };
    g.agent.close_stdin(ctx(), &preq).await.unwrap();
    assert_eq!(g.wait("close", "").await.exit_status, 0);
    g.remove("close", false).await.unwrap();
    eprintln!("ok: close stdin");

    // Rootfs over virtio-fs, as the host runtime shares it.
    if g.virtiofs {
        let mut v = spec(&["cat", "/data/hello"]);
        v["root"]["path"] = json!("/run/vessel/vfs0");
        let storage = Storage {
            source: guest::VIRTIOFS_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: "/run/vessel/vfs0".into(),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            container_id: "vfs".into(),
            spec_json: serde_json::to_vec(&v).unwrap(),
            storages: vec![storage],
            stdio: Some(stdio(false, true, false)).into(),
            ..Default::default()
        };
        g.agent.create_container(ctx(), &req).await.unwrap();
        let out = g.stdio("vfs", None, StdioStream::Stdout).await;
        g.start("vfs").await;
        assert_eq!(read_all(out).await, b"from-bind\n");
        assert_eq!(g.wait("vfs", "").await.exit_status, 0);
        g.remove("vfs", false).await.unwrap();
        eprintln!("ok: virtio-fs rootfs");
    }

    // Snapshot-restore helpers.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let treq = SetTimeRequest {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos(),
        ..Default::default()
    };
    g.agent.set_time(ctx(), &treq).await.unwrap();
    let rreq = ReseedRandomRequest {
        data: vec![0x5a; 64],
        ..Default::default()
    };
    g.agent.reseed_random(ctx(), &rreq).await.unwrap();
    eprintln!("ok: set time, reseed");

    // A startContainer hook runs in the container (its /tmp, its rootfs's
    // /bin/sh) before the process; a prestart hook (host only) does not run.
    let mut hspec = spec(&["sh", "-c", "cat /tmp/hooked; ls /tmp"]);
    hspec["hooks"] = json!({
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no > /tmp/prestart"]}],
        "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "echo hooked in $(hostname) > /tmp/hooked"]}]
    });
    let (out, err, st) = g.run("hooks", &hspec).await;
    assert_eq!(
        (out.as_str(), st.exit_status),
        ("hooked in vessel-test\nhooked\n", 0),
        "stderr: {err}"
    );
    eprintln!("ok: startContainer hook in the container");

    // seccomp denying mkdir.
    let mut sspec = spec(&["sh", "-c", "mkdir /tmp/x && echo made"]);
    sspec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (out, err, st) = g.run("seccomp", &sspec).await;
    assert_ne!(st.exit_status, 0, "mkdir succeeded: {out} {err}");
    assert!(!out.contains("made"));
    eprintln!("ok: seccomp ({})", err.trim());

    // podman's default seccomp profile, as podman passes it.
    match std::fs::read("/usr/share/containers/seccomp.json") {
        Ok(profile) => {
            let mut p = spec(&["sh", "-c", "echo seccomp-default-ok"]);
            p["linux"]["seccomp"] = serde_json::from_slice(&profile).unwrap();
            let (out, err, st) = g.run("podman-seccomp", &p).await;
            assert_eq!(
                (out.as_str(), st.exit_status),
                ("seccomp-default-ok\n", 0),
                "{err}"
            );
            eprintln!("ok: podman default seccomp profile");
        }
        Err(e) => eprintln!("SKIPPED podman seccomp profile: {e}"),
    }

    // Read-only rootfs.
    let mut ro = spec(&["touch", "/data/x"]);
    ro["root"]["readonly"] = json!(true);
    let (_, err, st) = g.run("ro", &ro).await;
    assert_ne!(st.exit_status, 0);
    assert!(err.contains("Read-only"), "{err}");
    eprintln!("ok: readonly rootfs");

    // Memory limit: the OOM kill is reported.
    let mut oom = spec(&[
        "dd",
        "if=/dev/zero",
        "of=/dev/shm/fill",
        "bs=1M",
        "count=200",
    ]);
    oom["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
    oom["mounts"][3]["options"] = json!(["nosuid", "nodev", "mode=1777", "size=300m"]);
    let oom_event = {
        let agent = g.agent.clone();
        tokio::spawn(async move {
            agent
                .get_oom_event(ctx(), &GetOOMEventRequest::default())
                .await
                .unwrap()
        })
    };
    let (_, _, st) = g.run("oom", &oom).await;
    assert_eq!(st.signal, 9, "{st:?}");
    let ev = tokio::time::timeout(Duration::from_secs(30), oom_event)
        .await
        .expect("no OOM event")
        .unwrap();
    assert_eq!(ev.container_id, "oom");
    eprintln!("ok: OOM");

    // Bad input: clear errors, nothing left behind.
    let e = g
        .create(
            "bad",
            &spec(&["/bin/does-not-exist"]),
            stdio(false, false, false),
        )
        .await
        .unwrap_err();
    eprintln!("missing binary: {e:?}");
    let e = g
        .create("bad", &spec(&["true"]), stdio(false, false, false))
        .await
        .map(drop);
    assert!(e.is_ok(), "id not reusable after a failed create: {e:?}");
    let e = g
        .create("bad", &spec(&["true"]), stdio(false, false, false))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::ALREADY_EXISTS);
    g.remove("bad", true).await.unwrap();
    let mut bad_json = CreateContainerRequest {
        container_id: "badjson".into(),
        spec_json: b"{not json".to_vec(),
        ..Default::default()
    };
    let e = g
        .agent
        .create_container(ctx(), &bad_json)
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    bad_json.container_id = "../etc".into();
    let e = g
        .agent
        .create_container(ctx(), &bad_json)
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::INVALID_ARGUMENT);
    let e = g
        .agent
        .wait_process(
            ctx(),
            &ProcessRequest {
                container_id: "nope".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ttrpc::Code::NOT_FOUND);
    let (reply, _) = g.stdio_raw(b"STDIO nope - stdout\n").await;
    assert!(reply.starts_with("ERR no container nope"), "{reply}");
    let (reply, _) = g.stdio_raw(b"garbage\n").await;
    assert!(reply.starts_with("ERR "), "{reply}");
    eprintln!("ok: bad input");
}
