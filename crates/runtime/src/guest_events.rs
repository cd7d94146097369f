//! What the guest reports besides exits: the agent's and the guest kernel's
//! log lines, and security events (escape monitoring; docs/threat-model.md).
//!
//! The guest is hostile. Everything here comes from `GetEvents` replies and is
//! checked and capped by [`from_reply`] (sizes, counts, characters, ids) and
//! rate-limited by [`RateLimit`] before a front-end writes it anywhere.

use std::time::{Duration, Instant};

use serde::Serialize;
use vessel_protocol::agent::{security_event::Kind as WireKind, GetEventsResponse};

/// Most log records / events taken from one reply (the agent sends at most 256).
pub const MAX_BATCH: usize = 256;
/// Longest message or detail kept, in characters.
pub const MAX_TEXT: usize = 1024;
/// Longest log target ("kernel", an agent module path) kept.
pub const MAX_TARGET: usize = 64;
/// Longest agent instance id accepted.
pub const MAX_INSTANCE: usize = 64;
/// Log records per second a sandbox may write into its host log (burst: one window).
pub const LOG_RATE: u32 = 200;
/// Security events per second a sandbox may report (burst: one window).
pub const EVENT_RATE: u32 = 50;

/// The log target the front-ends log guest lines under.
pub const LOG_TARGET: &str = "vessel::guest";

/// One line of the agent's or the guest kernel's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestLog {
    #[serde(skip)]
    pub level: log::Level,
    /// "kernel" or the agent's module path.
    pub source: String,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Guest clock, milliseconds since the epoch (not trusted for ordering).
    pub guest_time_ms: i64,
}

/// What a security event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityKind {
    SeccompDenied,
    ModuleLoad,
    SysrqTrigger,
    AgentPathMount,
    PtraceAgent,
    KernelOops,
    /// The agent's instance id changed: the agent (and so the guest) restarted.
    AgentRestarted,
    /// The agent, the guest's PID 1, exited: the guest kernel panicked ("Attempted to
    /// kill init") and the VM ended. Host only: read from the dead VM's console.
    AgentExited,
}

/// A security event of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    pub kind: SecurityKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// x86_64 syscall number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<u32>,
    pub detail: String,
    pub guest_time_ms: i64,
}

/// One checked `GetEvents` reply.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestEvents {
    pub instance: String,
    pub logs: Vec<GuestLog>,
    pub events: Vec<SecurityEvent>,
    pub dropped_logs: u64,
    pub dropped_events: u64,
}

/// `text` cut to `max` characters, control characters (newlines, escapes)
/// blanked so that a guest line cannot forge host log lines.
pub fn clean(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn container(id: &str) -> Option<String> {
    vessel_protocol::id::valid_id(id).then(|| id.to_string())
}

fn level(n: u32) -> log::Level {
    match n {
        1 => log::Level::Error,
        2 => log::Level::Warn,
        4 => log::Level::Debug,
        5 => log::Level::Trace,
        _ => log::Level::Info,
    }
}

fn kind(k: WireKind) -> Option<SecurityKind> {
    Some(match k {
        WireKind::SECCOMP_DENIED => SecurityKind::SeccompDenied,
        WireKind::MODULE_LOAD => SecurityKind::ModuleLoad,
        WireKind::SYSRQ_TRIGGER => SecurityKind::SysrqTrigger,
        WireKind::AGENT_PATH_MOUNT => SecurityKind::AgentPathMount,
        WireKind::PTRACE_AGENT => SecurityKind::PtraceAgent,
        WireKind::KERNEL_OOPS => SecurityKind::KernelOops,
        WireKind::UNKNOWN => return None,
    })
}

/// The event of a VM that died, if the last lines of its console log (`tail`, already
/// capped by the caller) show the guest kernel crashing: the guest kernel panics on an
/// oops (guest/kernel/vessel.config), so the agent cannot report it and the console is
/// where it is left. The first crash line is the detail; it is `agent_exited` if that
/// line is the panic of init's exit (the agent is PID 1), else `kernel_oops`. The
/// console is guest-writable (a process that may write /dev/kmsg can print such a line
/// too), so this names what the console showed when the VM ended; it does not prove a
/// kernel bug or the agent's death. Time: the host's.
pub fn console_crash(tail: &str) -> Option<SecurityEvent> {
    use vessel_protocol::kernel::{console_message, is_crash, is_init_exit};
    let line = tail.lines().map(console_message).find(|m| is_crash(m))?;
    let kind = if is_init_exit(line) {
        SecurityKind::AgentExited
    } else {
        SecurityKind::KernelOops
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Some(SecurityEvent {
        kind,
        container: None,
        syscall: None,
        detail: clean(line, MAX_TEXT),
        guest_time_ms: now,
    })
}

/// Checks and caps a reply. An invalid instance id is an error; past that,
/// entries over the batch cap are dropped (counted), bad container ids
/// become none, unknown event kinds are dropped (counted), text is cleaned.
pub fn from_reply(r: GetEventsResponse) -> Result<GuestEvents, String> {
    if r.agent_instance.is_empty()
        || r.agent_instance.len() > MAX_INSTANCE
        || !r.agent_instance.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return Err("agent instance id is not 1-64 ASCII letters and digits".into());
    }
    let mut out = GuestEvents {
        instance: r.agent_instance,
        dropped_logs: r.dropped_logs,
        dropped_events: r.dropped_events,
        ..Default::default()
    };
    let extra_logs = r.logs.len().saturating_sub(MAX_BATCH) as u64;
    out.logs = r
        .logs
        .into_iter()
        .take(MAX_BATCH)
        .map(|l| GuestLog {
            level: level(l.level),
            source: clean(&l.target, MAX_TARGET),
            msg: clean(&l.message, MAX_TEXT),
            container: container(&l.container_id),
            guest_time_ms: l.unix_millis,
        })
        .collect();
    let mut extra_events = r.events.len().saturating_sub(MAX_BATCH) as u64;
    for e in r.events.into_iter().take(MAX_BATCH) {
        let Some(k) = e.kind.enum_value().ok().and_then(kind) else {
            extra_events += 1;
            continue;
        };
        out.events.push(SecurityEvent {
            kind: k,
            container: container(&e.container_id),
            syscall: u32::try_from(e.syscall).ok().filter(|&n| n < 4096),
            detail: clean(&e.detail, MAX_TEXT),
            guest_time_ms: e.unix_millis,
        });
    }
    out.dropped_logs = out.dropped_logs.saturating_add(extra_logs);
    out.dropped_events = out.dropped_events.saturating_add(extra_events);
    Ok(out)
}

/// A fixed-window rate limit: at most `rate` items per second.
#[derive(Debug)]
pub struct RateLimit {
    rate: u32,
    window: Instant,
    used: u32,
    /// Items refused since the last [`RateLimit::take_refused`].
    refused: u64,
}

impl RateLimit {
    pub fn new(rate: u32) -> Self {
        RateLimit {
            rate,
            window: Instant::now(),
            used: 0,
            refused: 0,
        }
    }

    /// Keeps as many of `items` as the current window still allows.
    pub fn admit<T>(&mut self, mut items: Vec<T>, now: Instant) -> Vec<T> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        let room = self.rate.saturating_sub(self.used) as usize;
        if items.len() > room {
            self.refused += (items.len() - room) as u64;
            items.truncate(room);
        }
        self.used += items.len() as u32;
        items
    }

    /// How many were refused since the last call.
    pub fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.refused)
    }
}

/// Tracks the agent instance across replies.
#[derive(Debug, Default)]
pub struct InstanceWatch(Option<String>);

impl InstanceWatch {
    /// The event to report when `instance` differs from the previous one.
    pub fn check(&mut self, instance: &str) -> Option<SecurityEvent> {
        let prev = self.0.replace(instance.to_string())?;
        (prev != instance).then(|| SecurityEvent {
            kind: SecurityKind::AgentRestarted,
            container: None,
            syscall: None,
            detail: format!("agent instance {prev} is now {instance}"),
            guest_time_ms: 0,
        })
    }
}

/// The JSON object a front-end logs for a guest line: the line's fields and
/// the sandbox id.
pub fn log_json(sandbox: &str, l: &GuestLog) -> serde_json::Value {
    let mut v = serde_json::to_value(l).expect("a GuestLog serializes");
    v["sandbox"] = sandbox.into();
    v
}

/// Logs a guest line under [`LOG_TARGET`] at its level; the message is
/// [`log_json`] (a front-end's JSON log format flattens it into the line).
pub fn log_guest_line(sandbox: &str, l: &GuestLog) {
    log::log!(target: LOG_TARGET, l.level, "{}", log_json(sandbox, l));
}

/// File in a container's state directory holding its security events, one
/// JSON object a line (what `vessel events` prints).
pub const EVENTS_FILE: &str = "security-events";
/// Most security events kept in [`EVENTS_FILE`]; later ones are counted in the
/// log only.
pub const MAX_RECORDED: u64 = 1000;

/// Appends `e` to `<dir>/security-events` unless `recorded` reached
/// [`MAX_RECORDED`]; counts it in `recorded`.
pub fn record(dir: &std::path::Path, e: &SecurityEvent, recorded: &mut u64) {
    use std::io::Write;
    *recorded += 1;
    if *recorded > MAX_RECORDED {
        return;
    }
    let line = format!(
        "{}\n",
        serde_json::to_string(e).expect("an event serializes")
    );
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(EVENTS_FILE))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        log::warn!("record a security event in {}: {e}", dir.display());
    }
}

/// The security events recorded in `<dir>/security-events` (written by the
/// host's supervisor, so trusted to be JSON lines; bad lines are skipped).
pub fn recorded(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(EVENTS_FILE)).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Logs a security event as a warning (the line a person or a log shipper sees).
pub fn log_security_event(sandbox: &str, e: &SecurityEvent) {
    let mut v = serde_json::to_value(e).expect("an event serializes");
    v["sandbox"] = sandbox.into();
    log::warn!(target: LOG_TARGET, "{v}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_crash_on_the_console_of_a_dead_vm_is_a_kernel_oops_event() {
        let tail = "[    1.0] virtio_fs: request\n[    2.5] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP\n[    2.6] Kernel panic - not syncing: Fatal exception\n";
        let e = console_crash(tail).unwrap();
        assert_eq!(e.kind, SecurityKind::KernelOops);
        assert!(
            e.detail.starts_with("general protection fault"),
            "{}",
            e.detail
        );
        assert_eq!(e.container, None);
        assert_eq!(console_crash("[ 1.0] reboot: Power down\nbye\n"), None);
        // Control characters of a hostile console line are blanked.
        let e = console_crash("Oops: \x1b[2Jx").unwrap();
        assert_eq!(e.detail, "Oops:  [2Jx");
    }

    #[test]
    fn the_panic_of_the_agents_exit_on_the_console_of_a_dead_vm_is_an_agent_exited_event() {
        let tail = "[    6.9] virtio_fs: request\n[    7.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n[    7.1] CPU: 0 PID: 1 Comm: vessel-agent Not tainted 6.1.0\n[    7.2] ---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009 ]---\n";
        let e = console_crash(tail).unwrap();
        assert_eq!(e.kind, SecurityKind::AgentExited);
        assert_eq!(
            e.detail,
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009"
        );
        assert_eq!(e.container, None);
        assert_eq!(
            serde_json::to_value(e.kind).unwrap(),
            serde_json::json!("agent_exited")
        );
        // Another panic stays a kernel oops.
        let e =
            console_crash("[ 3.0] Kernel panic - not syncing: sysrq triggered crash\n").unwrap();
        assert_eq!(e.kind, SecurityKind::KernelOops);
        // An oops that ends init first is reported as the oops it was.
        let e = console_crash("[ 2.0] BUG: kernel NULL pointer dereference, address: 0\n[ 2.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n").unwrap();
        assert_eq!(e.kind, SecurityKind::KernelOops);
    }

    use super::*;
    use vessel_protocol::agent::{LogRecord, SecurityEvent as WireEvent};

    fn reply() -> GetEventsResponse {
        GetEventsResponse {
            agent_instance: "abc123".into(),
            ..Default::default()
        }
    }

    #[test]
    fn bad_instance_ids_are_refused() {
        for bad in ["", "a b", "x\n", &"a".repeat(65)] {
            let mut r = reply();
            r.agent_instance = bad.to_string();
            assert!(from_reply(r).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_is_capped_and_cleaned_and_bad_ids_dropped() {
        let mut r = reply();
        r.logs.push(LogRecord {
            level: 99,
            target: "t".repeat(500),
            message: format!("line\n{{\"level\":\"error\"}}\x1b[31m{}", "x".repeat(5000)),
            container_id: "../etc".into(),
            ..Default::default()
        });
        let g = from_reply(r).unwrap();
        let l = &g.logs[0];
        assert_eq!(l.level, log::Level::Info);
        assert_eq!(l.source.chars().count(), MAX_TARGET);
        assert_eq!(l.msg.chars().count(), MAX_TEXT);
        assert!(!l.msg.chars().any(char::is_control));
        assert_eq!(l.container, None);
    }

    #[test]
    fn batches_over_the_cap_and_unknown_kinds_are_dropped_and_counted() {
        let mut r = reply();
        r.dropped_events = 7;
        for i in 0..MAX_BATCH + 10 {
            r.logs.push(LogRecord {
                message: format!("{i}"),
                ..Default::default()
            });
        }
        r.events.push(WireEvent {
            kind: WireKind::MODULE_LOAD.into(),
            container_id: "c1".into(),
            syscall: 313,
            ..Default::default()
        });
        r.events.push(WireEvent {
            kind: vessel_protocol::protobuf::EnumOrUnknown::from_i32(42),
            syscall: -5,
            ..Default::default()
        });
        r.events.push(WireEvent {
            kind: WireKind::KERNEL_OOPS.into(),
            syscall: 1 << 40,
            ..Default::default()
        });
        let g = from_reply(r).unwrap();
        assert_eq!(g.logs.len(), MAX_BATCH);
        assert_eq!(g.dropped_logs, 10);
        assert_eq!(g.events.len(), 2);
        assert_eq!(g.dropped_events, 8);
        assert_eq!(g.events[0].kind, SecurityKind::ModuleLoad);
        assert_eq!(g.events[0].container.as_deref(), Some("c1"));
        assert_eq!(g.events[0].syscall, Some(313));
        assert_eq!(g.events[1].syscall, None);
    }

    #[test]
    fn the_rate_limit_refuses_past_its_window_and_counts() {
        let mut rl = RateLimit::new(3);
        let t = Instant::now();
        assert_eq!(rl.admit(vec![1, 2], t), vec![1, 2]);
        assert_eq!(rl.admit(vec![3, 4, 5], t), vec![3]);
        assert_eq!(rl.take_refused(), 2);
        assert_eq!(rl.admit(vec![6], t + Duration::from_secs(1)), vec![6]);
        assert_eq!(rl.take_refused(), 0);
    }

    #[test]
    fn a_new_agent_instance_is_a_restart() {
        let mut w = InstanceWatch::default();
        assert_eq!(w.check("a"), None);
        assert_eq!(w.check("a"), None);
        let e = w.check("b").unwrap();
        assert_eq!(e.kind, SecurityKind::AgentRestarted);
    }

    #[test]
    fn recorded_events_are_capped_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let e = SecurityEvent {
            kind: SecurityKind::PtraceAgent,
            container: Some("c1".into()),
            syscall: Some(101),
            detail: "d".into(),
            guest_time_ms: 1,
        };
        let mut n = MAX_RECORDED - 1;
        record(dir.path(), &e, &mut n);
        record(dir.path(), &e, &mut n);
        assert_eq!(n, MAX_RECORDED + 1);
        let r = recorded(dir.path());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["kind"], "ptrace_agent");
        assert_eq!(r[0]["syscall"], 101);
    }

    #[test]
    fn guest_lines_are_logged_with_the_sandbox_and_container() {
        let l = GuestLog {
            level: log::Level::Warn,
            source: "kernel".into(),
            msg: "m".into(),
            container: Some("c1".into()),
            guest_time_ms: 5,
        };
        let v = log_json("pod1", &l);
        assert_eq!(v["sandbox"], "pod1");
        assert_eq!(v["container"], "c1");
        assert_eq!(v["source"], "kernel");
        assert_eq!(v["msg"], "m");
    }
}
