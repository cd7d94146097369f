//! Through containerd: deleting a task whose bind-mounted host directory is
//! kept busy on the host never deletes host files, and leaves nothing mounted.
//! (That a failed unmount removes nothing is asserted on the same staging
//! code, `PodShare::unstage`, in vessel-runtime's share tests.)

mod common;

use std::time::Duration;

use common::{processes_mentioning, wait_until, Containerd, IMAGE, RUNTIME};

const T: Duration = Duration::from_secs(120);

#[test]
fn deleting_a_task_keeps_host_files_of_a_busy_bind_mount() {
    let Some(c) = Containerd::start() else { return };
    let data = c.dir.path().join("data");
    let files = vessel_testutil::HostFiles::create(&data);
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let out = c.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--mount",
        &mount,
        IMAGE,
        "dl1",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "{}", c.log_tail());

    // The staged bind mount in the pod's share, kept busy by a host process
    // with its cwd inside it and an open fd on a host file.
    let share = c.state_root.join("shared/dl1/dl1");
    let staged = || {
        std::fs::read_dir(&share)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("a.txt").is_file())
    };
    assert!(wait_until(T, || staged().is_some()), "{}", c.log_tail());
    let mut busy = std::process::Command::new("/bin/sh")
        .args(["-c", "exec 3<a.txt; exec sleep 600"])
        .current_dir(staged().unwrap())
        .spawn()
        .unwrap();

    assert!(c
        .ctr(&["task", "kill", "-s", "KILL", "dl1"])
        .status
        .success());
    assert!(
        wait_until(T, || String::from_utf8_lossy(
            &c.ctr(&["task", "ls"]).stdout
        )
        .lines()
        .any(|l| l.starts_with("dl1") && l.contains("STOPPED"))),
        "{}",
        c.log_tail()
    );
    assert!(c.ctr(&["task", "rm", "dl1"]).status.success());
    assert!(c.ctr(&["container", "rm", "dl1"]).status.success());
    assert!(files.intact(), "host files lost when the task was deleted");
    let _ = busy.kill();
    let _ = busy.wait();
    let state = c.state_root.display().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || common::mounts_mentioning(
            &state
        )
        .is_empty()),
        "mounts left: {:?}",
        common::mounts_mentioning(&state)
    );
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(&state)
            .is_empty()),
        "left behind: {:?}",
        processes_mentioning(&state)
    );
    assert!(files.intact());
}
