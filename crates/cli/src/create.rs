//! `vessel create`: runc's flags; the container's VM is booted by a
//! detached supervisor (`vessel supervise`) that outlives this command.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
#[group(skip)]
pub struct Args {
    /// Bundle directory (config.json + rootfs).
    #[arg(long, short, default_value = ".")]
    pub bundle: PathBuf,
    /// Write the pid of the container's supervisor here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the pty master (process.terminal).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Ignored: the container's root is set up inside its own VM.
    #[arg(long)]
    pub no_pivot: bool,
    /// Ignored (runc compatibility).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Only 0 is accepted: host file descriptors cannot be passed into the VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    create(ctx, a, None)?;
    Ok(ExitCode::SUCCESS)
}

/// Creates the container; returns the supervisor's pid. `console_size`
/// (rows, cols) replaces `process.consoleSize` (`run` on our own terminal).
pub fn create(ctx: &Ctx, a: Args, console_size: Option<(u16, u16)>) -> anyhow::Result<u32> {
    anyhow::ensure!(
        a.preserve_fds == 0,
        "--preserve-fds {}: host file descriptors cannot be passed into the container's VM",
        a.preserve_fds
    );
    if a.no_pivot {
        log::info!("--no-pivot ignored: the root file system is set up inside the VM");
    }
    let abs = |p: PathBuf| std::path::absolute(p);
    let bundle = abs(a.bundle)?;
    let console_socket = a.console_socket.map(abs).transpose()?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&ctx.global_args);
    if !ctx.global_args.iter().any(|a| a == "--log") {
        cmd.arg("--log")
            .arg(ctx.root().join(&a.id).join("supervisor.log"));
    }
    cmd.arg("supervise").arg("--bundle").arg(&bundle);
    if let Some(s) = &console_socket {
        cmd.arg("--console-socket").arg(s);
    }
    if let Some((rows, cols)) = console_size {
        cmd.arg("--console-size").arg(format!("{rows}x{cols}"));
    }
    cmd.arg(&a.id);
    let opts = vessel_runtime::container::create::CreateOptions {
        id: a.id,
        bundle,
        console_socket,
        pid_file: a.pid_file.map(abs).transpose()?,
        supervisor: cmd,
    };
    Ok(vessel_runtime::container::create::create(
        &ctx.config,
        opts,
    )?)
}
