//! End-to-end: what runc's own integration suite (bats, v1.1.5) expects of
//! a runc, asserted here for `vessel` with real guests (issue 16).

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, text, Reader};
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

fn winsize(rows: u16, cols: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
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
    let o = e.run(&["delete", "--force", "xt"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("xt");
}
