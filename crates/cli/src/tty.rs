//! The caller's terminal in the foreground (`run` without `-d`, `exec -t`
//! without `--console-socket`), as runc does it: raw mode on our stdin while
//! the process runs (restored on every way out that returns), the window
//! size passed in at start and on SIGWINCH, and the bytes relayed.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{bail, Context};
use nix::libc;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// A dup of our fd `fd` (0, 1: open for the process's lifetime).
pub fn dup_std(fd: i32) -> anyhow::Result<File> {
    // SAFETY: fds 0-2 stay open for the process's lifetime; this dups one.
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(File::from(b.try_clone_to_owned().context("dup stdio")?))
}

/// The window size (rows, cols) of our stdin, if it is a terminal.
pub fn stdin_size() -> Option<(u16, u16)> {
    dup_std(0)
        .ok()
        .and_then(|f| vessel_runtime::container::console::window_size(&f))
}

/// Raw mode on our stdin while it lives (nothing if stdin is no terminal).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    pub fn stdin() -> RawMode {
        // SAFETY: fd 0 stays open for the process's lifetime.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let Ok(saved) = tcgetattr(fd) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if let Err(e) = tcsetattr(fd, SetArg::TCSANOW, &raw) {
            log::warn!("raw mode on stdin: {e}");
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: fd 0 stays open for the process's lifetime.
            let fd = unsafe { BorrowedFd::borrow_raw(0) };
            let _ = tcsetattr(fd, SetArg::TCSANOW, t);
        }
    }
}

/// Sets the window size of the terminal `f` (a pty master).
pub fn set_size(f: &File, (rows, cols): (u16, u16)) -> nix::Result<()> {
    nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, valid for the call.
    unsafe { tiocswinsz(f.as_raw_fd(), &ws) }.map(drop)
}

/// A private console socket that `vessel run` hands to its own supervisor:
/// the pty master arrives on it (runc's protocol) during `create`.
pub struct ConsoleSocket {
    dir: PathBuf,
    pub path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn bind() -> anyhow::Result<ConsoleSocket> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("vessel-tty-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| dir.display().to_string())?;
        let path = dir.join("console.sock");
        let listener = match UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e).with_context(|| path.display().to_string());
            }
        };
        Ok(ConsoleSocket {
            dir,
            path,
            listener,
        })
    }

    /// The master the supervisor sent (it did before `create` returned:
    /// the connection waits in the backlog, so this does not block).
    pub fn receive(&self) -> anyhow::Result<File> {
        self.listener.set_nonblocking(true)?;
        let (conn, _) = self
            .listener
            .accept()
            .context("the supervisor sent no pty master")?;
        conn.set_nonblocking(false)?;
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receive the pty master")?;
        let mut master = None;
        for m in msg.cmsgs().context("receive the pty master")? {
            if let ControlMessageOwned::ScmRights(fds) = m {
                for fd in fds {
                    // SAFETY: received just now with SCM_RIGHTS: ours alone.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    master.get_or_insert(owned);
                }
            }
        }
        match master {
            Some(m) => Ok(File::from(m)),
            None => bail!("no pty master on the console socket"),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}
