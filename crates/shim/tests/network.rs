//! Networking through containerd with real CNI (Debian's
//! containernetworking-plugins: bridge, host-local, loopback, portmap):
//! `ctr run --cni` configures the namespace of the task pid, which is the
//! sandbox's VMM, and the container gets CNI's address. Each test makes its
//! own bridge and subnet and leaves nothing behind (no veth, netns, tap).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    host_get, netns_inode, processes_mentioning, test_net, wait_until, Containerd, IMAGE, RUNTIME,
};

const T: Duration = Duration::from_secs(120);

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn remove_task(c: &Containerd, id: &str) {
    let _ = c.ctr(&["task", "kill", "-s", "KILL", id]);
    assert!(
        wait_until(Duration::from_secs(30), || stdout(&c.ctr(&["task", "ls"]))
            .lines()
            .any(
                |l| l.split_whitespace().next() == Some(id) && l.contains("STOPPED")
            )),
        "task {id} did not stop after SIGKILL: {}",
        c.log_tail()
    );
    assert!(
        c.ctr(&["task", "rm", id]).status.success(),
        "{}",
        c.log_tail()
    );
    assert!(
        c.ctr(&["container", "rm", id]).status.success(),
        "{}",
        c.log_tail()
    );
}

fn assert_nothing_left(c: &Containerd) {
    let state = c.state_root.display().to_string();
    assert!(
        wait_until(Duration::from_secs(15), || processes_mentioning(&state)
            .is_empty()),
        "left behind: {:?}",
        processes_mentioning(&state)
    );
    assert!(
        common::mounts_mentioning(&state).is_empty(),
        "mounts left: {:?}",
        common::mounts_mentioning(&state)
    );
    let netns = c.state_root.join("netns");
    let left: Vec<_> = std::fs::read_dir(&netns)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "namespaces left in {netns:?}: {left:?}");
}

#[test]
fn ctr_run_cni_configures_the_sandbox_namespace_and_the_container_gets_its_address() {
    let Some(c) = Containerd::start() else { return };
    let (net, bridge) = test_net(0);
    let br = c.real_cni("vessel-ctr", &bridge, &net);
    let script = "mkdir -p /www && echo hello-from-ctr-cni > /www/index.html && \
                  httpd -p 80 -h /www && while :; do sleep 1; done";
    let out = c.ctr_with_cni(&[
        "run",
        "--cni",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "cni1",
        "sh",
        "-c",
        script,
    ]);
    assert!(out.status.success(), "{}", c.log_tail());

    // The task pid is a host process in the sandbox's own namespace, where
    // CNI put eth0 with the address it chose.
    let pid = c.task_pid("default", "cni1");
    assert_ne!(
        netns_inode(&pid),
        netns_inode("self"),
        "task pid {pid} is in the host's namespace"
    );
    let o = Command::new("nsenter")
        .args(["-t", &pid, "-n", "ip", "-o", "-4", "addr", "show", "eth0"])
        .output()
        .unwrap();
    let line = stdout(&o);
    let cidr = line
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no CNI address on eth0 of task pid {pid}: {line}"))
        .to_string();
    let ip = cidr.split('/').next().unwrap().to_string();
    assert!(ip.starts_with(&format!("{net}.")), "{cidr}");

    // The guest has that address ...
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "ip",
        "cni1",
        "ip",
        "-o",
        "-4",
        "addr",
    ]);
    assert!(
        stdout(&o).contains(&format!("inet {cidr}")),
        "guest addresses: {}",
        stdout(&o)
    );
    // ... and serves on it, reachable from the host over CNI's bridge.
    let url = format!("http://{ip}:80/");
    let mut got = None;
    assert!(
        wait_until(T, || {
            got = host_get(&url);
            got.is_some()
        }),
        "host -> container {url} failed; {}",
        c.log_tail()
    );
    assert_eq!(got.unwrap(), "hello-from-ctr-cni\n");

    remove_task(&c, "cni1");
    // The namespace went with the sandbox, and the veth with it.
    assert!(
        wait_until(Duration::from_secs(15), || br.ports().is_empty()),
        "veths left on {bridge}: {}",
        br.ports()
    );
    assert_nothing_left(&c);
}

#[test]
fn a_task_whose_start_failed_can_be_killed_and_deleted() {
    let Some(c) = Containerd::start() else { return };
    let (net, bridge) = test_net(1);
    let br = c.real_cni("vessel-bad", &bridge, &net);
    // A plugin before the bridge that adds an interface kind Vessel cannot
    // wire (a bridge): the start fails after CNI ran.
    let cni = c.dir.path().join("c/cni");
    let plugin = cni.join("bin/vessel-test-dummy");
    std::fs::write(
        &plugin,
        "#!/bin/sh\ncat >/dev/null\n\
         case \"$CNI_COMMAND\" in\n\
         ADD) nsenter --net=\"$CNI_NETNS\" ip link add bad0 type bridge && \
              printf '{\"cniVersion\":\"0.4.0\"}' ;;\n\
         VERSION) printf '{\"cniVersion\":\"0.4.0\",\"supportedVersions\":[\"0.4.0\"]}' ;;\n\
         esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let conf = cni.join("conf/10-vessel-bad.conflist");
    let mut list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    list["plugins"]
        .as_array_mut()
        .unwrap()
        .insert(0, serde_json::json!({"type": "vessel-test-dummy"}));
    std::fs::write(&conf, serde_json::to_vec(&list).unwrap()).unwrap();

    let out = c.ctr_with_cni(&[
        "run",
        "--cni",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "bad1",
        "sleep",
        "1000",
    ]);
    assert!(!out.status.success(), "the start should have failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad0"),
        "the error does not name the interface: {err}\ncontainerd's log:\n{}",
        c.log_tail()
    );
    remove_task(&c, "bad1");
    assert!(
        wait_until(Duration::from_secs(15), || br.ports().is_empty()),
        "veths left on {bridge}: {}",
        br.ports()
    );
    assert_nothing_left(&c);
}
