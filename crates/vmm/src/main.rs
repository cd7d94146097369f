//! `vessel-vmm`: one microVM per process.
//!
//! Boot directly: `vessel-vmm --kernel K --cmdline C ...`; restore: `vessel-vmm --restore
//! DIR`; or start with only `--api-sock` and send `configure` + `boot` (or `restore`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use vessel_vmm::api::server::ApiServer;
use vessel_vmm::config::{
    BlockConfig, FsConfig, HostKvm, NetConfig, PvmQuirks, SerialLogLimits, VmConfig, VsockConfig,
};
use vessel_vmm::vmm::Vmm;

#[derive(Debug, Parser)]
#[command(
    name = "vessel-vmm",
    version,
    about = "Vessel's built-in KVM microVM monitor"
)]
struct Args {
    /// Guest kernel: PVH ELF vmlinux or bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Serial console output file (default: stdout).
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Size cap of the serial log file in bytes (the newest output is kept).
    #[arg(long, default_value_t = vessel_logcap::DEFAULT_MAX_BYTES)]
    serial_log_max_bytes: u64,
    /// Rate cap of the serial log in bytes per second (0: none); output over it is dropped.
    #[arg(long, default_value_t = vessel_logcap::DEFAULT_BYTES_PER_SEC)]
    serial_log_rate: u64,
    /// Control API Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Hybrid vsock Unix socket (with --restore: replaces the snapshot's).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock context id (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds", conflicts_with = "restore")]
    vsock_cid: Option<u32>,
    /// Block device `PATH[,ro]` (repeatable).
    #[arg(long)]
    block: Vec<BlockConfig>,
    /// Network device on a tap: `TAP[,mac=AA:BB:CC:DD:EE:FF][,mtu=N]` opens tap TAP (needs
    /// CAP_NET_ADMIN); `fd=N[,mac=...][,mtu=N]` uses the open tap fd N this process
    /// inherited (repeatable).
    #[arg(long)]
    net: Vec<NetConfig>,
    /// virtio-fs share served by virtiofsd: `SOCKET,tag=TAG` (repeatable).
    #[arg(long)]
    fs: Vec<FsConfig>,
    /// Add a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// Add a virtio-balloon device with this initial target in MiB.
    #[arg(long)]
    balloon_mib: Option<u64>,
    /// PVM (software KVM) workarounds: auto, on, off.
    #[arg(long, default_value = "auto", value_parser = parse_quirks)]
    pvm_quirks: PvmQuirks,
    /// Restore the snapshot in this directory instead of booting.
    #[arg(long, conflicts_with = "kernel")]
    restore: Option<PathBuf>,
    /// With --restore: leave the VM paused.
    #[arg(long, requires = "restore")]
    paused: bool,
    /// Print what this host's KVM can run (JSON) and exit.
    #[arg(long, exclusive = true)]
    check: bool,
}

fn parse_quirks(s: &str) -> Result<PvmQuirks, String> {
    match s {
        "auto" => Ok(PvmQuirks::Auto),
        "on" => Ok(PvmQuirks::On),
        "off" => Ok(PvmQuirks::Off),
        other => Err(format!("{other:?}: use auto, on or off")),
    }
}

impl Args {
    fn serial_log_limits(&self) -> SerialLogLimits {
        SerialLogLimits {
            max_bytes: self.serial_log_max_bytes,
            bytes_per_sec: self.serial_log_rate,
        }
    }

    fn vm_config(&self) -> anyhow::Result<Option<VmConfig>> {
        let Some(kernel) = self.kernel.clone() else {
            return Ok(None);
        };
        if self.vsock_uds.is_some() && self.vsock_cid.is_none() {
            bail!("--vsock-uds needs --vsock-cid when booting");
        }
        Ok(Some(VmConfig {
            kernel,
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            serial_log: self.serial_log.clone(),
            serial_log_limits: self.serial_log_limits(),
            vsock: self.vsock_uds.clone().map(|uds| VsockConfig {
                uds,
                cid: self.vsock_cid.unwrap_or(3),
            }),
            block: self.block.clone(),
            net: self.net.clone(),
            fs: self.fs.clone(),
            rng: self.rng,
            balloon_mib: self.balloon_mib,
            pvm_quirks: self.pvm_quirks,
        }))
    }
}

fn main() {
    env_logger_lite();
    if let Err(e) = vessel_vmm::stop_signal::install() {
        eprintln!("vessel-vmm: cannot handle SIGTERM: {e}");
        std::process::exit(vessel_vmm::EXIT_VMM_ERROR);
    }
    let code = match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel-vmm: {e:#}");
            vessel_vmm::EXIT_VMM_ERROR
        }
    };
    std::process::exit(code);
}

fn run() -> anyhow::Result<i32> {
    let args = Args::parse();
    if args.check {
        let kvm = HostKvm::probe();
        let report = serde_json::json!({
            "kvm": kvm,
            "linux_userspace": kvm.runs_linux_userspace(),
            "message": kvm.explain(),
        });
        println!("{report}");
        return Ok(vessel_vmm::EXIT_OK);
    }
    let mut api = match &args.api_sock {
        Some(p) => Some(ApiServer::bind(p)?),
        None => None,
    };
    let vmm = if let Some(dir) = &args.restore {
        Vmm::restore(
            dir,
            args.serial_log.clone(),
            Some(args.serial_log_limits()),
            args.vsock_uds.clone(),
            Vec::new(),
            Vec::new(),
            args.paused,
        )
        .with_context(|| format!("restoring {}", dir.display()))?
    } else if let Some(config) = args.vm_config()? {
        Vmm::boot(config).context("booting the VM")?
    } else if let Some(api) = api.as_mut() {
        vessel_vmm::vmm::serve_until_vm(api)?
    } else {
        bail!("nothing to run: give --kernel, --restore, or --api-sock to configure over the API");
    };
    Ok(vmm.run(api))
}

/// Minimal logger: `VESSEL_VMM_LOG=debug|info|warn|error` (default warn) to stderr.
fn env_logger_lite() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("vessel-vmm {}: {}", r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    let level = match std::env::var("VESSEL_VMM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        Ok("error") => log::LevelFilter::Error,
        Ok("trace") => log::LevelFilter::Trace,
        _ => log::LevelFilter::Warn,
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
