//! The agent's outbox for the host: its own log records, the guest kernel's
//! (see [`crate::kmsg`]) and security events (see [`crate::monitor`]), kept in
//! bounded queues until the host fetches them with `GetEvents`.
//!
//! Full queues drop the oldest entry and count it: a container that floods
//! the log cannot grow the agent's memory nor hide an event behind old ones
//! forever.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use vessel_protocol::agent::{security_event::Kind, GetEventsResponse, LogRecord, SecurityEvent};

/// Log records kept for the host.
pub const MAX_LOGS: usize = 1024;
/// Security events kept for the host.
pub const MAX_EVENTS: usize = 256;
/// At most this many of each per `GetEvents` reply.
pub const MAX_BATCH: usize = 256;
/// Longest message or detail kept, bytes (longer ones are cut).
pub const MAX_TEXT: usize = 1024;
/// Longest `wait_ms` served.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queues {
    logs: VecDeque<LogRecord>,
    events: VecDeque<SecurityEvent>,
    dropped_logs: u64,
    dropped_events: u64,
}

pub struct Journal {
    queues: Mutex<Queues>,
    ready: Notify,
    instance: String,
}

static JOURNAL: OnceLock<Journal> = OnceLock::new();

/// The agent's journal (made on first use).
pub fn get() -> &'static Journal {
    JOURNAL.get_or_init(|| Journal::new(random_instance()))
}

fn random_instance() -> String {
    let mut b = [0u8; 16];
    if getrandom(&mut b).is_err() {
        // No entropy yet: the clock still differs between runs.
        let t = now_millis() as u128;
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

pub fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Cuts `s` to at most [`MAX_TEXT`] bytes on a character boundary.
pub fn cap_text(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Journal {
    pub fn new(instance: String) -> Self {
        Journal {
            queues: Mutex::new(Queues::default()),
            ready: Notify::new(),
            instance,
        }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn log(&self, level: log::Level, target: &str, message: String, container_id: &str) {
        let rec = LogRecord {
            level: level as u32,
            target: cap_text(target.to_string()),
            message: cap_text(message),
            container_id: container_id.to_string(),
            unix_millis: now_millis(),
            ..Default::default()
        };
        {
            let mut q = self.queues();
            if q.logs.len() >= MAX_LOGS {
                q.logs.pop_front();
                q.dropped_logs += 1;
            }
            q.logs.push_back(rec);
        }
        self.ready.notify_one();
    }

    pub fn event(&self, kind: Kind, container_id: &str, syscall: Option<i64>, detail: String) {
        let ev = SecurityEvent {
            kind: kind.into(),
            container_id: container_id.to_string(),
            syscall: syscall.unwrap_or(-1),
            detail: cap_text(detail),
            unix_millis: now_millis(),
            ..Default::default()
        };
        {
            let mut q = self.queues();
            if q.events.len() >= MAX_EVENTS {
                q.events.pop_front();
                q.dropped_events += 1;
            }
            q.events.push_back(ev);
        }
        self.ready.notify_one();
    }

    /// Takes what is pending (at most [`MAX_BATCH`] of each).
    fn take(&self) -> GetEventsResponse {
        let mut q = self.queues();
        let n = q.logs.len().min(MAX_BATCH);
        let logs = q.logs.drain(..n).collect();
        let n = q.events.len().min(MAX_BATCH);
        let events = q.events.drain(..n).collect();
        GetEventsResponse {
            agent_instance: self.instance.clone(),
            logs,
            events,
            dropped_logs: q.dropped_logs,
            dropped_events: q.dropped_events,
            ..Default::default()
        }
    }

    fn pending(&self) -> bool {
        let q = self.queues();
        !q.logs.is_empty() || !q.events.is_empty()
    }

    /// Waits up to `wait` for something pending, then takes it.
    pub async fn fetch(&self, wait: Duration) -> GetEventsResponse {
        let wait = wait.min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the check, so a push in between is not missed.
            let notified = self.ready.notified();
            if self.pending() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queues_drop_the_oldest_and_count_it() {
        let j = Journal::new("x".into());
        for i in 0..MAX_LOGS + 3 {
            j.log(log::Level::Info, "t", format!("{i}"), "");
        }
        let r = j.take();
        assert_eq!(r.logs.len(), MAX_BATCH);
        assert_eq!(r.logs[0].message, "3");
        assert_eq!(r.dropped_logs, 3);
        assert_eq!(r.agent_instance, "x");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let s = cap_text("é".repeat(MAX_TEXT));
        assert!(s.len() <= MAX_TEXT && s.len() >= MAX_TEXT - 1);
        assert!(s.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn fetch_returns_at_once_when_something_is_pending_and_waits_otherwise() {
        let j = Journal::new("x".into());
        j.event(Kind::MODULE_LOAD, "c1", Some(175), "init_module".into());
        let t = std::time::Instant::now();
        let r = j.fetch(Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].syscall, 175);
        let r = j.fetch(Duration::from_millis(50)).await;
        assert!(r.events.is_empty() && r.logs.is_empty());
    }
}
