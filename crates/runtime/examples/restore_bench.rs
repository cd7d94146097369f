//! `make bench-restore`: a cold boot to a ready agent against a restore from a
//! snapshot to a resynced agent (clock set, RNG reseeded), interleaved, same
//! backend and guest, plus the host PSS of each kind of sandbox.
//!
//! Usage: `restore_bench [RUNS]` with `VESSEL_CONFIG` naming the configuration
//! (`make config` writes build/config.toml). QEMU's agent channel is
//! virtio-serial here (QEMU cannot migrate vhost-user-vsock); the built-in VMM
//! snapshots its vsock device.

use std::time::{Duration, Instant};

use anyhow::Context;
use vessel_runtime::backend::{self, Backend, BackendKind};
use vessel_runtime::sandbox::{Sandbox, SandboxSpec};
use vessel_runtime::Config;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// PSS of `pids` and every process below them in MiB, from /proc/PID/smaps_rollup
/// (the built-in VMM's pid is its jailer's; the VMM is the jailer's child).
fn pss_mib(pids: &[u32]) -> f64 {
    let mut all: Vec<u32> = pids
        .iter()
        .flat_map(|p| vessel_testutil::self_and_descendants(*p))
        .collect();
    all.sort_unstable();
    all.dedup();
    let mut kib = 0u64;
    for pid in &all {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("Pss:") {
                kib += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    kib as f64 / 1024.0
}

fn summary(name: &str, v: &mut [f64], unit: &str) -> f64 {
    let m = median(v);
    println!(
        "{name:<34} median {m:8.1} {unit}  (min {:.1}, max {:.1}, n={})",
        v[0],
        v[v.len() - 1],
        v.len()
    );
    m
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()
        .context("RUNS must be a number")?
        .unwrap_or(10);
    let (mut cfg, path) = Config::load(None).context("loading the configuration")?;
    let work = tempfile::tempdir()?;
    cfg.state_root = work.path().join("state");
    let backend = Backend::resolve(&cfg)?;
    if backend.kind == BackendKind::Qemu {
        cfg.channel = vessel_hypervisor::AgentChannel::Serial;
    }
    let hv = backend::build(&cfg, &backend)?;
    println!(
        "configuration {}; backend {}, accelerator {}, {} MiB, {} vCPU, channel {}, {runs} runs each, interleaved",
        path.display(),
        hv.name(),
        hv.capabilities().accelerator,
        cfg.default_memory_mib,
        cfg.default_vcpus,
        cfg.channel
    );

    let snap = work.path().join("snapshot");
    let template = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("template", &cfg)).await?;
    let t = Instant::now();
    template.snapshot(&snap).await?;
    let snap_ms = t.elapsed().as_secs_f64() * 1e3;
    template.stop().await?;
    let snap_bytes: u64 = std::fs::read_dir(&snap)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "snapshot written in {snap_ms:.1} ms, {:.1} MiB on disk",
        snap_bytes as f64 / (1 << 20) as f64
    );

    let (mut boot, mut restore, mut boot_pss, mut restore_pss) = (vec![], vec![], vec![], vec![]);
    let settle = Duration::from_millis(500);
    for i in 0..runs {
        let t = Instant::now();
        let sb = Sandbox::boot(
            &cfg,
            hv.as_ref(),
            SandboxSpec::new(&format!("boot{i}"), &cfg),
        )
        .await?;
        boot.push(t.elapsed().as_secs_f64() * 1e3);
        sb.agent().probe().await?;
        // Let the guest go idle before reading memory (not a synchronization).
        tokio::time::sleep(settle).await;
        boot_pss.push(pss_mib(&sb.vm().pids()));
        sb.stop().await?;

        let t = Instant::now();
        let sb = Sandbox::restore(&cfg, hv.as_ref(), &format!("restore{i}"), &snap).await?;
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        sb.agent().probe().await?;
        tokio::time::sleep(settle).await;
        restore_pss.push(pss_mib(&sb.vm().pids()));
        sb.stop().await?;
    }
    let b = summary("cold boot to agent ready", &mut boot, "ms");
    let r = summary("restore to agent resynced", &mut restore, "ms");
    println!("{:<34} {:.2}x", "restore / cold boot", r / b);
    summary("host PSS, booted sandbox", &mut boot_pss, "MiB");
    summary("host PSS, restored sandbox", &mut restore_pss, "MiB");
    Ok(())
}
