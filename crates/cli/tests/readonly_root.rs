//! A read-only root (`root.readonly`, what `vessel spec` writes, as runc's
//! spec) on a rootfs that lacks the spec's mount destinations (issue 16 item
//! 1): runc creates the mount points before it makes `/` read-only, and so
//! must vessel. Real QEMU/TCG guests.

mod common;

use std::path::Path;

use common::{env, text};

/// Removes the mount destinations a bare busybox image lacks.
fn strip_mount_points(rootfs: &Path) {
    for d in ["proc", "sys"] {
        std::fs::remove_dir(rootfs.join(d)).unwrap();
    }
}

#[test]
fn a_readonly_root_gets_its_missing_mount_points_and_stays_readonly() {
    let Some(e) = env() else { return };

    // `vessel spec`'s bundle as it is (read-only root), only non-terminal,
    // on a rootfs without /proc and /sys.
    let b = e.bundle("plain", &["true"], |c| c["root"]["readonly"] = true.into());
    strip_mount_points(&b.join("rootfs"));
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "ro-true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    e.assert_clean("ro-true");

    // Binds to destinations missing from the rootfs (/mnt, /tmp/bind); the
    // root stays read-only for the container: a write to / fails with EROFS.
    let data = e.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello"), "from the host\n").unwrap();
    let script = "cat /mnt/hello /tmp/bind/hello; \
                  test -r /proc/self/status && test -d /sys/kernel || exit 10; \
                  touch /written 2>&1; test -e /written && exit 11; \
                  echo new > /mnt/new; echo done";
    let b = e.bundle("binds", &["sh", "-c", script], |c| {
        c["root"]["readonly"] = true.into();
        let m = c["mounts"].as_array_mut().unwrap();
        for dest in ["/mnt", "/tmp/bind"] {
            m.push(serde_json::json!({"destination": dest, "type": "bind",
                "source": data, "options": ["rbind", "rw"]}));
        }
    });
    let rootfs = b.join("rootfs");
    strip_mount_points(&rootfs);
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "ro-binds"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        out.starts_with("from the host\nfrom the host\n") && out.ends_with("done\n"),
        "{out}"
    );
    assert!(
        out.contains("Read-only file system"),
        "a write to / must fail with EROFS: {out}"
    );
    // The read-write bind was writable; the rootfs got the mount points
    // (as runc makes them) and nothing else.
    assert_eq!(
        std::fs::read_to_string(data.join("new")).unwrap(),
        "new\n",
        "{out}"
    );
    assert!(!rootfs.join("written").exists());
    for d in ["proc", "sys", "mnt", "tmp/bind"] {
        assert!(rootfs.join(d).is_dir(), "mount point /{d} not made");
    }
    assert_eq!(
        std::fs::read_to_string(data.join("hello")).unwrap(),
        "from the host\n"
    );
    e.assert_clean("ro-binds");
}
