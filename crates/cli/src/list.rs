//! `vessel list [--format table|json] [-q]`.

use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short, default_value = "table")]
    pub format: String,
    /// Print ids only.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let all = vessel_runtime::container::ops::list(ctx.root());
    if a.quiet {
        all.iter().for_each(|s| println!("{}", s.id));
        return Ok(ExitCode::SUCCESS);
    }
    match a.format.as_str() {
        "json" => {
            let v: Vec<_> = all.iter().map(|s| s.oci_state()).collect();
            println!("{}", serde_json::to_string(&v)?);
        }
        "table" => {
            println!(
                "{:<20} {:<8} {:<10} {:<40} {:<32} OWNER",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for s in &all {
                let o = s.oci_state();
                println!(
                    "{:<20} {:<8} {:<10} {:<40} {:<32} {}",
                    o.id,
                    o.pid,
                    o.status,
                    o.bundle.display(),
                    o.created,
                    o.owner
                );
            }
        }
        f => anyhow::bail!("unknown format {f:?}: use table or json"),
    }
    Ok(ExitCode::SUCCESS)
}
