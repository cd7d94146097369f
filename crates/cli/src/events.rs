//! `vessel events [--stats] [--interval N] <id>`: runc's event JSON lines.

use std::process::ExitCode;
use std::time::Duration;

use vessel_runtime::container::ops;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Print one stats event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between stats events.
    #[arg(long, default_value = "5")]
    pub interval: String,
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let secs: f64 = a.interval.trim_end_matches('s').parse()?;
    let root = ctx.root();
    crate::block_on(async {
        let mut ooms = 0u64;
        loop {
            let data = match ops::stats(root, &a.id).await {
                Ok(d) => d,
                Err(e) if !a.stats => {
                    log::info!("events: {}", vessel_runtime::chain(&e));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            let now = data["memory"]["raw"]["oom_kill"].as_u64().unwrap_or(0);
            if now > ooms {
                ooms = now;
                println!("{}", serde_json::json!({"type": "oom", "id": a.id}));
            }
            println!(
                "{}",
                serde_json::json!({"type": "stats", "id": a.id, "data": data})
            );
            if a.stats {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs_f64(secs.max(0.1))).await;
        }
    })??;
    Ok(ExitCode::SUCCESS)
}
