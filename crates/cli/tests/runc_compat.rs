//! End-to-end: what runc's own integration suite (bats, v1.1.5) expects of
//! a runc, asserted here for `vessel` with real guests (issue 16).

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, text, winsize, Reader};
use nix::sys::termios::{tcgetattr, LocalFlags};

const T: Duration = Duration::from_secs(60);

/// A pty whose slave is the controlling terminal of the commands started
/// on it (so that they get SIGWINCH), at `rows` x `cols`.
struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

impl Pty {
    fn open(rows: u16, cols: u16) -> Pty {
        let p = nix::pty::openpty(Some(&winsize(rows, cols)), None).unwrap();
        Pty {
            master: p.master,
            slave: p.slave,
        }
    }

    /// Starts `cmd` in a new session with the slave as its stdio and
    /// controlling terminal.
    fn spawn(&self, mut cmd: Command) -> Child {
        let fd = |f: &OwnedFd| Stdio::from(f.try_clone().unwrap());
        cmd.stdin(fd(&self.slave))
            .stdout(fd(&self.slave))
            .stderr(fd(&self.slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if nix::libc::setsid() < 0 || nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    fn resize(&self, rows: u16, cols: u16) {
        // SAFETY: TIOCSWINSZ on the master we own, with a valid winsize.
        unsafe { set_winsize(self.master.as_raw_fd(), &winsize(rows, cols)) }.unwrap();
    }

    fn write(&self, s: &str) {
        nix::unistd::write(self.master.as_fd(), s.as_bytes()).unwrap();
    }

    fn canonical(&self) -> bool {
        tcgetattr(self.slave.as_fd())
            .unwrap()
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    }

    fn reader(&self) -> Reader {
        Reader::new(self.master.try_clone().unwrap())
    }
}

/// Waits for `child` (at most `T`); its exit code.
fn exit_code(child: &mut Child) -> Option<i32> {
    let mut status = None;
    common::wait_until(T, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    match status {
        Some(s) => s.code(),
        None => {
            let _ = child.kill();
            panic!("still running after {T:?}");
        }
    }
}

/// Types `stty size` until the shell on `pty` reports `want` (the window
/// size travels asynchronously, as with runc).
fn wait_for_size(pty: &Pty, reader: &mut Reader, want: &str) -> String {
    let mut out = String::new();
    let found = common::wait_until(T, || {
        pty.write("stty size\n");
        out = reader.until(want, Duration::from_secs(2));
        out.contains(want)
    });
    assert!(found, "never saw {want:?}: {out:?}");
    out
}

#[test]
fn run_without_console_socket_is_interactive_on_the_callers_terminal() {
    let Some(e) = env() else { return };
    // `vessel spec` as is: terminal, `sh`, read-only root.
    let b = e.bundle("b", &["sh"], |c| {
        c["process"]["terminal"] = true.into();
        c["root"]["readonly"] = true.into();
    });
    let pty = Pty::open(33, 111);
    assert!(pty.canonical());
    let mut reader = pty.reader();
    let mut cmd = e.cmd();
    cmd.args(["run", "--bundle", b.to_str().unwrap(), "t1"]);
    let mut child = pty.spawn(cmd);
    // The window size set before start is the one the process sees.
    let out = wait_for_size(&pty, &mut reader, "33 111");
    // Raw mode on the caller's terminal while the container runs.
    assert!(!pty.canonical(), "caller's terminal not in raw mode");
    // A resize of the caller's terminal (SIGWINCH) reaches the process.
    pty.resize(40, 120);
    wait_for_size(&pty, &mut reader, "40 120");
    pty.write("echo hi-$((6*7)); exit 3\n");
    let code = exit_code(&mut child);
    let out = out + &reader.until("hi-42", T);
    assert!(out.contains("hi-42"), "{out:?}");
    assert_eq!(code, Some(3), "{out:?}");
    // The terminal's mode is restored once vessel exits.
    assert!(pty.canonical(), "caller's terminal left in raw mode");
    e.assert_clean("t1");
}

#[test]
fn exec_tty_without_console_socket_is_interactive_on_the_callers_terminal() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sleep", "1000"], |_| {});
    e.create("xt", &b);
    assert!(e.run(&["start", "xt"]).status.success());
    let pty = Pty::open(27, 99);
    let mut reader = pty.reader();
    let mut cmd = e.cmd();
    cmd.args(["exec", "-t", "xt", "sh"]);
    let mut child = pty.spawn(cmd);
    wait_for_size(&pty, &mut reader, "27 99");
    assert!(!pty.canonical(), "caller's terminal not in raw mode");
    pty.resize(41, 121);
    wait_for_size(&pty, &mut reader, "41 121");
    pty.write("echo hi-$((6*7)); exit 3\n");
    let code = exit_code(&mut child);
    let out = reader.until("hi-42", T);
    assert!(out.contains("hi-42"), "{out:?}");
    assert_eq!(code, Some(3), "{out:?}");
    assert!(pty.canonical(), "caller's terminal left in raw mode");
    // runc's tty.bats "exec -t ... --user": the pty is the process user's
    // from its first instruction (the agent hands it over as the exec starts).
    let mut cmd = e.cmd();
    cmd.args(["exec", "-t", "--user", "1000:1000", "xt"]).args([
        "stat",
        "-L",
        "-c",
        "owner=%u:%g",
        "/proc/self/fd/0",
    ]);
    let mut child = pty.spawn(cmd);
    assert_eq!(exit_code(&mut child), Some(0));
    let out = reader.until("owner=1000:5", T);
    assert!(out.contains("owner=1000:5"), "{out:?}");
    let o = e.run(&["delete", "--force", "xt"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("xt");
}

/// A running container `id` whose init sleeps (bundle from `vessel spec`).
fn running(e: &common::Env, id: &str) {
    let b = e.bundle(&format!("b-{id}"), &["sleep", "1000"], |_| {});
    e.create(id, &b);
    let o = e.run(&["start", id]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `vessel exec ID args...`: (exit code, stdout, stderr).
fn exec(e: &common::Env, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["exec"];
    all.extend_from_slice(args);
    let o = e.run(&all);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn update_applies_limits_in_the_guest_and_features_says_what_is_supported() {
    let Some(e) = env() else { return };
    running(&e, "up");
    let cgroup = |e: &common::Env| {
        let (code, out, err) = exec(
            e,
            &[
                "up",
                "cat",
                "/sys/fs/cgroup/memory.max",
                "/sys/fs/cgroup/cpu.max",
                "/sys/fs/cgroup/pids.max",
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        out
    };
    // runc's flags, with its size suffixes.
    let o = e.run(&[
        "update",
        "--memory",
        "64M",
        "--cpu-quota",
        "50000",
        "--cpu-period",
        "100000",
        "--pids-limit",
        "20",
        "up",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cgroup(&e), "67108864\n50000 100000\n20\n");
    // containerd's way: linux.resources JSON on stdin.
    let mut c = e.cmd();
    c.args(["update", "--resources", "-", "up"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"memory": {"limit": 33554432}, "cpu": {"quota": -1}, "pids": {"limit": 10}}"#,
        )
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cgroup(&e), "33554432\nmax 100000\n10\n");
    // What the guest cannot apply is refused with the field named; nothing changes.
    let o = e.run(&["update", "--cpuset-cpus", "0", "up"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cpus"),
        "{}",
        text(&o)
    );
    assert_eq!(cgroup(&e), "33554432\nmax 100000\n10\n");
    let o = e.run(&["update", "--memory", "lots", "up"]);
    assert!(!o.status.success(), "{}", text(&o));
    let o = e.run(&["update", "--memory", "64M", "nosuch"]);
    assert!(!o.status.success(), "{}", text(&o));
    // checkpoint/restore: a clear refusal.
    for cmd in ["checkpoint", "restore"] {
        let o = e.run(&[cmd, "--image-path", "/tmp/x", "up"]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("not supported"),
            "{}",
            text(&o)
        );
    }
    assert!(e.run(&["delete", "--force", "up"]).status.success());
    e.assert_clean("up");
    // stopped: update refused.
    let o = e.run(&["update", "--memory", "64M", "up"]);
    assert!(!o.status.success(), "{}", text(&o));
}

#[test]
fn features_is_runcs_json_with_honest_values() {
    let o = std::process::Command::new(common::VESSEL)
        .arg("features")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.trim_start()
            .starts_with("{\n  \"ociVersionMin\": \"1.0.0\""),
        "{out}"
    );
    let f: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(f["ociVersionMax"], "1.2.0");
    let ns = f["linux"]["namespaces"].as_array().unwrap();
    assert!(
        ns.contains(&"pid".into()) && ns.contains(&"user".into()),
        "{ns:?}"
    );
    assert_eq!(f["linux"]["cgroup"]["v2"], true);
    assert_eq!(f["linux"]["cgroup"]["v1"], false);
    assert_eq!(f["linux"]["seccomp"]["enabled"], true);
    assert_eq!(f["linux"]["apparmor"]["enabled"], false);
    assert!(f["hooks"]
        .as_array()
        .unwrap()
        .contains(&"startContainer".into()));
    assert!(f["mountOptions"]
        .as_array()
        .unwrap()
        .contains(&"rbind".into()));
}

#[test]
fn exec_defaults_and_flags_and_exit_codes_like_runc() {
    let Some(e) = env() else { return };
    running(&e, "ex");
    // A process.json without `user` runs as uid 0.
    let p = e.dir.path().join("process.json");
    std::fs::write(
        &p,
        r#"{"args": ["sh", "-c", "id -u; id -g"], "cwd": "/", "env": ["PATH=/bin"]}"#,
    )
    .unwrap();
    let (code, out, err) = exec(&e, &["--process", p.to_str().unwrap(), "ex"]);
    assert_eq!((code, out.as_str()), (Some(0), "0\n0\n"), "{err}");
    // --additional-gids, repeated or comma-separated (runc's exec.bats); the
    // kernel lists groups sorted.
    let (code, out, err) = exec(
        &e,
        &[
            "--user",
            "1000:1000",
            "--additional-gids",
            "100",
            "-g",
            "65534,7",
            "ex",
            "id",
            "-G",
        ],
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "1000 7 100 65534\n"),
        "{err}"
    );
    // The process's own status, and Vessel's failures as 255.
    let (code, _, err) = exec(&e, &["ex", "sh", "-c", "exit 1"]);
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = exec(&e, &["nosuch", "true"]);
    assert_eq!(code, Some(255), "{err}");
    let (code, _, err) = exec(&e, &["ex", "/no/such/binary"]);
    assert_eq!(code, Some(255), "{err}");
    // --cgroup: the container's own cgroup; a sub-cgroup is refused with the reason.
    let (code, _, err) = exec(&e, &["--cgroup", "/", "ex", "true"]);
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = exec(&e, &["--cgroup", "sub", "ex", "true"]);
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("sub-cgroups"), "{err}");
    // A paused container: refused, with --ignore-paused saying why.
    assert!(e.run(&["pause", "ex"]).status.success());
    let (code, _, err) = exec(&e, &["ex", "true"]);
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("paused"), "{err}");
    let (code, _, err) = exec(&e, &["--ignore-paused", "ex", "true"]);
    assert_eq!(code, Some(255), "{err}");
    assert!(
        err.contains("--ignore-paused") && err.contains("resume"),
        "{err}"
    );
    assert!(e.run(&["resume", "ex"]).status.success());
    assert!(e.run(&["delete", "--force", "ex"]).status.success());
    e.assert_clean("ex");
    // runc's exec.bats "runc exec [created container]": allowed, and the
    // container stays created (its init has not run).
    let b = e.bundle(
        "b-cr",
        &["sh", "-c", "echo init-ran > /tmp/ran; sleep 1000"],
        |_| {},
    );
    e.create("cr", &b);
    let (code, out, err) = exec(&e, &["cr", "sh", "-c", "echo exec-$((40+2)); ls /tmp"]);
    assert_eq!((code, out.as_str()), (Some(0), "exec-42\n"), "{err}");
    assert_eq!(e.status("cr"), "created");
    let o = e.run(&["start", "cr"]);
    assert!(o.status.success(), "{}", text(&o));
    // Init runs after start: its file appears.
    assert!(common::wait_until(T, || exec(
        &e,
        &["cr", "cat", "/tmp/ran"]
    )
    .1 == "init-ran\n"));
    assert!(e.run(&["delete", "--force", "cr"]).status.success());
    e.assert_clean("cr");
}

#[test]
fn kill_0_events_interval_ps_keep_state_list_and_debug_like_runc() {
    let Some(e) = env() else { return };
    running(&e, "k0");
    // kill ID 0: the container can be signalled; nothing is sent.
    let o = e.run(&["kill", "k0", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(e.status("k0"), "running");
    // events --interval with a Go duration: a stats line every 100 ms.
    let mut ev = e
        .cmd()
        .args(["events", "--interval", "100ms", "k0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = {
        use std::io::BufRead;
        let out = std::io::BufReader::new(ev.stdout.take().unwrap());
        out.lines().take(3).map(|l| l.unwrap()).collect::<Vec<_>>()
    };
    let _ = ev.kill();
    let _ = ev.wait();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert!(
            l.starts_with(r#"{"type":"stats","id":"k0","data":{"#),
            "{l}"
        );
    }
    // state and list: runc's field order, the owner's name.
    let o = e.run(&["state", "k0"]);
    let s = String::from_utf8_lossy(&o.stdout);
    let keys: Vec<&str> = s
        .lines()
        .filter_map(|l| l.strip_prefix("  \"")?.split('"').next())
        .collect();
    assert_eq!(
        keys,
        [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner"
        ],
        "{s}"
    );
    assert!(s.contains(r#""owner": "root""#), "{s}");
    let o = e.run(&["list", "--format", "json"]);
    let l = String::from_utf8_lossy(&o.stdout);
    assert!(
        l.starts_with(r#"[{"ociVersion":"1.0.2","id":"k0","pid":"#),
        "{l}"
    );
    assert!(l.contains(r#""owner":"root"}"#), "{l}");
    // --debug: debug lines on stderr, in runc's text format.
    let o = e.run(&["--debug", "ps", "k0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("level=debug"),
        "{}",
        text(&o)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().next(),
        Some("PID")
    );
    // runc's ps.bats "ps -e -x" style: options go to a ps, here the
    // container's own (busybox's has -o, not -x).
    let o = e.run(&["ps", "k0", "-o", "pid,comm"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("PID") && out.contains("sleep"),
        "{}",
        text(&o)
    );
    // ps on a stopped container: no processes, no error.
    assert!(e.run(&["kill", "k0", "KILL"]).status.success());
    e.wait_status("k0", "stopped", T);
    let o = e.run(&["ps", "k0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "PID\n");
    let o = e.run(&["ps", "--format", "json", "k0"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "[]\n", "{}", text(&o));
    let o = e.run(&["kill", "k0", "0"]);
    assert!(
        !o.status.success(),
        "kill 0 of a stopped container: {}",
        text(&o)
    );
    assert!(e.run(&["delete", "k0"]).status.success());
    e.assert_clean("k0");
    // run --keep: the stopped container stays until deleted.
    let b = e.bundle("keep", &["sh", "-c", "exit 5"], |_| {});
    let o = e.run(&["run", "--keep", "--bundle", b.to_str().unwrap(), "kept"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert_eq!(e.status("kept"), "stopped");
    assert!(e.run(&["delete", "kept"]).status.success());
    e.assert_clean("kept");
}

#[test]
fn terminal_belongs_to_the_process_user_and_an_ro_dev_mount_is_read_only() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sh"], |c| {
        c["process"]["terminal"] = true.into();
        c["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
        for m in c["mounts"].as_array_mut().unwrap() {
            if m["destination"] == "/dev" {
                m["options"].as_array_mut().unwrap().push("ro".into());
            }
        }
    });
    let pty = Pty::open(24, 80);
    let mut reader = pty.reader();
    let mut cmd = e.cmd();
    cmd.args(["run", "--bundle", b.to_str().unwrap(), "own"]);
    let mut child = pty.spawn(cmd);
    // runc's tty.bats: the pty is the process user's, group tty (5).
    pty.write("echo owner=$(stat -c %u:%g $(tty)); id -u\n");
    let out = reader.until("owner=1", T);
    assert!(out.contains("owner=1000:5"), "{out:?}");
    // runc's mounts.bats: "ro" on /dev is honoured; /dev/pts still works.
    pty.write("touch /dev/x 2>/dev/null && echo dev-writable || echo dev-$((1+1))-ro; exit\n");
    let out = reader.until("dev-", T);
    assert_eq!(exit_code(&mut child), Some(0), "{out:?}");
    let out = reader.until("dev-2-ro", Duration::from_secs(1));
    assert!(
        out.contains("dev-2-ro") && !out.contains("dev-writable\r"),
        "{out:?}"
    );
    e.assert_clean("own");
}

#[test]
fn terminal_belongs_to_the_process_user_in_a_user_namespace() {
    let Some(e) = env() else { return };
    // As runc hands it over inside the namespace: the process sees its own
    // uid, for init and for `exec -t` (which must be in the namespace).
    let b = e.bundle("b", &["sh"], |c| {
        c["process"]["terminal"] = true.into();
        c["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["uidMappings"] = map.clone();
        c["linux"]["gidMappings"] = map;
    });
    let pty = Pty::open(24, 80);
    let mut reader = pty.reader();
    let mut cmd = e.cmd();
    cmd.args(["run", "--bundle", b.to_str().unwrap(), "ownu"]);
    let mut child = pty.spawn(cmd);
    pty.write("echo init-owner=$(stat -L -c %u:%g /proc/self/fd/0)\n");
    let out = reader.until("init-owner=1", T);
    assert!(out.contains("init-owner=1000:5"), "{out:?}");
    let pty2 = Pty::open(24, 80);
    let mut reader2 = pty2.reader();
    let mut cmd = e.cmd();
    cmd.args(["exec", "-t", "--user", "1000:1000", "ownu"])
        .args(["stat", "-L", "-c", "exec-owner=%u:%g", "/proc/self/fd/0"]);
    let mut exec_t = pty2.spawn(cmd);
    assert_eq!(exit_code(&mut exec_t), Some(0));
    let out = reader2.until("exec-owner=1000:5", T);
    assert!(out.contains("exec-owner=1000:5"), "{out:?}");
    // An exec joins the container's user namespace too (runc's userns.bats
    // "exec"), as the container's user (1000) by default.
    let (code, out, err) = exec(&e, &["ownu", "sh", "-c", "cat /proc/self/uid_map; id -u"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(
        (code, words),
        (Some(0), vec!["0", "100000", "65536", "1000"]),
        "{err}"
    );
    pty.write("exit\n");
    assert_eq!(exit_code(&mut child), Some(0));
    e.assert_clean("ownu");
}

#[test]
fn seccomp_profile_loads_without_no_new_privileges() {
    let Some(e) = env() else { return };
    // runc's seccomp.bats runs profiles with noNewPrivileges false: the
    // filter is then loaded while the process still has CAP_SYS_ADMIN.
    let script = "mkdir /tmp/x 2>/dev/null; echo rc=$?; grep NoNewPrivs /proc/self/status";
    let b = e.bundle("b", &["sh", "-c", script], |c| {
        c["process"]["noNewPrivileges"] = false.into();
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
        });
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "nnp"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("rc=1\n"), "mkdir not denied: {}", text(&o));
    assert!(out.contains("NoNewPrivs:\t0"), "{}", text(&o));
    e.assert_clean("nnp");
}

#[test]
fn device_cgroup_rules_are_enforced_in_the_guest() {
    let Some(e) = env() else { return };
    // runc's dev.bats: a device node the process makes itself is usable only
    // when linux.resources.devices allows it; the default devices stay usable.
    let script = "mknod /tmp/kmsg c 1 11 || exit 9; \
                  echo hi > /tmp/kmsg 2>/dev/null && echo kmsg-writable || echo kmsg-denied; \
                  echo x > /dev/null && echo null-ok";
    let with_rules = |name: &str, devices: serde_json::Value| {
        e.bundle(name, &["sh", "-c", script], |c| {
            for set in ["bounding", "effective", "permitted"] {
                c["process"]["capabilities"][set]
                    .as_array_mut()
                    .unwrap()
                    .push("CAP_MKNOD".into());
            }
            c["linux"]["resources"]["devices"] = devices;
        })
    };
    let deny = with_rules(
        "deny",
        serde_json::json!([{"allow": false, "access": "rwm"}]),
    );
    let o = e.run(&["run", "--bundle", deny.to_str().unwrap(), "devdeny"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "kmsg-denied\nnull-ok\n",
        "{}",
        text(&o)
    );
    e.assert_clean("devdeny");
    let allow = with_rules(
        "allow",
        serde_json::json!([{"allow": false, "access": "rwm"},
                           {"allow": true, "type": "c", "major": 1, "minor": 11, "access": "rwm"}]),
    );
    let o = e.run(&["run", "--bundle", allow.to_str().unwrap(), "devallow"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "kmsg-writable\nnull-ok\n",
        "{}",
        text(&o)
    );
    e.assert_clean("devallow");
}

#[test]
fn user_namespace_with_mappings_runs() {
    let Some(e) = env() else { return };
    // runc's userns.bats: a `runc spec` bundle with a user namespace and
    // mappings runs; the process is root inside, 100000 outside.
    let script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; \
                  ls /sys/class >/dev/null && echo sys-ok; \
                  cat /sys/fs/cgroup/pids.max >/dev/null && echo cgroup-ok";
    let b = e.bundle("b", &["sh", "-c", script], |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        c["linux"]["uidMappings"] = map.clone();
        c["linux"]["gidMappings"] = map;
    });
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "userns"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let maps: Vec<Vec<&str>> = out
        .lines()
        .take(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        maps,
        [["0", "100000", "65536"], ["0", "100000", "65536"]],
        "{out}"
    );
    assert!(out.contains("\n0\nsys-ok\ncgroup-ok\n"), "{}", text(&o));
    e.assert_clean("userns");
}
