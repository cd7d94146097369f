//! Soak and concurrency (issue 14 items 1 and 2), with real parts: containerd 1.6 with
//! the shim, CRI pods on Debian's CNI bridge plugin, `ctr run`, the `vessel` CLI, and
//! QEMU/TCG guests here (the configured backend elsewhere).
//!
//! A cycle is one of, in turn: `vessel run`; `vessel` create, start, exec, kill, delete;
//! `ctr run --rm`; a CRI pod with two containers (exec in each, one returning 64 KiB,
//! 2,000 log lines checked) plus a container created, exec'd and removed in a pod that
//! lives through the whole soak (its shim is the long-lived process whose descriptors
//! are watched, with containerd's). After every `SOAK_CHECK_EVERY` cycles and at the end
//! the host is compared with its state after a warm-up round: no process, mount, host
//! link, host cgroup, socket or state directory more, no descriptor more in containerd
//! or the long-lived shim, and host memory within 50 MiB (MemAvailable plus the anonymous and shared RSS of
//! processes that are not the test's, so that other work on the host does not count).
//! Then `SOAK_PODS` pods start at once, each with exec and stdio traffic.
//!
//! `make soak` runs [`soak`] (1,000 cycles, 20 pods; `SOAK_CYCLES`, `SOAK_PODS` and
//! `SOAK_CHECK_EVERY` change that); `make test` runs [`soak_ci`]: one round of each kind,
//! three concurrent pods, the same checks.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cri::*;
use common::leaks::HostState;
use common::workload::*;

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    runs: [u32; 4],
    failures: Vec<String>,
}

const KINDS: [&str; 4] = ["vessel run", "vessel lifecycle", "ctr run", "CRI pod + 2"];

/// The long-lived pod and its shim's pid.
struct LongPod {
    id: String,
    cfg: PodSandboxConfig,
    shim: u32,
}

async fn long_pod(rig: &mut Rig) -> LongPod {
    let cfg = rig.pod_config("longlived");
    let id = run_pod(&mut rig.rt, &cfg).await;
    rig.ids.insert(id.clone());
    let shims = shims(&rig.c);
    assert_eq!(shims.len(), 1, "one shim for the long-lived pod: {shims:?}");
    let shim = shims[0].split(':').next().unwrap().parse().unwrap();
    LongPod { id, cfg, shim }
}

async fn cycle(rig: &mut Rig, long: &LongPod, n: u32, tally: &mut Tally) {
    let kind = (n % 4) as usize;
    let id = format!("soak{n}");
    let r = match kind {
        0 => {
            let r = rig.cli_run(&id);
            if r.is_err() {
                rig.cli_force_delete(&id);
            }
            r
        }
        1 => {
            let r = rig.cli_lifecycle(&id);
            if r.is_err() {
                rig.cli_force_delete(&id);
            }
            r
        }
        2 => rig.ctr_run(&id),
        _ => {
            let mut cfg = rig.pod_config(&id);
            let logs = rig.c.dir.path().join("logs").join(&id);
            cfg.log_directory = logs.display().to_string();
            let (pod, r) = cri_pod_two_containers(rig.rt.clone(), cfg, logs, 200).await;
            rig.ids.extend(pod);
            let r2 = in_long_pod(rig, long, n).await;
            r.and(r2)
        }
    };
    tally.runs[kind] += 1;
    if let Err(e) = r {
        eprintln!("soak: cycle {n} ({}) failed: {e}", KINDS[kind]);
        tally
            .failures
            .push(format!("cycle {n} ({}): {e}", KINDS[kind]));
    }
}

/// A container created, exec'd, stopped and removed in the long-lived pod.
async fn in_long_pod(rig: &mut Rig, long: &LongPod, n: u32) -> Step {
    let mut config = container_config(&format!("c{n}"), &["sleep", "100000"]);
    config.log_path = format!("c{n}.log");
    let id = create_start(&mut rig.rt, &long.id, &long.cfg, config).await?;
    rig.ids.insert(id.clone());
    let out = exec_sync(&mut rig.rt, &id, &["echo", "in-long-pod"]).await;
    let stop = rig
        .rt
        .stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await;
    let remove = rig
        .rt
        .remove_container(RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await;
    if out? != b"in-long-pod\n" {
        return Err("exec in the long-lived pod printed the wrong line".into());
    }
    stop.map_err(|e| format!("StopContainer: {}", e.message()))?;
    remove.map_err(|e| format!("RemoveContainer: {}", e.message()))?;
    Ok(())
}

/// How long a memory-only finding is watched for before it counts: long-lived processes
/// give back what a burst of work took only eventually (containerd is a Go program: its
/// runtime forces a collection every 2 minutes and returns freed heap in the background).
const MEMORY_SETTLE: Duration = Duration::from_secs(150);

/// The host compared with `base`: leaks, waited for up to 10 s (a removal's last
/// process may still be exiting); when memory is the only finding, up to
/// [`MEMORY_SETTLE`], printing how long it took to settle.
fn leaks_now(rig: &Rig, long: &LongPod, base: &HostState) -> Vec<String> {
    let extra = [("long-lived shim".to_string(), long.shim)];
    let mut leaks = Vec::new();
    common::wait_until(Duration::from_secs(10), || {
        leaks = rig.observe(&extra).leaks(base);
        leaks.is_empty()
    });
    let memory_only = !leaks.is_empty() && leaks.iter().all(|l| l.starts_with("memory:"));
    if memory_only {
        eprintln!("soak: memory not back yet, watching up to {MEMORY_SETTLE:?}: {leaks:?}");
        let started = Instant::now();
        common::wait_until(MEMORY_SETTLE, || {
            leaks = rig.observe(&extra).leaks(base);
            leaks.is_empty()
        });
        if leaks.is_empty() {
            eprintln!(
                "soak: memory back within the slack after {:.0} s more",
                started.elapsed().as_secs_f64()
            );
        }
    }
    leaks
}

/// A leak is diagnosed from containerd's log (the shims log into it): kept in
/// `/var/tmp/vessel-soak-containerd.log`, which outlives the test's directory.
fn keep_containerd_log(rig: &Rig, leaks: &[String]) {
    if leaks.is_empty() {
        return;
    }
    let kept = Path::new("/var/tmp/vessel-soak-containerd.log");
    match std::fs::copy(rig.c.dir.path().join("c/containerd.log"), kept) {
        Ok(_) => eprintln!("soak: containerd's log kept in {}", kept.display()),
        Err(e) => eprintln!("soak: containerd's log not kept: {e}"),
    }
}

async fn soak_run(cycles: u32, pods: u32, check_every: u32) {
    let Some(mut rig) = Rig::start(30).await else {
        return;
    };
    let started = Instant::now();
    // What the host had before the rig made anything: what the soak may leave is only
    // what was there already (e.g. a netns another run left).
    let before = rig.observe(&[]);
    let long = long_pod(&mut rig).await;
    let mut tally = Tally::default();
    // Warm-up: one cycle of each kind, so that caches and pools that are meant to stay
    // (page cache of the images, containerd's connections) are in the baseline.
    for n in 0..4 {
        cycle(&mut rig, &long, 1_000_000 + n, &mut tally).await;
    }
    assert!(
        tally.failures.is_empty(),
        "warm-up failed: {:?}",
        tally.failures
    );
    tally = Tally::default();
    let base = rig.observe(&[("long-lived shim".to_string(), long.shim)]);
    eprintln!(
        "soak: baseline after warm-up: {} MiB available (MemAvailable + other processes' anonymous and shared RSS), containerd {} fds, long-lived shim {} fds",
        base.mem_available_kib / 1024,
        base.fds[0].2,
        base.fds[1].2
    );
    let mut leak_reports = Vec::new();
    for n in 0..cycles {
        cycle(&mut rig, &long, n, &mut tally).await;
        if (n + 1) % check_every == 0 || n + 1 == cycles {
            let leaks = leaks_now(&rig, &long, &base);
            eprintln!(
                "soak: {} cycles, {} failures, {} leaks, {:.0} s, MemAvailable {} MiB",
                n + 1,
                tally.failures.len(),
                leaks.len(),
                started.elapsed().as_secs_f64(),
                common::leaks::mem_available_kib() / 1024
            );
            for l in &leaks {
                eprintln!("soak:   leak: {l}");
            }
            leak_reports.push((n + 1, leaks));
        }
    }
    let conc_started = Instant::now();
    let conc_errors = concurrent_pods(&mut rig, pods, 0).await;
    let conc_time = conc_started.elapsed();
    let conc_leaks = leaks_now(&rig, &long, &base);
    keep_containerd_log(&rig, &conc_leaks);
    stop_and_remove(&mut rig.rt, &long.id).await;

    println!("\nsoak results ({} s in all)", started.elapsed().as_secs());
    println!("| cycle kind | runs |");
    println!("|---|---|");
    for (k, runs) in KINDS.iter().zip(tally.runs) {
        println!("| {k} | {runs} |");
    }
    println!(
        "cycles {cycles}, failures {}, leak checks {}, leaks {}",
        tally.failures.len(),
        leak_reports.len(),
        leak_reports.iter().map(|(_, l)| l.len()).sum::<usize>()
    );
    println!(
        "concurrency: {pods} pods at once (2 containers, 2 execs, 2,000 log lines each) in {:.1} s, {} errors, {} leaks after",
        conc_time.as_secs_f64(),
        conc_errors.len(),
        conc_leaks.len()
    );
    let failed: Vec<&String> = tally.failures.iter().chain(&conc_errors).collect();
    let leaked: Vec<String> = leak_reports
        .iter()
        .flat_map(|(n, l)| l.iter().map(move |x| format!("after {n}: {x}")))
        .chain(
            conc_leaks
                .iter()
                .map(|x| format!("after the concurrent pods: {x}")),
        )
        .collect();
    assert!(failed.is_empty(), "failures: {failed:#?}");
    assert!(leaked.is_empty(), "leaks: {leaked:#?}");
    // The long-lived pod is gone too: nothing of the rig's sandboxes is left.
    let empty = rig.observe(&[]);
    let left: Vec<&String> = empty
        .processes
        .difference(&before.processes)
        .chain(empty.state.difference(&before.state))
        .chain(empty.mounts.difference(&before.mounts))
        .collect();
    assert!(left.is_empty(), "left after the soak: {left:?}");
}

/// The CI-sized soak: every cycle kind once after the warm-up, three pods at once.
#[tokio::test(flavor = "multi_thread")]
async fn soak_ci() {
    soak_run(4, 3, 4).await;
}

/// `make soak`: 1,000 cycles and 20 pods at once (`SOAK_CYCLES`, `SOAK_PODS`,
/// `SOAK_CHECK_EVERY`).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: make soak"]
async fn soak() {
    soak_run(
        env_u32("SOAK_CYCLES", 1000),
        env_u32("SOAK_PODS", 20),
        env_u32("SOAK_CHECK_EVERY", 100),
    )
    .await;
}
