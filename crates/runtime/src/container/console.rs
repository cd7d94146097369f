//! Terminal mode: a host pty pair whose master goes to the caller's
//! `--console-socket` exactly as runc sends it (SCM_RIGHTS, pty name as data).

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

use super::{ContainerError, Result};

/// A host pty: the master is for the caller, the slave (raw mode, the guest
/// pty does the line discipline) for the relay.
pub struct HostPty {
    pub master: OwnedFd,
    pub slave: File,
    pub name: String,
}

fn err(what: &str, e: impl std::fmt::Display) -> ContainerError {
    ContainerError::Console(format!("{what}: {e}"))
}

impl HostPty {
    pub fn open(rows: u16, cols: u16) -> Result<HostPty> {
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| err("openpty", e))?;
        let mut t = tcgetattr(&pty.slave).map_err(|e| err("tcgetattr", e))?;
        cfmakeraw(&mut t);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &t).map_err(|e| err("tcsetattr", e))?;
        let name = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/dev/ptmx".into());
        Ok(HostPty {
            master: pty.master,
            slave: File::from(pty.slave),
            name,
        })
    }

    /// Sends the master to `socket` (runc's `--console-socket` protocol).
    pub fn send_master(&self, socket: &Path) -> Result<()> {
        let s = UnixStream::connect(socket).map_err(|e| {
            err(
                &format!("connect to console socket {}", socket.display()),
                e,
            )
        })?;
        let fds = [self.master.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [IoSlice::new(self.name.as_bytes())];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(|e| err("send pty master", e))?;
        Ok(())
    }
}

/// The window size (rows, cols) of the terminal `f`.
pub fn window_size(f: &File) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`, which lives across the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use std::io::IoSliceMut;
    use std::os::unix::net::UnixListener;

    #[test]
    fn sends_master_like_runc() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("console.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let pty = HostPty::open(24, 80).unwrap();
        pty.send_master(&sock).unwrap();
        let (c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg =
            recvmsg::<()>(c.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty()).unwrap();
        let fds: Vec<_> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|m| match m {
                ControlMessageOwned::ScmRights(f) => Some(f),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(fds.len(), 1);
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
    }
}
