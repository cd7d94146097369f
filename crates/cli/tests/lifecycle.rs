//! End-to-end: the OCI lifecycle through the `vessel` CLI, real guests.

mod common;

use std::time::Duration;

use common::{env, text};

const T: Duration = Duration::from_secs(60);

#[test]
fn run_echo_and_exit_code() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["echo", "hello"], |_| {});
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "echo1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    e.assert_clean("echo1");
    let b = e.bundle(
        "b3",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        |_| {},
    );
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "exit3"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    e.assert_clean("exit3");
}

#[test]
fn create_start_state_delete() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh", "-c", "read x; echo got $x"], |_| {});
    let (out, _) = e.create("c1", &b);
    let s = e.state("c1").unwrap();
    assert_eq!(s["status"], "created");
    assert_eq!(s["id"], "c1");
    assert!(s["pid"].as_u64().unwrap() > 0);
    let o = e.run(&["start", "c1"]);
    assert!(o.status.success(), "{}", text(&o));
    // stdin is /dev/null: read fails, the script still echoes.
    e.wait_status("c1", "stopped", T);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "got\n");
    let o = e.run(&["start", "c1"]);
    assert!(!o.status.success(), "start of a stopped container");
    let o = e.run(&["list", "--format", "json"]);
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(l[0]["id"], "c1");
    let o = e.run(&["delete", "c1"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("c1");
    // A created, never started container is deleted without --force (runc).
    e.create("c2", &b);
    let o = e.run(&["delete", "c2"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("c2");
}

#[test]
fn stdin_is_piped() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh", "-c", "cat; echo done"], |_| {});
    let mut c = e.cmd();
    c.args(["run", "--bundle", b.to_str().unwrap(), "in1"]);
    let o = pipe_through(c, b"line one\nline two\n");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "line one\nline two\ndone\n",
        "{}",
        text(&o)
    );
    e.assert_clean("in1");
}

fn pipe_through(mut c: std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn ten_mib_of_stdout_arrives_intact_before_exit() {
    let Some(e) = env() else { return };
    // 10 MiB of "0123456789abcde\n", then exit 7.
    let b = e.bundle(
        "b",
        &["sh", "-c", "yes 0123456789abcde | head -c 10485760; exit 7"],
        |_| {},
    );
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "big"]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want: Vec<u8> = b"0123456789abcde\n"
        .iter()
        .copied()
        .cycle()
        .take(10 << 20)
        .collect();
    assert_eq!(o.stdout.len(), want.len());
    assert!(o.stdout == want, "content differs");
    e.assert_clean("big");
}

#[test]
fn process_settings_hostname_and_readonly_root() {
    let Some(e) = env() else { return };
    let script = "echo env=$FOO; pwd; id -u; id -g; id -G; hostname; touch /x 2>/dev/null && echo writable || echo readonly";
    let b = e.bundle("b", &["sh", "-c", script], |c| {
        c["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push("FOO=bar".into());
        c["process"]["cwd"] = "/tmp".into();
        c["process"]["user"] =
            serde_json::json!({"uid": 1000, "gid": 1001, "additionalGids": [1002, 1003]});
        c["hostname"] = "vessel-test".into();
        c["root"]["readonly"] = true.into();
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "proc1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "env=bar");
    assert_eq!(lines[1], "/tmp");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "1001");
    let groups: Vec<&str> = lines[4].split(' ').collect();
    assert!(
        groups.contains(&"1002") && groups.contains(&"1003"),
        "{}",
        lines[4]
    );
    assert_eq!(lines[5], "vessel-test");
    assert_eq!(lines[6], "readonly");
}

#[test]
fn tmpfs_and_host_bind_mounts() {
    let Some(e) = env() else { return };
    let rw = e.dir.path().join("rw");
    let ro = e.dir.path().join("ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(ro.join("in.txt"), "from host\n").unwrap();
    let file = e.dir.path().join("single.txt");
    std::fs::write(&file, "a file\n").unwrap();
    let script = "cat /ro/in.txt; cat /single; echo from guest > /rw/out.txt; \
                  touch /ro/x 2>/dev/null && echo ro-writable || echo ro-ok; \
                  echo t > /scratch/t && grep -q tmpfs /proc/mounts && echo tmpfs-ok";
    let b = e.bundle("b", &["sh", "-c", script], |c| {
        let m = c["mounts"].as_array_mut().unwrap();
        m.push(serde_json::json!({"destination": "/rw", "type": "bind", "source": rw, "options": ["rbind", "rw"]}));
        m.push(serde_json::json!({"destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]}));
        m.push(serde_json::json!({"destination": "/single", "type": "bind", "source": file, "options": ["bind", "ro"]}));
        m.push(serde_json::json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}));
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "mnt1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "from host\na file\nro-ok\ntmpfs-ok\n"
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out.txt")).unwrap(),
        "from guest\n"
    );
    assert!(!ro.join("x").exists());
    e.assert_clean("mnt1");
}

#[test]
fn kill_sigterm_trap_and_sigkill() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
        ],
        |_| {},
    );
    let (out, _) = e.create("k1", &b);
    assert!(e.run(&["start", "k1"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        .contains("ready")));
    let o = e.run(&["kill", "k1", "TERM"]);
    assert!(o.status.success(), "{}", text(&o));
    e.wait_status("k1", "stopped", T);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "ready\ngot TERM\n");
    assert!(e.run(&["delete", "k1"]).status.success());
    e.assert_clean("k1");

    let b = e.bundle(
        "b9",
        &["sh", "-c", "trap '' TERM; while :; do sleep 1; done"],
        |_| {},
    );
    let mut child = e
        .cmd()
        .args(["run", "--bundle", b.to_str().unwrap(), "k9"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `vessel run` boots the VM too: wait longer than the boot timeout (120 s in the
    // KVM lane and under TCG), or the test gives up before the runtime would report a
    // slow boot (in the lane, under load, 60 s did not cover boot + create + start).
    e.wait_status("k9", "running", Duration::from_secs(180));
    assert!(e.run(&["kill", "k9", "9"]).status.success());
    assert_eq!(child.wait().unwrap().code(), Some(137));
    e.assert_clean("k9");
}

#[test]
fn two_containers_at_once_and_delete_force() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh", "-c", "echo up; sleep 600"], |_| {});
    let (o1, _) = e.create("a1", &b);
    let (o2, _) = e.create("a2", &b);
    assert!(e.run(&["start", "a1"]).status.success());
    assert!(e.run(&["start", "a2"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&o1)
        .unwrap()
        == "up\n"
        && std::fs::read_to_string(&o2).unwrap() == "up\n"));
    assert_eq!(e.status("a1"), "running");
    assert_eq!(e.status("a2"), "running");
    assert!(
        !e.run(&["delete", "a1"]).status.success(),
        "delete of a running container needs --force"
    );
    for id in ["a1", "a2"] {
        let o = e.run(&["delete", "--force", id]);
        assert!(o.status.success(), "{}", text(&o));
        e.assert_clean(id);
    }
}

#[test]
fn exec_plain_and_pause_resume() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &["sh", "-c", "echo up; while :; do sleep 0.1; done"],
        |_| {},
    );
    let (out, _) = e.create("x1", &b);
    assert!(e.run(&["start", "x1"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        == "up\n"));
    let o = e.run(&[
        "exec",
        "-e",
        "X=1",
        "--cwd",
        "/bin",
        "x1",
        "sh",
        "-c",
        "echo exec $X $(pwd); exit 5",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "exec 1 /bin\n");
    let o = e.run(&["ps", "--format", "json", "x1"]);
    let pids: Vec<u32> = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(!pids.is_empty(), "{}", text(&o));
    assert!(e.run(&["pause", "x1"]).status.success());
    assert_eq!(e.status("x1"), "paused");
    assert!(e.run(&["resume", "x1"]).status.success());
    assert_eq!(e.status("x1"), "running");
    let o = e.run(&["exec", "x1", "true"]);
    assert!(o.status.success(), "exec after resume: {}", text(&o));
    assert!(e.run(&["delete", "--force", "x1"]).status.success());
    e.assert_clean("x1");
}

#[test]
fn hooks_run_on_the_host_and_events_report_stats() {
    let Some(e) = env() else { return };
    let log = e.dir.path().join("hooks.log");
    let hook = |kind: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {kind} $(cat) >> {}", log.display())]});
    let b = e.bundle(
        "b",
        &["sh", "-c", "echo up; while :; do sleep 0.1; done"],
        |c| {
            c["hooks"] = serde_json::json!({
                "prestart": [hook("prestart")],
                "poststart": [hook("poststart")],
                "poststop": [hook("poststop")],
            });
        },
    );
    let (out, _) = e.create("h1", &b);
    assert!(e.run(&["start", "h1"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        == "up\n"));
    let o = e.run(&["events", "--stats", "h1"]);
    assert!(o.status.success(), "{}", text(&o));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ev["type"], "stats");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0,
        "{ev}"
    );
    assert!(e.run(&["delete", "--force", "h1"]).status.success());
    e.assert_clean("h1");
    let log = std::fs::read_to_string(&log).unwrap();
    let kinds: Vec<&str> = log.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(kinds, ["prestart", "poststart", "poststop"], "{log}");
    let state: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap().split_once(' ').unwrap().1).unwrap();
    assert_eq!(state["id"], "h1");
    assert_eq!(state["status"], "created");
}

#[test]
fn run_forwards_sigterm_to_the_container() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.1; done",
        ],
        |_| {},
    );
    let out = e.dir.path().join("run.out");
    let mut child = e
        .cmd()
        .args(["run", "--bundle", b.to_str().unwrap(), "fw1"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        .contains("ready")));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(42));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "ready\ngot TERM\n");
    e.assert_clean("fw1");
}
