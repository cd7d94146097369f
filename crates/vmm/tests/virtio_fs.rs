//! virtio-fs through the vhost-user frontend: the tiny guest sends FUSE_INIT and LOOKUP to a
//! real virtiofsd. Needs /dev/kvm and a virtiofsd binary (`VESSEL_VIRTIOFSD`, `virtiofsd` on
//! PATH, or Debian's /usr/lib/qemu/virtiofsd); skips loudly without them.

mod common;

use std::time::Duration;

use common::*;

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
    let daemon = start_virtiofsd(&virtiofsd, &sock, &share).expect("virtiofsd did not start");
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
