//! PID 1 duty: reap every child, including orphans re-parented to us.
//!
//! Exit statuses are handed to whoever registered interest in a pid
//! ([`Reaper::subscribe`]); statuses nobody asked for yet are kept (bounded,
//! for [`UNCLAIMED_TTL`]) so a subscriber that registers after a fast exit
//! still gets it. The TTL keeps a status of a never-claimed process (e.g.
//! libcontainer's intermediate process) from being handed to a later process
//! that reuses its pid.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Unclaimed exit statuses kept at most (orphans nobody will ask about).
const MAX_UNCLAIMED: usize = 1024;

/// How long an unclaimed status stays claimable. A subscriber learns a pid
/// from the process that forked it, well within this; pid reuse takes a full
/// turn of the pid space, far longer.
pub const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    waiters: HashMap<i32, oneshot::Sender<WaitStatus>>,
    unclaimed: HashMap<i32, (WaitStatus, Instant)>,
}

impl State {
    fn keep_unclaimed(&mut self, pid: i32, status: WaitStatus) {
        let now = Instant::now();
        self.unclaimed
            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        if self.unclaimed.len() >= MAX_UNCLAIMED {
            if let Some(oldest) = self
                .unclaimed
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p)
            {
                self.unclaimed.remove(&oldest);
            }
        }
        self.unclaimed.insert(pid, (status, now));
    }
}

#[derive(Clone, Default)]
pub struct Reaper(Arc<Mutex<State>>);

impl Reaper {
    /// Returns a receiver for `pid`'s exit status.
    pub fn subscribe(&self, pid: i32) -> oneshot::Receiver<WaitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match st.unclaimed.remove(&pid) {
            Some((status, at)) if at.elapsed() < UNCLAIMED_TTL => {
                let _ = tx.send(status);
            }
            _ => {
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
                        None => st.keep_unclaimed(pid.as_raw(), status),
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

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::Pid;

    fn exited(pid: i32, code: i32) -> WaitStatus {
        WaitStatus::Exited(Pid::from_raw(pid), code)
    }

    #[test]
    fn unclaimed_is_bounded_and_expires() {
        let mut st = State::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            st.keep_unclaimed(pid, exited(pid, 0));
        }
        assert_eq!(st.unclaimed.len(), MAX_UNCLAIMED);
        // The oldest went first.
        assert!(!st.unclaimed.contains_key(&0));
        assert!(st.unclaimed.contains_key(&(MAX_UNCLAIMED as i32 + 9)));

        let reaper = Reaper::default();
        {
            let mut st = reaper.0.lock().unwrap();
            st.keep_unclaimed(7, exited(7, 3));
            let stale = Instant::now() - UNCLAIMED_TTL - Duration::from_secs(1);
            st.unclaimed.insert(8, (exited(8, 4), stale));
        }
        let mut fresh = reaper.subscribe(7);
        assert_eq!(fresh.try_recv().unwrap(), exited(7, 3));
        let mut stale = reaper.subscribe(8);
        assert!(stale.try_recv().is_err(), "stale status handed out");
    }
}
