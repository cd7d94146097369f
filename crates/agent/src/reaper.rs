//! PID 1 duty: reap every child, including orphans re-parented to us.
//!
//! Exit statuses are handed to whoever registered interest in a pid
//! ([`Reaper::subscribe`]); statuses nobody asked for yet are kept (bounded)
//! so a subscriber that registers after a fast exit still gets it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Unclaimed exit statuses kept at most (orphans nobody will ask about).
const MAX_UNCLAIMED: usize = 1024;

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<WaitStatus>>,
    unclaimed: HashMap<i32, WaitStatus>,
}

#[derive(Clone, Default)]
pub struct Reaper(Arc<Mutex<State>>);

impl Reaper {
    /// Returns a receiver for `pid`'s exit status.
    #[allow(dead_code)] // used by container lifecycle code
    pub fn subscribe(&self, pid: i32) -> oneshot::Receiver<WaitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match st.unclaimed.remove(&pid) {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                st.waiters.insert(pid, tx);
            }
        }
        rx
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    log::debug!("reaped {status:?}");
                    let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
                    match st.waiters.remove(&pid.as_raw()) {
                        Some(tx) => {
                            let _ = tx.send(status);
                        }
                        None if st.unclaimed.len() < MAX_UNCLAIMED => {
                            st.unclaimed.insert(pid.as_raw(), status);
                        }
                        None => {}
                    }
                }
            }
        }
    }
}

/// Starts reaping on SIGCHLD. Must be called inside the tokio runtime.
pub fn spawn() -> std::io::Result<Reaper> {
    let reaper = Reaper::default();
    let mut sigchld = signal(SignalKind::child())?;
    let r = reaper.clone();
    tokio::spawn(async move {
        // Children that exited before the handler was installed.
        r.reap_all();
        while sigchld.recv().await.is_some() {
            r.reap_all();
        }
    });
    Ok(reaper)
}
