//! `vessel start <id>`.

use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    crate::block_on(vessel_runtime::container::ops::start(ctx.root(), &a.id))??;
    Ok(ExitCode::SUCCESS)
}
