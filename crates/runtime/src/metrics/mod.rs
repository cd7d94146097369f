//! Prometheus metrics (docs/monitoring.md): every pod serves its own on
//! `<run_dir>/metrics.sock` (HTTP GET, OpenMetrics text, mode 0600), and
//! [`monitor`] gathers every sandbox of the host into one endpoint
//! (`vessel monitor`).
//!
//! A scrape reads the cheap /proc files of the sandbox's host processes and serves
//! the latest [`GuestSnapshot`], which a sampler in the background takes while the
//! sandbox is scraped ([`GuestCache`]): the guest-wide numbers (`GuestMetrics`) and
//! each container's cgroup stats (`StatsContainer`), each bounded by
//! [`GUEST_TIMEOUT`], and the host processes' PSS. A guest that does not answer
//! costs the scrape its guest families, never the host ones, and never a wait
//! beyond the first scrape's. Everything from the guest is checked and capped
//! first ([`crate::agent::reply::guest_metrics`]).

pub mod http;
pub mod monitor;
pub mod procfs;

use std::borrow::Cow;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tokio::task::{JoinHandle, JoinSet};
use vessel_protocol::agent::{GuestMetricsResponse, StatsContainerResponse};

use crate::Sandbox;

/// The socket's name in the sandbox's run directory.
pub const SOCKET: &str = "metrics.sock";
/// Longest wait for each guest call of a scrape.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest time one connection to the socket is served.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once; more are closed unanswered.
const MAX_CONNECTIONS: usize = 8;
/// Most containers of one pod whose stats one scrape asks for.
const MAX_CONTAINERS: usize = 64;

type Labels = Vec<(String, String)>;
type GaugeF = Gauge<f64, AtomicU64>;
type CounterF = Counter<f64, AtomicU64>;

fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Agent RPC latencies by method (`vessel_agent_rpc_duration_seconds`), recorded
/// by [`crate::agent::AgentClient`]; clones share one histogram family.
#[derive(Clone, Debug)]
pub struct RpcLatency(Family<Labels, Histogram, fn() -> Histogram>);

fn latency_histogram() -> Histogram {
    // 1 ms .. 16 s, x4: few buckets, as every sandbox repeats them per method.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

impl Default for RpcLatency {
    fn default() -> Self {
        RpcLatency(Family::new_with_constructor(latency_histogram))
    }
}

impl RpcLatency {
    /// Records one call of `method` (`Agent.X` is recorded as `X`).
    pub fn observe(&self, method: &str, took: Duration) {
        let method = method.strip_prefix("Agent.").unwrap_or(method);
        self.0
            .get_or_create(&labels([("method", method)]))
            .observe(took.as_secs_f64());
    }
}

/// Security events a sandbox's guest reported (`vessel_guest_security_events_total`),
/// by kind and container; counted by the pod's guest events loop, clones share one
/// family.
#[derive(Clone, Debug, Default)]
pub struct SecurityEvents(Family<Labels, CounterF>);

impl SecurityEvents {
    /// Counts `event` (the host has validated it: its kind is one of ours, its
    /// container id a valid id).
    pub fn count(&self, event: &crate::guest_events::SecurityEvent) {
        let kind = serde_json::to_value(event.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let container = event.container.as_deref().unwrap_or("");
        self.0
            .get_or_create(&labels([("kind", &kind), ("container_id", container)]))
            .inc();
    }
}

/// What a pod's metrics are made from.
pub struct Source {
    /// The pod's id: label `sandbox_id` of every sample.
    pub id: String,
    pub backend: &'static str,
    pub sandbox: Arc<Sandbox>,
    /// The pod's containers whose cgroup stats are wanted (the live ones).
    pub containers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    pub guest: GuestCache,
    pub security: SecurityEvents,
}

/// What the guest said, and the host processes' PSS, at one time.
pub struct GuestSnapshot {
    /// Tokio's clock (paused in the unit tests).
    pub taken: tokio::time::Instant,
    /// `None`: no answer to `GuestMetrics` within [`GUEST_TIMEOUT`].
    pub guest: Option<GuestMetricsResponse>,
    /// The containers that answered `StatsContainer` in time.
    pub containers: Vec<(String, StatsContainerResponse)>,
    /// PSS in bytes of the sandbox's host processes, by pid (`smaps_rollup` walks
    /// every page of the process: too slow for the scrape path of a big VM).
    pub pss: Vec<(u32, u64)>,
    /// When `pss` was read: every [`PSS_EVERY`], not with every snapshot.
    pub pss_taken: tokio::time::Instant,
}

/// Snapshots of the guest's numbers, sampled in the background so that a scrape
/// never waits for the guest: every [`REFRESH_EVERY`] while the sandbox is
/// scraped, paused after [`IDLE_AFTER`] without a scrape (an unwatched sandbox
/// costs its guest nothing). A scrape serves the latest snapshot when it is at most
/// [`MAX_AGE`] old; otherwise (the first scrape, the first after a pause) it wakes
/// the sampler and waits for the next one, up to [`GUEST_TIMEOUT`] +
/// [`REFRESH_WAIT`]. One sampler per sandbox: the guest has at most one
/// `GuestMetrics` (and one `StatsContainer` per container) in flight.
#[derive(Default)]
pub struct GuestCache {
    latest: tokio::sync::watch::Sender<Option<Arc<GuestSnapshot>>>,
    /// Wakes a paused sampler.
    wake: tokio::sync::Notify,
    last_scrape: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// How often the sampler takes a snapshot while the sandbox is scraped.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// The oldest snapshot a scrape serves: one period, one guest call and 1 s slack.
pub const MAX_AGE: Duration = Duration::from_secs(7);
/// How often the host processes' PSS is read (each read walks every page of the
/// VMM: 6 ms median for a 256 MiB QEMU TCG guest here, more for a bigger VM).
pub const PSS_EVERY: Duration = Duration::from_secs(15);
/// How long without a scrape before the sampler pauses.
pub const IDLE_AFTER: Duration = Duration::from_secs(300);
/// Slack for the sampler's own work when a scrape waits for a snapshot.
pub const REFRESH_WAIT: Duration = Duration::from_millis(20);

impl GuestCache {
    /// The snapshot a scrape serves (above). `running`: false once the VM has
    /// exited, when nothing is waited for.
    pub async fn get(&self, running: bool) -> Option<Arc<GuestSnapshot>> {
        *self.last_scrape.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(tokio::time::Instant::now());
        let current = self.latest.borrow().clone();
        if !running
            || current
                .as_ref()
                .is_some_and(|s| s.taken.elapsed() <= MAX_AGE)
        {
            return current;
        }
        let mut updates = self.latest.subscribe();
        updates.borrow_and_update();
        self.wake.notify_one();
        match tokio::time::timeout(GUEST_TIMEOUT + REFRESH_WAIT, updates.changed()).await {
            Ok(Ok(())) => self.latest.borrow().clone(),
            _ => current,
        }
    }

    /// The sampler: takes a snapshot with `take` every [`REFRESH_EVERY`] while
    /// scraped; ends when `take` answers `None` (the VM is gone) or the task is
    /// dropped.
    pub async fn sample<F, Fut>(&self, mut take: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<GuestSnapshot>>,
    {
        loop {
            let scraped = self
                .last_scrape
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < IDLE_AFTER);
            if !scraped {
                self.wake.notified().await;
                continue;
            }
            let Some(snapshot) = take().await else {
                return;
            };
            self.latest.send_replace(Some(Arc::new(snapshot)));
            tokio::time::sleep(REFRESH_EVERY).await;
        }
    }
}

/// One snapshot of `source`; `None` once its VM has exited.
async fn take_snapshot(source: &Source) -> Option<GuestSnapshot> {
    let sb = &source.sandbox;
    if sb.vm().try_exit().is_some() {
        return None;
    }
    let mut ids = (source.containers)();
    ids.truncate(MAX_CONTAINERS);
    let previous = source.guest.latest.borrow().clone();
    let pss = async {
        match previous {
            Some(p) if p.pss_taken.elapsed() < PSS_EVERY => (p.pss.clone(), p.pss_taken),
            _ => {
                let pids = sb.host_pids();
                // Off the runtime's thread: it serves the socket meanwhile.
                let read = tokio::task::spawn_blocking(move || {
                    pids.into_iter()
                        .filter_map(|pid| Some((pid, procfs::pss(Path::new("/proc"), pid)?)))
                        .collect()
                });
                (read.await.unwrap_or_default(), tokio::time::Instant::now())
            }
        }
    };
    let (mut snapshot, (pss, pss_taken)) = tokio::join!(fetch_guest(sb.agent(), ids), pss);
    snapshot.pss = pss;
    snapshot.pss_taken = pss_taken;
    Some(snapshot)
}

async fn fetch_guest(agent: &crate::agent::AgentClient, ids: Vec<String>) -> GuestSnapshot {
    let guest = async { agent.guest_metrics(GUEST_TIMEOUT).await.ok() };
    let stats = futures::future::join_all(ids.into_iter().map(|id| async move {
        let s = tokio::time::timeout(GUEST_TIMEOUT, agent.stats(&id)).await;
        s.ok().and_then(Result::ok).map(|s| (id, s))
    }));
    let (guest, stats) = tokio::join!(guest, stats);
    GuestSnapshot {
        taken: tokio::time::Instant::now(),
        guest,
        containers: stats.into_iter().flatten().collect(),
        pss: Vec::new(),
        pss_taken: tokio::time::Instant::now(),
    }
}

/// One sandbox's metrics socket and its sampler, until [`MetricsServer::stop`].
pub struct MetricsServer {
    path: PathBuf,
    tasks: [JoinHandle<()>; 2],
}

impl MetricsServer {
    /// Binds `<run_dir>/metrics.sock` (mode 0600) and serves it.
    pub fn start(source: Source) -> std::io::Result<MetricsServer> {
        let path = socket_path(source.sandbox.run_dir());
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let source = Arc::new(source);
        let sampled = source.clone();
        let sampler = tokio::spawn(async move {
            let s = &sampled;
            s.guest.sample(|| take_snapshot(s)).await;
        });
        let server = tokio::spawn(serve(listener, source));
        Ok(MetricsServer {
            path,
            tasks: [server, sampler],
        })
    }

    /// Stops serving (connections in flight are dropped) and sampling, and
    /// removes the socket.
    pub async fn stop(self) {
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where the sandbox whose run directory is `run_dir` serves its metrics.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join(SOCKET)
}

async fn serve(listener: UnixListener, source: Arc<Source>) {
    // Dropped (with the task) on stop: aborts the connections in flight.
    let mut connections = JoinSet::new();
    loop {
        let mut conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                log::warn!("pod {}: metrics socket: {e}", source.id);
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            continue;
        }
        let source = source.clone();
        connections.spawn(async move {
            let served = http::answer(&mut conn, render(&source));
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, served).await;
        });
    }
}

/// The sandbox's state as the metrics report it.
fn state(sandbox: &Sandbox) -> &'static str {
    match sandbox.vm().try_exit() {
        None => "running",
        Some(_) => "vm_exited",
    }
}

/// A scrape: every family of one sandbox, in OpenMetrics text.
pub async fn render(source: &Source) -> String {
    let sb = &source.sandbox;
    let guest = source.guest.get(sb.vm().try_exit().is_none()).await;
    let stats = guest.as_ref().map_or(&[][..], |g| &g.containers[..]);
    let pss = guest.as_ref().map_or(&[][..], |g| &g.pss[..]);

    let mut reg = Registry::with_labels(
        [(Cow::from("sandbox_id"), Cow::from(source.id.clone()))].into_iter(),
    );
    let mut out = Families(&mut reg);
    let accelerator = sb.vm().accelerator().to_string();
    out.gauge(
        "vessel_sandbox_info",
        "The sandbox: hypervisor backend, accelerator and state (running, vm_exited)",
        [(
            labels([
                ("backend", source.backend),
                ("accelerator", &accelerator),
                ("state", state(sb)),
            ]),
            1.0,
        )],
    );
    let timing = sb.timing();
    out.gauge(
        "vessel_sandbox_boot_seconds",
        "Time from the VMM's launch (or restore) until the agent answered",
        [(Labels::new(), timing.boot.as_secs_f64())],
    );
    if let Some(r) = timing.restore {
        out.gauge(
            "vessel_sandbox_restore_seconds",
            "Time the hypervisor took to restore the VM from its template snapshot",
            [(Labels::new(), r.as_secs_f64())],
        );
    }
    host_families(&mut out, sb, pss);
    match guest.as_ref().and_then(|g| Some((g, g.guest.as_ref()?))) {
        Some((snap, g)) => {
            guest_families(&mut out, g);
            out.gauge(
                "vessel_guest_metrics_age_seconds",
                "Age of the guest numbers served (fetched in the background)",
                [(Labels::new(), snap.taken.elapsed().as_secs_f64())],
            );
            out.gauge(
                "vessel_process_proportional_memory_age_seconds",
                "Age of the PSS served (read in the background)",
                [(Labels::new(), snap.pss_taken.elapsed().as_secs_f64())],
            );
        }
        None => out.gauge(
            "vessel_guest_up",
            "1 if the guest answered GuestMetrics",
            [(Labels::new(), 0.0)],
        ),
    }
    container_families(&mut out, stats);
    reg.register(
        "vessel_guest_security_events",
        "Security events the guest reported (seccomp denials, module loads, mounts of \
         the agent's paths, ptrace of the agent, kernel oopses, agent restarts and exits), by kind",
        source.security.0.clone(),
    );
    reg.register(
        "vessel_agent_rpc_duration_seconds",
        "Agent RPC latency seen by the host, by method",
        sb.agent().latency().0.clone(),
    );
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &reg) {
        log::warn!("pod {}: encoding metrics: {e}", source.id);
    }
    text
}

/// Registers families of samples on one registry.
struct Families<'a>(&'a mut Registry);

impl Families<'_> {
    fn gauge(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, f64)>) {
        let family = Family::<Labels, GaugeF>::default();
        for (l, v) in samples {
            family.get_or_create(&l).set(v);
        }
        self.0.register(name, help, family);
    }

    /// `name` without `_total` (the encoder adds it).
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let family = Family::<Labels, CounterF>::default();
        for (l, v) in samples {
            family.get_or_create(&l).inc_by(v);
        }
        self.0.register(name, help, family);
    }
}

/// `pss`: the latest sample's PSS by pid (processes started since have none).
fn host_families(out: &mut Families, sb: &Sandbox, pss: &[(u32, u64)]) {
    let vmm = sb.vm().pids().first().copied();
    let me = std::process::id();
    let ticks = procfs::clock_ticks();
    let procs: Vec<_> = sb
        .host_pids()
        .into_iter()
        .filter_map(|pid| procfs::read(Path::new("/proc"), pid, ticks))
        .collect();
    let l = |p: &procfs::ProcStats| {
        let role = match p.pid {
            pid if Some(pid) == vmm => "vmm",
            pid if pid == me => "supervisor",
            _ => "helper",
        };
        labels([
            ("pid", &p.pid.to_string()),
            ("process", &p.comm),
            ("role", role),
        ])
    };
    let each = |f: fn(&procfs::ProcStats) -> Option<f64>| {
        procs
            .iter()
            .filter_map(|p| Some((l(p), f(p)?)))
            .collect::<Vec<_>>()
    };
    out.gauge(
        "vessel_process_resident_memory_bytes",
        "RSS of each host process of the sandbox (VMM, helpers, supervisor or shim)",
        each(|p| Some(p.rss_bytes as f64)),
    );
    out.gauge(
        "vessel_process_proportional_memory_bytes",
        "PSS (smaps_rollup) of each host process of the sandbox, read in the background \
         at most every 15 s (vessel_process_proportional_memory_age_seconds)",
        procs.iter().filter_map(|p| {
            let (_, b) = pss.iter().find(|(pid, _)| *pid == p.pid)?;
            Some((l(p), *b as f64))
        }),
    );
    out.counter(
        "vessel_process_cpu_seconds",
        "User and system CPU time of each host process of the sandbox",
        each(|p| Some(p.cpu_seconds)),
    );
    out.gauge(
        "vessel_process_open_fds",
        "Open file descriptors of each host process of the sandbox",
        each(|p| Some(p.fds as f64)),
    );
    out.gauge(
        "vessel_process_threads",
        "Threads of each host process of the sandbox",
        each(|p| Some(p.threads as f64)),
    );
}

/// USER_HZ: the unit of /proc/stat in every Linux guest.
const GUEST_USER_HZ: f64 = 100.0;

fn guest_families(out: &mut Families, g: &GuestMetricsResponse) {
    out.gauge(
        "vessel_guest_up",
        "1 if the guest answered GuestMetrics",
        [(Labels::new(), 1.0)],
    );
    let m = g.memory.get_or_default();
    out.gauge(
        "vessel_guest_memory_bytes",
        "Guest /proc/meminfo",
        [
            ("total", m.total_bytes),
            ("free", m.free_bytes),
            ("available", m.available_bytes),
            ("buffers", m.buffers_bytes),
            ("cached", m.cached_bytes),
            ("shmem", m.shmem_bytes),
        ]
        .map(|(k, v)| (labels([("kind", k)]), v as f64)),
    );
    let c = g.cpu.get_or_default();
    out.counter(
        "vessel_guest_cpu_seconds",
        "Guest CPU time by mode, all vCPUs (/proc/stat)",
        [
            ("user", c.user),
            ("nice", c.nice),
            ("system", c.system),
            ("idle", c.idle),
            ("iowait", c.iowait),
            ("irq", c.irq),
            ("softirq", c.softirq),
            ("steal", c.steal),
        ]
        .map(|(k, v)| (labels([("mode", k)]), v as f64 / GUEST_USER_HZ)),
    );
    out.gauge(
        "vessel_guest_cpus",
        "vCPUs the guest sees",
        [(Labels::new(), f64::from(c.cpus))],
    );
    let l = g.load.get_or_default();
    out.gauge(
        "vessel_guest_load",
        "Guest load average (/proc/loadavg)",
        [
            ("1m", l.load1_centi),
            ("5m", l.load5_centi),
            ("15m", l.load15_centi),
        ]
        .map(|(k, v)| (labels([("period", k)]), v as f64 / 100.0)),
    );
    let net = |f: fn(&vessel_protocol::agent::GuestNetDev) -> [u64; 2]| {
        g.net
            .iter()
            .flat_map(|n| {
                let [rx, tx] = f(n);
                [("receive", rx), ("transmit", tx)]
                    .map(|(d, v)| (labels([("interface", &n.name), ("direction", d)]), v as f64))
            })
            .collect::<Vec<_>>()
    };
    out.counter(
        "vessel_guest_network_bytes",
        "Guest network bytes by interface and direction (/proc/net/dev)",
        net(|n| [n.rx_bytes, n.tx_bytes]),
    );
    out.counter(
        "vessel_guest_network_packets",
        "Guest network packets by interface and direction",
        net(|n| [n.rx_packets, n.tx_packets]),
    );
    out.counter(
        "vessel_guest_network_errors",
        "Guest network errors by interface and direction",
        net(|n| [n.rx_errors, n.tx_errors]),
    );
    out.counter(
        "vessel_guest_network_dropped",
        "Guest network packets dropped by interface and direction",
        net(|n| [n.rx_dropped, n.tx_dropped]),
    );
    let disk = |f: fn(&vessel_protocol::agent::GuestDisk) -> [u64; 2]| {
        g.disks
            .iter()
            .flat_map(|d| {
                let [r, w] = f(d);
                [("read", r), ("write", w)]
                    .map(|(op, v)| (labels([("device", &d.name), ("op", op)]), v as f64))
            })
            .collect::<Vec<_>>()
    };
    out.counter(
        "vessel_guest_disk_operations",
        "Guest block I/O operations completed by device (/proc/diskstats)",
        disk(|d| [d.reads, d.writes]),
    );
    out.counter(
        "vessel_guest_disk_bytes",
        "Guest block I/O bytes by device",
        disk(|d| [d.read_bytes, d.written_bytes]),
    );
    out.counter(
        "vessel_guest_disk_io_seconds",
        "Time the guest spent doing block I/O, by device",
        g.disks
            .iter()
            .map(|d| (labels([("device", &d.name)]), d.io_ms as f64 / 1000.0)),
    );
}

fn container_families(out: &mut Families, stats: &[(String, StatsContainerResponse)]) {
    let each = |f: fn(&StatsContainerResponse) -> Vec<(&'static str, &'static str, f64)>| {
        stats
            .iter()
            .flat_map(|(id, s)| {
                f(s).into_iter().map(move |(k, v, x)| {
                    let mut l = labels([("container_id", id.as_str())]);
                    if !k.is_empty() {
                        l.push((k.to_string(), v.to_string()));
                    }
                    (l, x)
                })
            })
            .collect::<Vec<_>>()
    };
    out.gauge(
        "vessel_container_memory_bytes",
        "Container cgroup memory in the guest: usage, limit (0: none), anon, file",
        each(|s| {
            let m = s.memory.get_or_default();
            [
                ("usage", m.usage_bytes),
                ("limit", m.limit_bytes),
                ("anon", m.anon_bytes),
                ("file", m.file_bytes),
            ]
            .map(|(k, v)| ("kind", k, v as f64))
            .to_vec()
        }),
    );
    out.counter(
        "vessel_container_oom_kills",
        "OOM kills in the container's cgroup",
        each(|s| vec![("", "", s.memory.get_or_default().oom_kill_events as f64)]),
    );
    out.counter(
        "vessel_container_cpu_seconds",
        "Container cgroup CPU time in the guest by mode",
        each(|s| {
            let c = s.cpu.get_or_default();
            vec![
                ("mode", "user", c.user_usec as f64 / 1e6),
                ("mode", "system", c.system_usec as f64 / 1e6),
            ]
        }),
    );
    out.counter(
        "vessel_container_cpu_throttled_seconds",
        "Time the container's cgroup was throttled",
        each(|s| vec![("", "", s.cpu.get_or_default().throttled_usec as f64 / 1e6)]),
    );
    out.gauge(
        "vessel_container_pids",
        "Tasks in the container's cgroup",
        each(|s| vec![("", "", s.pids.get_or_default().current as f64)]),
    );
}

#[cfg(test)]
mod tests;
