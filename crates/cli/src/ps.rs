//! `vessel ps [--format table|json] <id> [ps options]`: the container's
//! processes. Without options, their guest pids; with options (`-e -x`),
//! `ps OPTIONS` runs inside the container, whose pid namespace holds just
//! its own processes (runc runs the host's ps and keeps the container's
//! lines; the container's processes are not host processes here). A
//! stopped container has no processes: the empty list, as runc.

use std::path::PathBuf;
use std::process::ExitCode;

use vessel_runtime::container::{ops, Bundle, ContainerError, Status};

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, short, default_value = "table")]
    pub format: String,
    pub id: String,
    /// ps(1) options, run by the container's own `ps`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let root = ctx.root();
    if !matches!(a.format.as_str(), "table" | "json") {
        anyhow::bail!("unknown format {:?}: use table or json", a.format);
    }
    if a.format == "table" && !a.ps_args.is_empty() {
        return in_container(ctx, &a);
    }
    let pids = match crate::block_on(ops::processes(root, &a.id))? {
        Ok(p) => p,
        Err(ContainerError::WrongState {
            status: Status::Stopped,
            ..
        }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if a.format == "json" {
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        println!("PID");
        for p in pids {
            println!("{p}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `ps ARGS` as root in the container; exits with its status.
fn in_container(ctx: &Ctx, a: &Args) -> anyhow::Result<ExitCode> {
    let state = ops::state(ctx.root(), &a.id)?;
    if state["status"] == "stopped" {
        return Ok(ExitCode::SUCCESS);
    }
    let bundle = PathBuf::from(state["bundle"].as_str().unwrap_or_default());
    let spec = Bundle::load(&bundle).map(|b| b.spec).unwrap_or_default();
    let mut args = vec!["ps".to_string()];
    args.extend(a.ps_args.iter().cloned());
    let process = ops::exec_process(&spec, &args, &[], None, Some((0, 0)), false);
    let status = crate::block_on(async {
        ops::exec(ctx.root(), &a.id, &process, None)
            .await?
            .wait()
            .await
    })??;
    Ok(ExitCode::from(status.clamp(0, 255) as u8))
}
