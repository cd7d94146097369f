//! `vessel spec`: writes runc's default config.json (terminal on, `sh`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// Directory to write config.json into (default: current directory).
    #[arg(long, short)]
    pub bundle: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dir = a.bundle.unwrap_or_else(|| PathBuf::from("."));
    let path = dir.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&vessel_runtime::image::spec::default_spec())? + "\n",
    )?;
    Ok(ExitCode::SUCCESS)
}
