//! Reads a container's cgroup v2 files: stats, pids, OOM kills.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use vessel_protocol::agent::{CpuStats, MemoryStats, PidsStats, StatsContainerResponse};

/// How often memory.events is read for OOM kills.
const OOM_POLL: Duration = Duration::from_millis(250);

/// The cgroup v2 directory of a container.
pub fn dir(container_id: &str) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
        .join(super::spec::cgroup_path(container_id).trim_start_matches('/'))
}

/// `key value` lines (memory.stat, memory.events, cpu.stat) as a map.
pub fn parse_flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, with `max` as 0 (= unlimited).
fn read_u64(path: PathBuf) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn read_keyed(path: PathBuf) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_flat_keyed(&text)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Stats of a container's cgroup; missing files read as 0.
pub fn stats(container_id: &str) -> StatsContainerResponse {
    let d = dir(container_id);
    let mem = read_keyed(d.join("memory.stat"));
    let events = read_keyed(d.join("memory.events"));
    let cpu = read_keyed(d.join("cpu.stat"));
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    StatsContainerResponse {
        memory: Some(MemoryStats {
            usage_bytes: read_u64(d.join("memory.current")),
            limit_bytes: read_u64(d.join("memory.max")),
            anon_bytes: get(&mem, "anon"),
            file_bytes: get(&mem, "file"),
            oom_events: get(&events, "oom"),
            oom_kill_events: get(&events, "oom_kill"),
            ..Default::default()
        })
        .into(),
        cpu: Some(CpuStats {
            usage_usec: get(&cpu, "usage_usec"),
            user_usec: get(&cpu, "user_usec"),
            system_usec: get(&cpu, "system_usec"),
            nr_throttled: get(&cpu, "nr_throttled"),
            throttled_usec: get(&cpu, "throttled_usec"),
            ..Default::default()
        })
        .into(),
        pids: Some(PidsStats {
            current: read_u64(d.join("pids.current")),
            limit: read_u64(d.join("pids.max")),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Pids in a container's cgroup and its descendants.
pub fn pids(container_id: &str) -> Vec<u32> {
    fn walk(d: &std::path::Path, out: &mut Vec<u32>) {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir(container_id), &mut out);
    out
}

/// Source of the container ids currently watched for OOM kills.
pub trait Watched: Send + Sync + 'static {
    fn container_ids(&self) -> Vec<String>;
}

/// Turns oom_kill counters of memory.events into one event per kill.
pub struct OomWatcher {
    seen: Mutex<HashMap<String, u64>>,
    tx: mpsc::Sender<String>,
}

impl OomWatcher {
    pub fn new(tx: mpsc::Sender<String>) -> Self {
        OomWatcher {
            seen: Mutex::new(HashMap::new()),
            tx,
        }
    }

    /// Queues one event per oom_kill of `id` not reported yet. Called by the
    /// poller and once more before a container's cgroup is removed, so a kill
    /// just before removal is not lost.
    pub fn check(&self, id: &str) {
        let kills = read_keyed(dir(id).join("memory.events"))
            .get("oom_kill")
            .copied()
            .unwrap_or(0);
        let before = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), kills)
            .unwrap_or(0);
        for _ in before..kills {
            log::info!("container {id}: OOM kill");
            if self.tx.try_send(id.to_string()).is_err() {
                log::warn!("OOM event queue full or closed; dropped an event of {id}");
            }
        }
    }

    /// Stops tracking a removed container.
    pub fn forget(&self, id: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Polls memory.events of every container until the process ends.
pub async fn watch_oom(watched: Arc<dyn Watched>, oom: Arc<OomWatcher>) {
    let mut tick = tokio::time::interval(OOM_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for id in watched.container_ids() {
            oom.check(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_keyed() {
        let m = parse_flat_keyed("low 0\nhigh 3\noom 2\noom_kill 1\nbroken\nx y\n");
        assert_eq!(m.get("oom_kill"), Some(&1));
        assert_eq!(m.get("high"), Some(&3));
        assert_eq!(m.len(), 4);
    }
}
