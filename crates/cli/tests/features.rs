//! End-to-end: terminals, exec -t, seccomp, memory limit, bad bundles.

mod common;

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::{env, text, winsize, Reader};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

const T: Duration = Duration::from_secs(60);

fn recv_fd(l: &UnixListener) -> OwnedFd {
    let (c, _) = l.accept().unwrap();
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(c.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
    for m in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = m {
            // SAFETY: the fd was just received and is owned by nobody else.
            return unsafe { OwnedFd::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received on the console socket");
}

#[test]
fn terminal_through_console_socket() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &[
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo tty-yes; stty size; \
             while [ \"$(stty size)\" != '40 120' ]; do sleep 0.1; done; echo resized",
        ],
        |c| {
            c["process"]["terminal"] = true.into();
            c["process"]["consoleSize"] = serde_json::json!({"height": 30, "width": 100});
        },
    );
    let sock = e.dir.path().join("console.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || recv_fd(&l));
    let o = e.run(&[
        "create",
        "--bundle",
        b.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        "tty1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let master = h.join().unwrap();
    assert!(e.run(&["start", "tty1"]).status.success());
    let fd = master.as_raw_fd();
    let mut reader = Reader::new(master);
    let out = reader.until("30 100", T);
    assert!(
        out.contains("tty-yes\r\n") && out.contains("30 100"),
        "{out:?}"
    );
    // The caller resizes the master, as containerd's shim does; the guest sees it.
    nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::pty::Winsize);
    // SAFETY: TIOCSWINSZ on the pty master the reader thread owns (still open).
    unsafe { set_winsize(fd, &winsize(40, 120)) }.unwrap();
    let out = reader.until("resized", T);
    assert!(out.contains("resized"), "{out:?}");
    e.wait_status("tty1", "stopped", T);
    assert!(e.run(&["delete", "tty1"]).status.success());
    e.assert_clean("tty1");
    // No console socket for a terminal process: a clear error, nothing left.
    let o = e.run(&["create", "--bundle", b.to_str().unwrap(), "tty2"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("console-socket"),
        "{}",
        text(&o)
    );
    e.assert_clean("tty2");
}

#[test]
fn exec_with_tty() {
    let Some(e) = env() else { return };
    let b = e.bundle(
        "b",
        &["sh", "-c", "echo up; while :; do sleep 0.1; done"],
        |_| {},
    );
    let (out, _) = e.create("xt", &b);
    assert!(e.run(&["start", "xt"]).status.success());
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        == "up\n"));
    let o = e.run(&["exec", "-t", "xt", "sh", "-c", "[ -t 1 ] && echo tty-exec"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "tty-exec\r\n");
    // Detached exec with a pid file: the pid exits with the process's status.
    let pidf = e.dir.path().join("exec.pid");
    let o = e.run(&[
        "exec",
        "-d",
        "--pid-file",
        pidf.to_str().unwrap(),
        "xt",
        "sh",
        "-c",
        "exit 4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let pid: i32 = std::fs::read_to_string(&pidf)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid > 0);
    assert!(e.run(&["delete", "--force", "xt"]).status.success());
    e.assert_clean("xt");
}

#[test]
fn seccomp_profile_denying_mkdir_is_enforced() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh", "-c", "mkdir /tmp/d && echo made || echo denied"], |c| {
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "sc1"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "denied\n",
        "{}",
        text(&o)
    );
    e.assert_clean("sc1");
}

#[test]
fn memory_limit_is_enforced_and_oom_reported() {
    let Some(e) = env() else { return };
    // `tail` of an endless line buffers without bound.
    let b = e.bundle("b", &["sh", "-c", "exec tail /dev/zero"], |c| {
        c["linux"]["resources"]["memory"] =
            serde_json::json!({"limit": 33554432, "swap": 33554432});
    });
    let log = e.dir.path().join("log.json");
    let o = e.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "run",
        "--bundle",
        b.to_str().unwrap(),
        "oom1",
    ]);
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log.contains("OOM"),
        "no OOM report in the log: {log}\n{}",
        text(&o)
    );
    e.assert_clean("oom1");
}

#[test]
fn bad_bundles_fail_clearly_and_leave_nothing() {
    let Some(e) = env() else { return };
    let good = e.bundle("good", &["true"], |_| {});
    type Breaker = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "noconfig",
            Box::new(|b| std::fs::remove_file(b.join("config.json")).unwrap()),
            "config.json",
        ),
        (
            "badjson",
            Box::new(|b| std::fs::write(b.join("config.json"), "{not json").unwrap()),
            "not valid JSON",
        ),
        (
            "badver",
            Box::new(|b| edit(b, |c| c["ociVersion"] = "7.0.0".into())),
            "ociVersion",
        ),
        (
            "norootfs",
            Box::new(|b| edit(b, |c| c["root"]["path"] = "missing".into())),
            "root file system",
        ),
        (
            "nobin",
            Box::new(|b| {
                edit(b, |c| {
                    c["process"]["args"] = serde_json::json!(["/bin/nope"])
                })
            }),
            "not found",
        ),
    ];
    for (id, breakit, want) in cases {
        let b = e.dir.path().join(id);
        copy_dir(&good, &b);
        breakit(&b);
        let o = e.run(&["create", "--bundle", b.to_str().unwrap(), id]);
        assert!(!o.status.success(), "{id}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{id}: want {want:?} in {err}");
        e.assert_clean(id);
    }
    // Duplicate id: the second create fails, the first container is untouched.
    let b = e.bundle("dup", &["sleep", "600"], |_| {});
    e.create("dup1", &b);
    let o = e.run(&["create", "--bundle", b.to_str().unwrap(), "dup1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already exists"),
        "{}",
        text(&o)
    );
    assert_eq!(e.status("dup1"), "created");
    assert!(e.run(&["delete", "--force", "dup1"]).status.success());
    e.assert_clean("dup1");
}

fn edit(b: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = b.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(&p, serde_json::to_vec(&c).unwrap()).unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}
