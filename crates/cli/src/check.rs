//! `vessel check [--boot]`: can this host run sandboxes?

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use vessel_hypervisor::host::{detect_kvm, KvmKind};
use vessel_hypervisor::qemu::Qemu;
use vessel_hypervisor::{Accelerator, AgentChannel};
use vessel_runtime::backend::{self, Backend, BackendKind};
use vessel_runtime::config::HypervisorKind;
use vessel_runtime::sandbox::{Sandbox, SandboxSpec};
use vessel_runtime::Config;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Also boot a throwaway sandbox VM and talk to its agent.
    #[arg(long)]
    boot: bool,
    /// With --boot: also snapshot that VM, restore a clone from the snapshot and
    /// check that the clone's clock was set and its RNG reseeded. QEMU VMs use
    /// the virtio-serial channel for this (QEMU cannot migrate vhost-user-vsock).
    #[arg(long, requires = "boot")]
    snapshot: bool,
    /// Check for this hypervisor backend: auto, qemu or builtin (default: the
    /// configured one).
    #[arg(long)]
    hypervisor: Option<HypervisorKind>,
    /// Instead of the readiness check: list every setting of the effective
    /// configuration (and host fact) that weakens isolation, with why and the fix,
    /// and the safeguards that are always on. Boots nothing. Exit status 0 only
    /// when nothing is flagged (docs/configuration-audit.md).
    #[arg(long, conflicts_with = "boot")]
    audit: bool,
}

struct Report {
    problems: Vec<String>,
}

impl Report {
    fn line(&self, name: &str, value: impl std::fmt::Display) {
        println!("{:<16} {value}", format!("{name}:"));
    }

    fn problem(&mut self, name: &str, value: impl std::fmt::Display, problem: String) {
        self.line(name, format!("{value}  <-- {problem}"));
        self.problems.push(problem);
    }
}

pub fn run(
    config: &Config,
    config_path: &Path,
    args: CheckArgs,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let mut config = config.clone();
    if let Some(h) = args.hypervisor {
        config.hypervisor = h;
    }
    let config = &config;
    if args.audit {
        return Ok(audit(config, config_path));
    }
    let mut r = Report {
        problems: Vec::new(),
    };
    r.line("config", config_path.display());
    let (kvm, why) = detect_kvm();
    r.line("KVM", format!("{kvm} ({why})"));
    let backend = match Backend::resolve_for(config, kvm, &why) {
        Ok(b) => b,
        Err(e) => return Ok(builtin_unavailable(&e)),
    };
    r.line("hypervisor", &backend);
    if backend.kind == BackendKind::Builtin {
        let vmm = &config.builtin.vmm_path;
        if vmm.is_file() {
            r.line("vessel-vmm", vmm.display());
        } else {
            r.problem(
                "vessel-vmm",
                vmm.display(),
                format!(
                    "vessel-vmm not found at {}: run 'make install'",
                    vmm.display()
                ),
            );
        }
    }
    let accel = backend.accelerator;
    r.line("accelerator", match (accel, kvm) {
        (Accelerator::Kvm, _) => "kvm (hardware virtualization)".to_string(),
        (_, KvmKind::Pvm) => "tcg (software emulation: this host's KVM is kvm_pvm, which cannot run guest Linux user space)".to_string(),
        (_, _) => "tcg (software emulation: no hardware KVM; sandboxes work but start and run slower)".to_string(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let qemu = &config.qemu.path;
    if qemu.is_file() {
        let v = rt
            .block_on(Qemu::version(qemu))
            .unwrap_or_else(|e| format!("version unknown: {e}"));
        r.line("QEMU", format!("{} ({v})", qemu.display()));
    } else {
        r.problem(
            "QEMU",
            qemu.display(),
            format!(
                "QEMU not found at {}: apt-get install qemu-system-x86",
                qemu.display()
            ),
        );
    }
    let vhost: Vec<String> = ["/dev/vhost-vsock", "/dev/vhost-net"]
        .iter()
        .map(|d| {
            format!(
                "{d} {}",
                if Path::new(d).exists() {
                    "present"
                } else {
                    "missing"
                }
            )
        })
        .collect();
    r.line("vhost", vhost.join(", "));
    let helper = &config.qemu.vhost_vsock_path;
    match (config.channel, helper.is_file()) {
        (AgentChannel::Vsock, false) => r.problem(
            "agent channel",
            "vsock",
            format!(
                "{} not found: run 'make deps' or set channel = \"serial\"",
                helper.display()
            ),
        ),
        (AgentChannel::Vsock, true) => r.line(
            "agent channel",
            format!("vsock via vhost-user ({})", helper.display()),
        ),
        (ch, _) => r.line("agent channel", ch),
    }
    let fsd = &config.qemu.virtiofsd_path;
    r.line(
        "virtiofsd",
        if fsd.is_file() {
            fsd.display().to_string()
        } else {
            format!("{} missing (needed to run containers)", fsd.display())
        },
    );
    r.line("cgroups", cgroup_layout());
    for (name, path) in [
        ("guest kernel", &config.guest_kernel),
        ("guest initramfs", &config.guest_initramfs),
    ] {
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {
                r.line(name, format!("{} ({} KiB)", path.display(), m.len() / 1024))
            }
            _ => r.problem(
                name,
                path.display(),
                format!(
                    "{name} not found at {}: run 'make guest' (or 'make install')",
                    path.display()
                ),
            ),
        }
    }
    match state_root_writable(&config.state_root) {
        Ok(()) => r.line(
            "state root",
            format!("{} (writable)", config.state_root.display()),
        ),
        Err(e) => r.problem(
            "state root",
            config.state_root.display(),
            format!("state root not writable: {e:#}"),
        ),
    }
    r.line("templates", templates_line(config));
    r.line("host limits", limits_line(config));
    if !r.problems.is_empty() {
        println!("result:          this host cannot run sandboxes:");
        for p in &r.problems {
            println!("  - {p}");
        }
        return Ok(ExitCode::FAILURE);
    }
    let name = match backend.kind {
        BackendKind::Builtin => "the built-in VMM",
        BackendKind::Qemu => "QEMU",
    };
    println!("result:          ok: sandboxes run with {name} ({accel})");
    if args.boot {
        rt.block_on(boot(config, &backend, started, args.snapshot))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn boot(
    config: &Config,
    backend: &Backend,
    started: Instant,
    snapshot: bool,
) -> anyhow::Result<()> {
    let mut config = config.clone();
    if snapshot && backend.kind == BackendKind::Qemu && config.channel != AgentChannel::Serial {
        println!(
            "snapshot:        QEMU cannot migrate vhost-user-vsock: using channel = \"serial\""
        );
        config.channel = AgentChannel::Serial;
    }
    let config = &config;
    let hv = backend::build(config, backend)?;
    let id = format!("check-{}", std::process::id());
    println!("boot:            starting throwaway sandbox {id}");
    let sb = Sandbox::boot(config, hv.as_ref(), SandboxSpec::new(&id, config))
        .await
        .context("boot check sandbox")?;
    let ready = started.elapsed();
    let v = sb.version().clone();
    let accel = sb.vm().accelerator();
    let restored = if snapshot {
        Some(snapshot_and_restore(config, hv.as_ref(), &sb).await)
    } else {
        None
    };
    let stopped = sb.stop().await.context("stop check sandbox")?;
    let restored = restored.transpose()?;
    println!("guest kernel:    {}", v.kernel_release);
    println!(
        "agent version:   {} (protocol {})",
        v.agent_version, v.protocol_version
    );
    println!("guest boot id:   {}", v.boot_id);
    println!("accelerator:     {accel}");
    println!(
        "agent ready in:  {} ms (from command start)",
        ready.as_millis()
    );
    println!("vm stopped:      {stopped}; sandbox state removed");
    if let Some(lines) = restored {
        for line in lines {
            println!("{line}");
        }
    }
    Ok(())
}

/// Snapshots `sb` into a private temporary directory, restores a clone, checks
/// the clone against the template, stops it and removes the snapshot. Returns
/// the report lines.
async fn snapshot_and_restore(
    config: &Config,
    hv: &dyn vessel_hypervisor::Hypervisor,
    sb: &Sandbox,
) -> anyhow::Result<Vec<String>> {
    let dir = std::env::temp_dir().join(format!("vessel-check-{}.snapshot", std::process::id()));
    let res = async {
        let before = sb.agent().probe().await.context("probe the template")?;
        let t = Instant::now();
        sb.snapshot(&dir).await.context("snapshot the check sandbox")?;
        let saved = t.elapsed();
        let id = format!("{}-clone", sb.id());
        let t = Instant::now();
        let clone = Sandbox::restore(config, hv, &id, &dir)
            .await
            .context("restore a clone from the snapshot")?;
        let ready = t.elapsed();
        let probed = clone.agent().probe().await.context("probe the clone");
        let stopped = clone.stop().await.context("stop the clone");
        let p = probed?;
        stopped?;
        anyhow::ensure!(
            p.boot_id == before.boot_id,
            "the clone's boot id {} is not the template's {}",
            p.boot_id,
            before.boot_id
        );
        anyhow::ensure!(
            p.random_sample != before.random_sample,
            "the clone's RNG output repeats the template's: the reseed did not take"
        );
        let now = std::time::SystemTime::now();
        let off = now
            .duration_since(p.realtime)
            .unwrap_or_else(|e| e.duration());
        anyhow::ensure!(
            off.as_secs() < 5,
            "the clone's clock is {off:?} away from the host's"
        );
        Ok(vec![
            format!("snapshot:        written in {} ms", saved.as_millis()),
            format!(
                "restore:         clone {id} resynced in {} ms (clock set, RNG reseeded)",
                ready.as_millis()
            ),
            format!(
                "clone checks:    same boot id, clock within {} ms of the host, RNG output differs from the template's",
                off.as_millis()
            ),
            "clone stopped:   snapshot removed".to_string(),
        ])
    }
    .await;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("remove snapshot {}", dir.display()))?;
    }
    res
}

/// `vessel check --audit`: the findings of [`vessel_runtime::audit`] on this host, then
/// the safeguards that are always on. Reads only; boots nothing.
fn audit(config: &Config, config_path: &Path) -> ExitCode {
    use vessel_runtime::audit;
    let host = audit::HostFacts::probe(config);
    // The same aligned lines as the plain check.
    let r = Report {
        problems: Vec::new(),
    };
    r.line("config", config_path.display());
    r.line("KVM", format!("{} ({})", host.kvm, host.kvm_why));
    r.line("hypervisor", audit::backend_line(config, &host));
    let findings = audit::audit(config, &host);
    for f in &findings {
        println!("FLAGGED          {} = {}", f.setting, f.value);
        println!("  why:           {}", f.why);
        println!("  fix:           {}", f.fix);
    }
    for s in audit::always_on(config) {
        println!("ok (always on)   {}: {}", s.what, s.detail);
    }
    match findings.len() {
        0 => {
            println!("result:          ok: no setting weakens isolation");
            ExitCode::SUCCESS
        }
        n => {
            println!(
                "result:          {n} setting{} weaken{} isolation: {}",
                if n == 1 { "" } else { "s" },
                if n == 1 { "s" } else { "" },
                findings
                    .iter()
                    .map(|f| f.setting.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::FAILURE
        }
    }
}

/// Whether sandboxes start from templates, and why not (`vessel check`, `vessel env`).
pub fn templates_line(config: &Config) -> String {
    match vessel_runtime::backend::hypervisor(config) {
        Ok(hv) => match vessel_runtime::template::status(config, hv.as_ref()) {
            Ok(dir) => format!("on (kept in {})", dir.display()),
            Err(why) => format!("cold boot only: {why}"),
        },
        Err(e) => format!("cold boot only: no backend ({})", vessel_runtime::chain(&e)),
    }
}

/// The host limits sandboxes get (docs/threat-model.md, "Host limits").
pub fn limits_line(config: &Config) -> String {
    match vessel_runtime::backend::hypervisor(config) {
        Ok(hv) => vessel_runtime::limits::describe(&config.limits, hv.as_ref()),
        Err(e) => format!("no backend ({})", vessel_runtime::chain(&e)),
    }
}

fn builtin_unavailable(e: &vessel_runtime::Error) -> ExitCode {
    println!("hypervisor:      {e}");
    println!("result:          the built-in VMM cannot run sandboxes here.");
    println!(
        "                 Fallback: hypervisor = \"qemu\" (QEMU with TCG software emulation)."
    );
    ExitCode::FAILURE
}

fn cgroup_layout() -> String {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let is_cg2 = |p: &str| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
            .unwrap_or(false)
    };
    if is_cg2("/sys/fs/cgroup") {
        "v2 (unified)".into()
    } else if is_cg2("/sys/fs/cgroup/unified") {
        "hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified); only the VM processes live on the host".into()
    } else {
        "v1".into()
    }
}

fn state_root_writable(root: &Path) -> anyhow::Result<()> {
    // The mode the runtime gives the state root wherever it creates it
    // (0711: sandboxes' directories below are 0700); create_dir_all would
    // leave it 0755, which `check --audit` flags.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(root)
        .with_context(|| format!("create {}", root.display()))?;
    let probe = root.join(format!(".check-{}", std::process::id()));
    std::fs::write(&probe, b"").with_context(|| format!("write in {}", root.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}
