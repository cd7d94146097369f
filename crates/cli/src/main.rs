//! `vessel`: the Vessel OCI runtime CLI (runc-compatible), plus `check` and `env`.

mod check;
mod create;
mod delete;
mod events;
mod exec;
mod features;
mod image;
mod kill;
mod list;
mod logging;
mod monitor;
mod pause;
mod ps;
mod run;
mod signals;
mod spec;
mod start;
mod state;
mod supervise;
mod tty;
mod update;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Runs every container in its own microVM"
)]
struct Cli {
    /// Root directory for container state (default: state_root of the
    /// config, /run/vessel).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Configuration file (default $VESSEL_CONFIG or /etc/vessel/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: logging::Format,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// Accepted for runc compatibility; cgroups are applied inside the guest.
    #[arg(long, global = true, hide = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility; ignored.
    #[arg(long, global = true, hide = true)]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check whether this host can run Vessel sandboxes.
    Check(check::CheckArgs),
    /// Print the effective configuration.
    Env,
    /// Create a container (in its own VM) from an OCI bundle.
    Create(create::Args),
    /// Start the process of a created container.
    Start(start::Args),
    /// Create, start and wait for a container (from a bundle or an image);
    /// exits with its status.
    Run(run::Args),
    /// Print the OCI state of a container.
    State(state::Args),
    /// Send a signal to a container's init (or all) processes.
    Kill(kill::Args),
    /// Delete a container, its VM and its state.
    Delete(delete::Args),
    /// Run a process in a running container.
    Exec(exec::Args),
    /// List the processes of a container (guest pids).
    Ps(ps::Args),
    /// List containers.
    List(list::Args),
    /// Freeze a container's processes.
    Pause(pause::Args),
    /// Thaw a paused container.
    Resume(pause::Args),
    /// Container resource statistics and OOM events.
    Events(events::Args),
    /// Write a default config.json.
    Spec(spec::Args),
    /// Update the resource limits of a container (in its guest cgroup).
    Update(update::Args),
    /// Show what this runtime supports (runc's JSON).
    Features,
    /// Serves every sandbox's metrics on one Prometheus endpoint (docs/monitoring.md).
    Monitor(monitor::Args),
    /// Not supported: a container's processes live in its VM.
    Checkpoint(Unsupported),
    /// Not supported: a container's processes live in its VM.
    Restore(Unsupported),
    /// (internal) Per-container supervisor started by `create`.
    #[command(hide = true)]
    Supervise(supervise::Args),
    /// (internal) Supervisor of a detached `exec`.
    #[command(hide = true)]
    SuperviseExec(supervise::ExecArgs),
}

/// Any flags and arguments of a command Vessel refuses.
#[derive(clap::Args)]
struct Unsupported {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    _args: Vec<String>,
}

/// What commands need besides their own flags.
pub struct Ctx {
    pub config: vessel_runtime::Config,
    /// Global flags to pass on to a re-exec of this binary.
    pub global_args: Vec<std::ffi::OsString>,
}

impl Ctx {
    pub fn root(&self) -> &std::path::Path {
        &self.config.state_root
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let quiet = !matches!(cli.command, Command::Check(_) | Command::Env);
    logging::init(cli.log.as_deref(), cli.log_format, cli.debug, quiet);
    log::debug!(
        "vessel {} (pid {}): {:?}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        std::env::args().skip(1).collect::<Vec<_>>()
    );
    // runc's exec exits 255 on its own failures: apart from the process's 1.
    let failure = match cli.command {
        Command::Exec(_) => ExitCode::from(255),
        _ => ExitCode::FAILURE,
    };
    let has_log_file = cli.log.is_some();
    match run(cli, started) {
        Ok(code) => code,
        Err(e) => {
            // With --log the error is in the log file (as runc does); say it
            // on stderr too, once.
            if has_log_file {
                log::error!("{e:#}");
            }
            eprintln!("vessel: {e:#}");
            failure
        }
    }
}

fn run(cli: Cli, started: Instant) -> anyhow::Result<ExitCode> {
    let (mut config, config_path) = vessel_runtime::Config::load(cli.config.as_deref())?;
    if let Some(root) = &cli.root {
        config.state_root = std::path::absolute(root)?;
    }
    let mut global_args: Vec<std::ffi::OsString> =
        vec!["--root".into(), config.state_root.clone().into()];
    if let Some(c) = &cli.config {
        global_args.extend(["--config".into(), std::path::absolute(c)?.into()]);
    }
    if let Some(l) = &cli.log {
        global_args.extend(["--log".into(), std::path::absolute(l)?.into()]);
    }
    global_args.extend([
        "--log-format".into(),
        format!("{:?}", cli.log_format).to_lowercase().into(),
    ]);
    if cli.debug {
        global_args.push("--debug".into());
    }
    let ctx = Ctx {
        config,
        global_args,
    };
    match cli.command {
        Command::Check(args) => check::run(&ctx.config, &config_path, args, started),
        Command::Env => {
            println!("# effective configuration (from {})", config_path.display());
            print!("{}", toml::to_string(&ctx.config)?);
            println!("# templates: {}", check::templates_line(&ctx.config));
            println!("# host limits: {}", check::limits_line(&ctx.config));
            Ok(ExitCode::SUCCESS)
        }
        Command::Create(a) => create::run(&ctx, a),
        Command::Start(a) => start::run(&ctx, a),
        Command::Run(a) => run::run(&ctx, a),
        Command::State(a) => state::run(&ctx, a),
        Command::Kill(a) => kill::run(&ctx, a),
        Command::Delete(a) => delete::run(&ctx, a),
        Command::Exec(a) => exec::run(&ctx, a),
        Command::Ps(a) => ps::run(&ctx, a),
        Command::List(a) => list::run(&ctx, a),
        Command::Pause(a) => pause::pause(&ctx, a),
        Command::Resume(a) => pause::resume(&ctx, a),
        Command::Events(a) => events::run(&ctx, a),
        Command::Spec(a) => spec::run(a),
        Command::Update(a) => update::run(&ctx, a),
        Command::Features => features::run(),
        Command::Monitor(a) => monitor::run(&ctx, a),
        Command::Checkpoint(_) | Command::Restore(_) => anyhow::bail!(
            "checkpoint/restore is not supported: the container's processes run in its own \
             VM, out of CRIU's reach on the host"
        ),
        Command::Supervise(a) => supervise::run(&ctx, a),
        Command::SuperviseExec(a) => supervise::run_exec(&ctx, a),
    }
}

/// A single-threaded tokio runtime: children with PR_SET_PDEATHSIG (QEMU,
/// helpers) are tied to the thread that spawned them, which must live as
/// long as the process.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(runtime()?.block_on(f))
}

/// The runtime of [`block_on`], for a command that goes back to it more than once.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
