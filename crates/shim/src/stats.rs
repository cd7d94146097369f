//! Agent stats -> containerd's cgroup v2 metrics (what `ctr task metrics` decodes).

use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::MessageField;
use vessel_protocol::agent::StatsContainerResponse;

pub fn to_cgroup2_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    m
}
