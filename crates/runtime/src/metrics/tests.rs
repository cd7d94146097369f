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
