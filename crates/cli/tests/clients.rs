//! End-to-end: real clients drive `vessel` as their runc — containerd's runc
//! shim (`ctr run --runc-binary`) and podman (`--runtime`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{env, text, unmount_under, wait_until, VESSEL};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Skips (or fails in CI) when a client tool is missing.
fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("SKIPPED: {tool} is not installed (scripts/install-deps.sh)");
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("\n!!!!! {msg}\n");
    }
    ok
}

const IMAGE: &str = "localhost/vessel-busybox:latest";

struct Containerd {
    dir: PathBuf,
    sock: String,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tests/support/containerd-harness.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn ctr_runs_with_vessel_as_runc_binary() {
    let Some(e) = env() else { return };
    if !have("containerd") || !have("ctr") {
        return;
    }
    let dir = e.dir.path().join("containerd");
    let o = Command::new(repo().join("tests/support/containerd-harness.sh"))
        .arg("start")
        .arg(&dir)
        .env("VESSEL_CONFIG", &e.config)
        .env("VESSEL_IMAGE_DIR", vessel_testutil::image_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "harness: {}", text(&o));
    let cd = Containerd {
        dir,
        sock: String::from_utf8_lossy(&o.stdout).trim().to_string(),
    };
    let o = Command::new("ctr")
        .args([
            "-a",
            &cd.sock,
            "run",
            "--rm",
            "--runc-binary",
            VESSEL,
            IMAGE,
            "ctr1",
            "sh",
            "-c",
            "echo hi from ctr; exit 5",
        ])
        .env("VESSEL_CONFIG", &e.config)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi from ctr\n");
}

#[test]
fn podman_runs_with_vessel_as_runtime() {
    let Some(e) = env() else { return };
    if !have("podman") || !have("skopeo") {
        return;
    }
    let images = Command::new(repo().join("tests/support/busybox-image.sh"))
        .arg(vessel_testutil::image_dir())
        .output()
        .unwrap();
    assert!(images.status.success(), "{}", text(&images));
    let d = e.dir.path();
    let conf = d.join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )
    .unwrap();
    let runtime = e.runtime_script();
    let podman = |args: &[&str]| {
        Command::new("podman")
            .arg("--root")
            .arg(d.join("proot"))
            .arg("--runroot")
            .arg(d.join("prun"))
            .arg("--runtime")
            .arg(&runtime)
            .args(args)
            .env("CONTAINERS_CONF", &conf)
            .env("VESSEL_CONFIG", &e.config)
            .output()
            .unwrap()
    };
    let archive = vessel_testutil::image_dir().join("busybox-docker.tar");
    let o = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = podman(&["run", "--rm", IMAGE, "echo", "hi"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let o = podman(&["run", "--rm", IMAGE, "sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    // exec into a running container (podman: exec --process --detach --pid-file).
    let o = podman(&["run", "-d", "--name", "pe", IMAGE, "sleep", "600"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = podman(&["exec", "pe", "sh", "-c", "echo exec-hi; exit 6"]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "exec-hi\n");
    let o = podman(&["rm", "-f", "-t", "0", "pe"]);
    assert!(o.status.success(), "{}", text(&o));
    // Whichever podman ran `delete` (this one or conmon's cleanup), it found
    // the container: no state is left.
    let left = || common::state_left(&e.root);
    assert!(
        wait_until(Duration::from_secs(10), || left().is_empty()),
        "vessel state left: {:?}",
        left()
    );
    // containers/storage leaves its overlay home (proot/overlay) mounted.
    unmount_under(d);
}
