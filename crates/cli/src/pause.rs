//! `vessel pause <id>` / `vessel resume <id>` (cgroup freezer in the guest).

use std::process::ExitCode;

use vessel_runtime::container::ops;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    pub id: String,
}

pub fn pause(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    crate::block_on(ops::pause(ctx.root(), &a.id))??;
    Ok(ExitCode::SUCCESS)
}

pub fn resume(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    crate::block_on(ops::resume(ctx.root(), &a.id))??;
    Ok(ExitCode::SUCCESS)
}
