//! Deleting a container never deletes host data, even when the unmount of a
//! staged bind mount fails (real QEMU/TCG guest).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{env, text, VESSEL};

const T: Duration = Duration::from_secs(120);

#[test]
fn delete_keeps_host_files_when_a_bind_unmount_fails() {
    let Some(e) = env() else { return };
    let data = e.dir.path().join("data");
    let files = vessel_testutil::HostFiles::create(&data);
    let mut index = 0;
    let b = e.bundle("b", &["sh", "-c", "cat /data/a.txt; sleep 600"], |c| {
        let m = c["mounts"].as_array_mut().unwrap();
        index = m.len();
        m.push(serde_json::json!({"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}));
    });
    let (out, _) = e.create("dl1", &b);
    assert!(e.run(&["start", "dl1"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        .contains("alpha")));

    // Keep the staged bind mount busy on the host: a process with its cwd
    // inside it and an open fd on a host file.
    let staged = e.root.join(format!("dl1/shared/m{index}"));
    assert!(staged.join("a.txt").is_file(), "{}", staged.display());
    let mut busy = Command::new("/bin/sh")
        .args(["-c", "exec 3<a.txt; exec sleep 600"])
        .current_dir(&staged)
        .spawn()
        .unwrap();
    // The supervisor goes away without cleaning up (its VM dies with it):
    // only `delete` is left to unmount the staging.
    let pid = e.state("dl1").unwrap()["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    e.wait_status("dl1", "stopped", T);

    // `delete` without CAP_SYS_ADMIN: the unmount fails. The error names the
    // staging tree, and not one host file is lost.
    let o = Command::new("setpriv")
        .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin", VESSEL])
        .arg("--config")
        .arg(&e.config)
        .arg("--root")
        .arg(&e.root)
        .args(["delete", "--force", "dl1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("dl1/shared"), "{}", text(&o));
    assert!(files.intact(), "host files lost after a failed unmount");
    assert!(
        staged.join("a.txt").is_file(),
        "the staging is left in place"
    );

    // A delete that may unmount detaches the busy mount; the files stay.
    let o = e.run(&["delete", "--force", "dl1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        files.intact(),
        "host files lost after deleting a busy mount"
    );
    let _ = busy.kill();
    let _ = busy.wait();
    e.assert_clean("dl1");
    assert!(files.intact());
}
