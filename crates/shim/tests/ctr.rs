//! `ctr` against a private containerd 1.6 with the Vessel shim: run, exit
//! codes, exec, ps, pause/resume, metrics, kill, terminal, and nothing left behind.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{processes_mentioning, wait_until, Containerd, IMAGE, RUNTIME};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn assert_clean(c: &Containerd) {
    let state = c.state_root.display().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&state)
            .is_empty()),
        "left behind: {:?}",
        processes_mentioning(&state)
    );
    assert!(
        common::mounts_mentioning(&state).is_empty(),
        "mounts left: {:?}",
        common::mounts_mentioning(&state)
    );
}

#[test]
fn run_echo_hi_and_exit_codes() {
    let Some(c) = Containerd::start() else { return };
    let out = c.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        "hi1",
        "echo",
        "hi",
    ]);
    assert!(out.status.success(), "{}", c.log_tail());
    assert_eq!(stdout(&out), "hi\n");

    let out = c.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        "exit7",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", c.log_tail());
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_clean(&c);
}

#[test]
fn exec_ps_pause_metrics_kill() {
    let Some(c) = Containerd::start() else { return };
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "bg",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", c.log_tail());
    // The pod's host processes, the shim included, are in its host cgroup.
    let cgroup = vessel_runtime::limits::cgroup_name(&c.state_root.join("bg"));
    let cg = vessel_cgroup::Cgroup::open(Path::new(vessel_cgroup::CGROUP_ROOT), &cgroup)
        .expect("the pod has no host cgroup");
    let shim: u32 = common::cri::shims(&c)[0]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let host = vessel_testutil::self_and_descendants(shim);
    let procs = cg.procs();
    assert!(host.len() >= 5, "shim, QEMU, virtiofsd x2, vsock: {host:?}");
    assert!(
        host.iter().all(|p| procs.contains(&(*p as i32))),
        "{host:?} not all in {procs:?}"
    );

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "bg",
        "sh",
        "-c",
        "echo from-exec; exit 3",
    ]);
    assert_eq!(stdout(&out), "from-exec\n", "{}", c.log_tail());
    assert_eq!(out.status.code(), Some(3));

    let out = c.ctr(&["task", "ps", "bg"]);
    assert!(out.status.success());
    // Header plus at least the init process (a guest pid).
    assert!(stdout(&out).lines().count() >= 2, "{}", stdout(&out));

    let task_line = |c: &Containerd| {
        stdout(&c.ctr(&["task", "ls"]))
            .lines()
            .find(|l| l.starts_with("bg "))
            .unwrap_or_default()
            .to_string()
    };
    assert!(c.ctr(&["task", "pause", "bg"]).status.success());
    assert!(task_line(&c).contains("PAUSED"), "{}", task_line(&c));
    assert!(c.ctr(&["task", "resume", "bg"]).status.success());
    assert!(task_line(&c).contains("RUNNING"), "{}", task_line(&c));
    let out = c.ctr(&["task", "metrics", "bg"]);
    assert!(stdout(&out).contains("pids.current"), "{}", stdout(&out));

    let out = c.ctr(&["task", "kill", "-s", "KILL", "bg"]);
    assert!(out.status.success());
    assert!(
        wait_until(Duration::from_secs(10), || stdout(&c.ctr(&["task", "ls"]))
            .lines()
            .any(|l| l.starts_with("bg") && l.contains("STOPPED"))),
        "{}",
        c.log_tail()
    );
    assert!(c.ctr(&["task", "rm", "bg"]).status.success());
    assert!(c.ctr(&["container", "rm", "bg"]).status.success());
    assert_clean(&c);
    assert!(
        wait_until(Duration::from_secs(10), || {
            vessel_cgroup::Cgroup::open(Path::new(vessel_cgroup::CGROUP_ROOT), &cgroup).is_none()
        }),
        "cgroup vessel/{cgroup} left"
    );
}

#[test]
fn terminal() {
    let Some(c) = Containerd::start() else { return };
    // ctr -t needs a terminal on its stdin: script(1) gives it one.
    let cmd = format!(
        "ctr -a {} run -t --runtime {RUNTIME} --rm {IMAGE} tty1 sh -c 'tty; test -t 0 && echo is-a-tty'",
        c.sock.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = stdout(&out);
    eprintln!("script: {} {text:?}", out.status);
    assert!(out.status.success(), "{}", c.log_tail());
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("is-a-tty"), "{text:?}");
    assert_clean(&c);
}
