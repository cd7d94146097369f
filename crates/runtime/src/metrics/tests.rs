use super::*;
use vessel_protocol::agent::{GuestDisk, GuestLoad, GuestNetDev, MemoryStats};

fn encode(f: impl FnOnce(&mut Families)) -> String {
    let mut reg = Registry::with_labels([(Cow::from("sandbox_id"), Cow::from("pod1"))].into_iter());
    f(&mut Families(&mut reg));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    text
}

fn guest_reply() -> GuestMetricsResponse {
    let mut g = GuestMetricsResponse::new();
    g.load = Some(GuestLoad {
        load1_centi: 125,
        ..Default::default()
    })
    .into();
    g.net = (0..40)
        .map(|i| GuestNetDev {
            name: format!("eth{i}"),
            rx_bytes: 1000,
            tx_bytes: 2000,
            ..Default::default()
        })
        .collect();
    g.net.insert(
        0,
        GuestNetDev {
            name: "bad\"name\n".into(),
            ..Default::default()
        },
    );
    g.net.insert(
        1,
        GuestNetDev {
            name: "eth0".into(),
            rx_bytes: 7,
            ..Default::default()
        },
    );
    g.disks = vec![GuestDisk {
        name: "vda".into(),
        read_bytes: 4096,
        io_ms: 1500,
        ..Default::default()
    }];
    g
}

#[test]
fn guest_reply_is_capped_and_names_checked() {
    let g = crate::agent::reply::guest_metrics(guest_reply());
    assert_eq!(g.net.len(), crate::agent::reply::MAX_GUEST_DEVICES);
    // The bad name is dropped; the first eth0 is kept, its duplicate dropped.
    assert_eq!((g.net[0].name.as_str(), g.net[0].rx_bytes), ("eth0", 7));
    assert!(g
        .net
        .iter()
        .all(|n| crate::agent::reply::device_name_ok(&n.name)));
    assert_eq!(g.net.iter().filter(|n| n.name == "eth0").count(), 1);
    assert!(!crate::agent::reply::device_name_ok(&"x".repeat(33)));
}

#[test]
fn guest_families_carry_the_sandbox_label_and_units() {
    let g = crate::agent::reply::guest_metrics(guest_reply());
    let text = encode(|out| guest_families(out, &g));
    for line in [
        "vessel_guest_up{sandbox_id=\"pod1\"} 1.0",
        "vessel_guest_load{sandbox_id=\"pod1\",period=\"1m\"} 1.25",
        "vessel_guest_network_bytes_total{sandbox_id=\"pod1\",interface=\"eth0\",direction=\"receive\"} 7.0",
        "vessel_guest_disk_bytes_total{sandbox_id=\"pod1\",device=\"vda\",op=\"read\"} 4096.0",
        "vessel_guest_disk_io_seconds_total{sandbox_id=\"pod1\",device=\"vda\"} 1.5",
        "# TYPE vessel_guest_cpu_seconds counter",
        "# TYPE vessel_guest_memory_bytes gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

#[test]
fn container_families_are_labelled_by_container() {
    let mut s = StatsContainerResponse::new();
    s.memory = Some(MemoryStats {
        usage_bytes: 1 << 20,
        oom_kill_events: 2,
        ..Default::default()
    })
    .into();
    let text = encode(|out| container_families(out, &[("c1".into(), s)]));
    for line in [
        "vessel_container_memory_bytes{sandbox_id=\"pod1\",container_id=\"c1\",kind=\"usage\"} 1048576.0",
        "vessel_container_oom_kills_total{sandbox_id=\"pod1\",container_id=\"c1\"} 2.0",
        "vessel_container_cpu_seconds_total{sandbox_id=\"pod1\",container_id=\"c1\",mode=\"user\"} 0.0",
        "vessel_container_pids{sandbox_id=\"pod1\",container_id=\"c1\"} 0.0",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

#[test]
fn rpc_latency_is_a_histogram_by_method() {
    let l = RpcLatency::default();
    l.observe("Agent.Probe", Duration::from_millis(3));
    l.clone()
        .observe("CreateContainer", Duration::from_millis(300));
    let mut reg = Registry::default();
    reg.register("vessel_agent_rpc_duration_seconds", "x", l.0.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(text.contains("# TYPE vessel_agent_rpc_duration_seconds histogram"));
    assert!(
        text.contains("vessel_agent_rpc_duration_seconds_count{method=\"Probe\"} 1"),
        "{text}"
    );
    assert!(text.contains("vessel_agent_rpc_duration_seconds_count{method=\"CreateContainer\"} 1"));
}

#[test]
fn security_events_are_counted_by_kind_and_container() {
    use crate::guest_events::{SecurityEvent, SecurityKind};
    let counts = SecurityEvents::default();
    let event = |kind, container: Option<&str>| SecurityEvent {
        kind,
        container: container.map(str::to_owned),
        syscall: None,
        detail: String::new(),
        guest_time_ms: 0,
    };
    counts.count(&event(SecurityKind::ModuleLoad, Some("c1")));
    counts.count(&event(SecurityKind::ModuleLoad, Some("c1")));
    counts.count(&event(SecurityKind::AgentRestarted, None));
    let text = encode(|f| {
        f.0.register("vessel_guest_security_events", "h", counts.0.clone())
    });
    assert!(
        text.contains(
            r#"vessel_guest_security_events_total{sandbox_id="pod1",kind="module_load",container_id="c1"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"vessel_guest_security_events_total{sandbox_id="pod1",kind="agent_restarted",container_id=""} 1"#
        ),
        "{text}"
    );
}

/// A snapshot whose one container is named after `n`, to tell them apart.
fn snapshot(n: usize) -> GuestSnapshot {
    GuestSnapshot {
        taken: tokio::time::Instant::now(),
        guest: None,
        containers: vec![(format!("n{n}"), StatsContainerResponse::new())],
        pss: Vec::new(),
        pss_taken: tokio::time::Instant::now(),
    }
}

fn name(s: &Option<Arc<GuestSnapshot>>) -> String {
    s.as_ref()
        .map(|s| s.containers[0].0.clone())
        .unwrap_or_default()
}

/// Runs a sampler over `cache` whose guest takes `delay` to answer; returns the
/// number of snapshots taken so far.
fn sampler(cache: &Arc<GuestCache>, delay: Duration) -> Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let taken = Arc::new(AtomicUsize::new(0));
    let (c, t) = (cache.clone(), taken.clone());
    tokio::spawn(async move {
        c.sample(|| {
            let t = t.clone();
            async move {
                tokio::time::sleep(delay).await;
                Some(snapshot(t.fetch_add(1, Ordering::SeqCst) + 1))
            }
        })
        .await
    });
    taken
}

#[tokio::test(start_paused = true)]
async fn scrapes_serve_the_background_snapshot_without_waiting_for_the_guest() {
    use std::sync::atomic::Ordering;
    let cache = Arc::new(GuestCache::default());
    // The guest takes 900 ms to answer: longer than any scrape may wait for it.
    let taken = sampler(&cache, Duration::from_millis(900));
    // Nobody scrapes: the guest is not asked.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(taken.load(Ordering::SeqCst), 0);
    // The first scrape waits for the first snapshot (up to GUEST_TIMEOUT).
    let t = tokio::time::Instant::now();
    assert_eq!(name(&cache.get(true).await), "n1");
    assert_eq!(t.elapsed(), Duration::from_millis(900));
    // Then the sampler keeps one fresh: scrapes do not wait, and serve at most
    // MAX_AGE old numbers.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t = tokio::time::Instant::now();
        let s = cache.get(true).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert!(s.taken.elapsed() <= MAX_AGE, "{:?}", s.taken.elapsed());
    }
    // One snapshot a period (plus the guest's 0.9 s), not one a scrape.
    let n = taken.load(Ordering::SeqCst);
    let periods = (14_000 / (REFRESH_EVERY.as_millis() + 900)) as usize;
    assert_eq!(n, 1 + periods, "{n} snapshots in 14 s");
    // No scrape for IDLE_AFTER: the sampler pauses; a scrape resumes it.
    tokio::time::sleep(IDLE_AFTER + REFRESH_EVERY * 2).await;
    let paused = taken.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(taken.load(Ordering::SeqCst), paused);
    let s = cache.get(true).await;
    assert_eq!(name(&s), format!("n{}", paused + 1));
    // Once the VM exited, a scrape serves what there is at once.
    tokio::time::sleep(IDLE_AFTER * 2).await;
    let t = tokio::time::Instant::now();
    assert!(cache.get(false).await.is_some());
    assert_eq!(t.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_never_answers_costs_a_scrape_one_bounded_wait() {
    let cache = Arc::new(GuestCache::default());
    sampler(&cache, Duration::from_secs(3600));
    let t = tokio::time::Instant::now();
    assert!(cache.get(true).await.is_none());
    assert_eq!(t.elapsed(), GUEST_TIMEOUT + REFRESH_WAIT);
}

#[test]
fn max_age_covers_one_period_and_one_guest_call() {
    assert!(MAX_AGE >= REFRESH_EVERY + GUEST_TIMEOUT);
}
