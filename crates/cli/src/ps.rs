//! `vessel ps [--format table|json] <id>`: guest pids of the container.

use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short, default_value = "table")]
    pub format: String,
    pub id: String,
    /// ps(1) options (runc passes them to the host ps; ignored: pids are guest pids).
    #[arg(trailing_var_arg = true)]
    pub ps_args: Vec<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let pids = crate::block_on(vessel_runtime::container::ops::processes(ctx.root(), &a.id))??;
    match a.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID");
            for p in pids {
                println!("{p}");
            }
        }
        f => anyhow::bail!("unknown format {f:?}: use table or json"),
    }
    Ok(ExitCode::SUCCESS)
}
