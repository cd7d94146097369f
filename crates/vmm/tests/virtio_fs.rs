//! virtio-fs through the vhost-user frontend: the tiny guest sends FUSE_INIT and LOOKUP to a
//! real virtiofsd. Needs /dev/kvm and a virtiofsd binary (`VESSEL_VIRTIOFSD`, `virtiofsd` on
//! PATH, or Debian's /usr/lib/qemu/virtiofsd); skips loudly without them.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VESSEL_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("virtiofsd"))
            .find(|p| p.exists())
    });
    on_path.or_else(|| {
        ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

#[test]
fn guest_talks_fuse_to_virtiofsd() {
    if !kvm_available("guest_talks_fuse_to_virtiofsd") {
        return;
    }
    let Some(virtiofsd) = find_virtiofsd() else {
        eprintln!(
            "\n*** SKIPPED virtio-fs test: no virtiofsd (cargo install virtiofsd, or set \
             VESSEL_VIRTIOFSD) ***\n"
        );
        return;
    };
    let dir = scratch("fs");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(
        share.join("hello.txt"),
        "hello virtio-fs, 33 bytes long!!\n",
    )
    .unwrap();
    let sock = dir.path().join("fs.sock");
    let log = dir.path().join("serial.log");
    // Debian's C daemon takes -o options; the Rust one takes --shared-dir.
    let legacy = virtiofsd.to_string_lossy().contains("qemu");
    let mut cmd = Command::new(&virtiofsd);
    cmd.arg(format!("--socket-path={}", sock.display()));
    if legacy {
        cmd.args([
            "-o",
            &format!("source={}", share.display()),
            "-o",
            "cache=none",
        ]);
    } else {
        cmd.args(["--shared-dir", share.to_str().unwrap(), "--cache", "never"]);
    }
    let daemon = Guard(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    poll(Duration::from_secs(10), || sock.exists().then_some(()))
        .expect("virtiofsd did not create its socket");
    let mut child = spawn(&[
        "--kernel",
        tiny_guest().to_str().unwrap(),
        "--cmdline",
        "mode=fs",
        "--fs",
        &format!("{},tag=shared", sock.display()),
        "--serial-log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)).code(),
        Some(0)
    );
    let out = wait_for_text(&log, "FS-LOOKUP", Duration::from_secs(5));
    assert!(out.contains("FS tag=shared"), "{out}");
    assert!(out.contains(" error=0 major=7 "), "{out}");
    assert!(out.contains("FS-LOOKUP error=0 size=33"), "{out}");
    drop(daemon);
}
