//! `vessel delete [--force] <id>`.

use std::process::ExitCode;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Delete even if running (the VM is stopped).
    #[arg(long, short)]
    pub force: bool,
    pub id: String,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let res = crate::block_on(vessel_runtime::container::ops::delete(
        ctx.root(),
        &a.id,
        a.force,
    ))?;
    match res {
        // runc: `delete --force` of a missing container succeeds.
        Err(vessel_runtime::container::ContainerError::NotFound(_)) if a.force => {}
        r => r?,
    }
    Ok(ExitCode::SUCCESS)
}
