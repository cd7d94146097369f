//! `vessel`: the Vessel OCI runtime CLI.

mod check;
mod logging;

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
    /// Root directory for sandbox state (overrides state_root in the config).
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check whether this host can run Vessel sandboxes.
    Check(check::CheckArgs),
    /// Print the effective configuration.
    Env,
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    logging::init(cli.log.as_deref(), cli.log_format, cli.debug);
    let result = run(cli, started);
    match result {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            // With --log the error is in the log file (as runc does); say it on stderr too.
            eprintln!("vessel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, started: Instant) -> anyhow::Result<ExitCode> {
    let (mut config, config_path) = vessel_runtime::Config::load(cli.config.as_deref())?;
    if let Some(root) = cli.root {
        config.state_root = root;
    }
    match cli.command {
        Command::Check(args) => check::run(&config, &config_path, args, started),
        Command::Env => {
            println!("# effective configuration (from {})", config_path.display());
            print!("{}", toml::to_string(&config)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
