//! `make bench-start` (docs/snapshots.md): start from a template vs cold boot, in one
//! run, interleaved, medians of `RUNS` (default 10) and their ratios, for
//! `vessel run <bundle> true`, `ctr run --rm <image> true` and a CRI pod with one
//! container (RunPodSandbox to StartContainer); then the host PSS per idle sandbox
//! with 1 and with 20 sandboxes running (`vessel create` + `start` of `sleep`).
//!
//! `#[ignore]`d: a benchmark, not a test (benches/start.sh runs it, on the host or
//! in the KVM lane). "templated" is the default configuration; "cold" is the same
//! with `templates.enabled = false`. Where the backend cannot use templates (QEMU:
//! vhost-user devices) both columns boot cold, and the bench says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cri::*;
use common::{Containerd, IMAGE, RUNTIME};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn ok(what: &str, o: std::process::Output) {
    assert!(
        o.status.success(),
        "{what}: {}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes the Vessel configuration with templates on or off.
struct Switch {
    path: PathBuf,
    base: String,
}

impl Switch {
    fn set(&self, on: bool) {
        let text = self
            .base
            .replace("[templates]\n", &format!("[templates]\nenabled = {on}\n"));
        assert_ne!(text, self.base, "no [templates] table in {}", self.base);
        std::fs::write(&self.path, text).unwrap();
    }
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS of every process below this one (supervisors and their VMs stay below it:
/// this process is their subreaper), in KiB, once two readings 2 s apart agree
/// within 1 % (the guests have settled), or after 60 s.
fn settled_pss() -> u64 {
    let me = std::process::id();
    let total = || -> u64 {
        vessel_testutil::self_and_descendants(me)
            .into_iter()
            .filter(|p| *p != me)
            .map(pss_kib)
            .sum()
    };
    let start = Instant::now();
    let mut last = total();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = total();
        if now.abs_diff(last) * 100 <= last || start.elapsed() > Duration::from_secs(60) {
            return now;
        }
        last = now;
    }
}

fn vessel(config: &Path, root: &Path) -> Command {
    let mut c = Command::new(vessel_testutil::workspace_binary("VESSEL_BIN", "vessel"));
    c.arg("--config").arg(config).arg("--root").arg(root);
    c.stdin(Stdio::null());
    c
}

fn bundle(dir: &Path, args: &[&str]) -> PathBuf {
    let vessel = vessel_testutil::workspace_binary("VESSEL_BIN", "vessel");
    let o = Command::new(vessel_testutil::repo().join("tests/support/busybox-bundle.sh"))
        .arg(dir)
        .arg(&vessel)
        .arg("--")
        .args(args)
        .output()
        .unwrap();
    ok("busybox-bundle.sh", o);
    dir.to_path_buf()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: make bench-start"]
async fn bench_start() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only changes this process's attribute.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(subreaper, 0);
    let Some(c) = Containerd::start() else { return };
    let work = c.dir.path();
    let config = work.join("vessel.toml");
    let switch = Switch {
        base: std::fs::read_to_string(&config).unwrap(),
        path: config.clone(),
    };
    switch.set(true);
    let cli_root = work.join("cli");
    let env = vessel(&config, &cli_root).arg("env").output().unwrap();
    let env = String::from_utf8_lossy(&env.stdout).into_owned();
    let templates = env
        .lines()
        .find_map(|l| l.strip_prefix("# templates: "))
        .unwrap_or("unknown")
        .to_string();
    let hv = env
        .lines()
        .find(|l| l.starts_with("hypervisor ="))
        .unwrap_or("hypervisor = auto")
        .to_string();
    println!("bench-start: {hv}; templates: {templates}; {runs} runs of each, interleaved");
    if !templates.starts_with("on") {
        println!(
            "  templates are not available here: both columns boot cold (their ratio is noise)"
        );
    }
    let b = bundle(&work.join("true"), &["true"]);
    let idle = bundle(&work.join("idle"), &["sleep", "100000"]);
    let mut rt = connect(&c.sock).await;
    let logs = work.join("logs");

    let mut n = 0;
    let mut one = |kind: &str, on: bool| -> (String, bool) {
        n += 1;
        switch.set(on);
        (format!("{kind}{n}"), on)
    };
    // The three ways to start, each timed from the caller's side.
    let cli_run = |id: &str| {
        let t = Instant::now();
        ok(
            "vessel run",
            vessel(&config, &cli_root)
                .args(["run", "--bundle", b.to_str().unwrap(), id])
                .output()
                .unwrap(),
        );
        ms(t)
    };
    let ctr_run = |id: &str| {
        let t = Instant::now();
        ok(
            "ctr run",
            Command::new("ctr")
                .arg("-a")
                .arg(&c.sock)
                .args(["run", "--rm", "--runtime", RUNTIME, IMAGE, id, "true"])
                .stdin(Stdio::null())
                .output()
                .unwrap(),
        );
        ms(t)
    };

    // Warm-up: the first start of each kind makes its template.
    let mut warm = Vec::new();
    let (id, _) = one("w", true);
    warm.push(("vessel run", cli_run(&id)));
    let (id, _) = one("w", true);
    warm.push(("ctr run", ctr_run(&id)));
    let (id, _) = one("w", true);
    let t = Instant::now();
    let cfg = pod_config(&id, &logs);
    let pod = run_pod(&mut rt, &cfg).await;
    start_container(&mut rt, &pod, &cfg, "c", &["true"]).await;
    warm.push(("CRI pod + container", ms(t)));
    stop_and_remove(&mut rt, &pod).await;
    for (k, v) in &warm {
        println!("  first start (builds the template if templates are on): {k}: {v:.0} ms");
    }

    let kinds = ["vessel run", "ctr run", "CRI pod + container"];
    let mut cold: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut tmpl: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for _ in 0..runs {
        for on in [false, true] {
            let (id, on) = one("v", on);
            let v = cli_run(&id);
            (if on { &mut tmpl } else { &mut cold })[0].push(v);
            let (id, on) = one("c", on);
            let v = ctr_run(&id);
            (if on { &mut tmpl } else { &mut cold })[1].push(v);
            let (id, on) = one("p", on);
            let cfg = pod_config(&id, &logs);
            let t = Instant::now();
            let pod = run_pod(&mut rt, &cfg).await;
            start_container(&mut rt, &pod, &cfg, "c", &["true"]).await;
            let v = ms(t);
            (if on { &mut tmpl } else { &mut cold })[2].push(v);
            stop_and_remove(&mut rt, &pod).await;
        }
    }
    println!(
        "  {:<22} {:>12} {:>12} {:>8}",
        "start (median ms)", "cold", "templated", "ratio"
    );
    for (i, k) in kinds.iter().enumerate() {
        let (c, t) = (median(&mut cold[i]), median(&mut tmpl[i]));
        println!("  {k:<22} {c:>12.0} {t:>12.0} {:>7.2}x", t / c);
    }

    // Idle sandboxes (templated, the default).
    switch.set(true);
    let base = settled_pss();
    let mut ids = Vec::new();
    for count in [1usize, 20] {
        while ids.len() < count {
            let id = format!("idle{}", ids.len());
            let o = vessel(&config, &cli_root)
                .args(["create", "--bundle", idle.to_str().unwrap(), &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(o.success(), "create {id}");
            ok(
                "start",
                vessel(&config, &cli_root)
                    .args(["start", &id])
                    .output()
                    .unwrap(),
            );
            ids.push(id);
        }
        let total = settled_pss();
        println!(
            "  host PSS per idle sandbox with {count:>2} running: {:.1} MiB (all processes of the sandboxes, {:.1} MiB in all)",
            (total.saturating_sub(base)) as f64 / 1024.0 / count as f64,
            (total.saturating_sub(base)) as f64 / 1024.0
        );
    }
    for id in &ids {
        let _ = vessel(&config, &cli_root)
            .args(["delete", "--force", id])
            .output();
    }
}
