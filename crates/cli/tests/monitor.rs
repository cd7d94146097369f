//! End-to-end: `vessel monitor` over two running sandboxes (real guests).

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{env, text};
use vessel_testutil::wait_until;

const T: Duration = Duration::from_secs(60);

/// Kills `vessel monitor` when the test ends, however it ends.
struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// The metrics socket under the container directory of `id`.
fn socket_of(root: &std::path::Path, id: &str) -> Option<PathBuf> {
    std::fs::read_dir(root.join(id))
        .ok()?
        .flatten()
        .map(|e| e.path().join("metrics.sock"))
        .find(|p| p.exists())
}

#[test]
fn monitor_reports_every_family_of_two_sandboxes_by_sandbox_id() {
    let Some(e) = env() else { return };
    let b = e.bundle("b", &["sleep", "600"], |_| {});
    let ids = ["mon1", "mon2"];
    for id in ids {
        e.create(id, &b);
        let o = e.run(&["start", id]);
        assert!(o.status.success(), "{}", text(&o));
    }
    for id in ids {
        let sock = socket_of(&e.root, id).expect("metrics socket in the run directory");
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", sock.display());
    }

    let mut child = e
        .cmd()
        .args(["monitor", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let monitor = Monitor(child);
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|a| a.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("monitor said {line:?}"))
        .to_string();

    let sample = |text: &str, family: &str, id: &str, more: &str| {
        text.lines().any(|l| {
            l.starts_with(family)
                && l[family.len()..].starts_with('{')
                && l.contains(&format!("sandbox_id=\"{id}\""))
                && l.contains(more)
        })
    };
    // Per sandbox: (family, another label the sample must carry).
    let wanted = |id: &'static str| {
        [
            ("vessel_sandbox_info", "state=\"running\""),
            ("vessel_sandbox_boot_seconds", ""),
            ("vessel_process_resident_memory_bytes", "role=\"vmm\""),
            ("vessel_process_proportional_memory_bytes", "role=\"vmm\""),
            ("vessel_process_cpu_seconds_total", "role=\"vmm\""),
            ("vessel_process_open_fds", "role=\"supervisor\""),
            ("vessel_process_threads", "role=\"vmm\""),
            ("vessel_guest_up", "} 1.0"),
            ("vessel_guest_memory_bytes", "kind=\"available\""),
            ("vessel_guest_cpu_seconds_total", "mode=\"idle\""),
            ("vessel_guest_cpus", ""),
            ("vessel_guest_load", "period=\"1m\""),
            ("vessel_guest_network_bytes_total", "interface=\"lo\""),
            ("vessel_container_memory_bytes", "container_id=\"CID\""),
            ("vessel_container_cpu_seconds_total", "container_id=\"CID\""),
            ("vessel_container_pids", "container_id=\"CID\""),
            (
                "vessel_agent_rpc_duration_seconds_count",
                "method=\"CreateContainer\"",
            ),
        ]
        .map(|(f, more)| (f, more.replace("CID", id)))
    };
    let missing = |text: &str| -> Vec<String> {
        ids.iter()
            .flat_map(|id| {
                wanted(id)
                    .into_iter()
                    .filter(|(f, more)| !sample(text, f, id, more))
                    .map(move |(f, more)| format!("{id}: {f} {more}"))
            })
            .collect()
    };
    // The guest families need the agent's answer within the scrape: poll.
    let mut body = String::new();
    assert!(
        wait_until(T, || {
            body = get(&addr);
            missing(&body).is_empty()
        }),
        "missing {:?} in\n{body}",
        missing(&body)
    );
    // (The guest's disk families have samples only for block devices with I/O: this
    // guest has none. Unit tests cover them.)
    assert!(body.contains("# TYPE vessel_agent_rpc_duration_seconds histogram"));
    let running: u64 = body
        .lines()
        .filter(|l| l.starts_with("vessel_sandboxes{state=\"running\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(running >= 2, "vessel_sandboxes: {body}");
    assert_eq!(body.matches("# TYPE vessel_sandbox_info gauge").count(), 1);
    assert!(body.ends_with("# EOF\n"));
    let started = Instant::now();
    get(&addr);
    eprintln!("one scrape of two sandboxes (tcg): {:?}", started.elapsed());

    for id in ids {
        let o = e.run(&["delete", "--force", id]);
        assert!(o.status.success(), "{}", text(&o));
        e.assert_clean(id);
    }
    // Gone from the endpoint with their sockets.
    let body = get(&addr);
    assert!(ids
        .iter()
        .all(|id| !body.contains(&format!("sandbox_id=\"{id}\""))));
    drop(monitor);
}
