//! `vessel state <id>`: the OCI state as JSON.

use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let s = vessel_runtime::container::ops::oci_state(ctx.root(), &a.id)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(ExitCode::SUCCESS)
}
