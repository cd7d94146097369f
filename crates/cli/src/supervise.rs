//! Hidden subcommands: the container supervisor and the detached-exec
//! supervisor. Both find their readiness pipe at fd 3 and exit with the
//! status of the process they supervise.

use std::path::PathBuf;
use std::process::ExitCode;

use vessel_runtime::container::create::SYNC_FD;
use vessel_runtime::container::{ops, supervisor};

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// ROWSxCOLS: replaces process.consoleSize.
    #[arg(long, value_parser = parse_size)]
    console_size: Option<(u16, u16)>,
    id: String,
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: expected ROWSxCOLS");
    let (r, c) = s.split_once('x').ok_or_else(bad)?;
    Ok((r.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let args = supervisor::SuperviseArgs {
        id: a.id,
        bundle: a.bundle,
        console_socket: a.console_socket,
        console_size: a.console_size,
        sync_fd: SYNC_FD,
    };
    let status = crate::block_on(supervisor::run(&ctx.config, args))?;
    Ok(ExitCode::from(status.clamp(0, 255) as u8))
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// OCI process JSON file.
    #[arg(long)]
    process: PathBuf,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    pub id: String,
}

pub fn run_exec(ctx: &Ctx, a: ExecArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: `exec -d` passes the write end of its readiness pipe at SYNC_FD.
    let mut sync = unsafe { std::fs::File::from_raw_fd(SYNC_FD) };
    supervisor::set_cloexec(&sync);
    let process: serde_json::Value = serde_json::from_slice(&std::fs::read(&a.process)?)?;
    let root = ctx.root().to_path_buf();
    // This process exists for the exec alone: the sandbox's host limits cover it, as they
    // cover the sandbox's supervisor.
    if let Ok(c) = vessel_runtime::container::Container::open(&root, &a.id) {
        if let Err(e) = vessel_runtime::limits::join(&c.state.vm_dir) {
            let _ = writeln!(sync, "ERR {}", vessel_runtime::chain(&e));
            return Ok(ExitCode::from(1));
        }
    }
    let status = crate::block_on(async {
        let exec = match ops::exec(&root, &a.id, &process, a.console_socket.as_deref()).await {
            Ok(e) => {
                let _ = writeln!(sync, "OK {}", e.pid);
                drop(sync);
                supervisor::detach_stdio();
                e
            }
            Err(e) => {
                let _ = writeln!(sync, "ERR {}", e.to_string().replace('\n', " | "));
                return 1;
            }
        };
        match exec.wait().await {
            Ok(s) => s,
            Err(e) => {
                log::error!("exec in {}: {}", a.id, vessel_runtime::chain(&e));
                255
            }
        }
    })?;
    Ok(ExitCode::from(status.clamp(0, 255) as u8))
}
