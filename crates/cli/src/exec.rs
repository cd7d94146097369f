//! `vessel exec`: runs a process in a running container. Without `-d` it
//! relays stdio itself and exits with the process's status; with `-d` a
//! detached `supervise-exec` does that and `--pid-file` gets its pid.
//! A terminal without `--console-socket` is our own (raw mode, window size).
//! Vessel's own failures exit 255 (as runc's), apart from the process's 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use vessel_runtime::container::{create, ops, Bundle};

use crate::tty::{self, RawMode};
use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// OCI process JSON file (replaces args and the flags below).
    #[arg(long, short)]
    pub process: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(long, short)]
    pub tty: bool,
    /// Detach: a background process relays stdio and carries the exit status.
    #[arg(long, short)]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Environment variables KEY=VALUE.
    #[arg(long, short)]
    pub env: Vec<String>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// uid[:gid].
    #[arg(long, short)]
    pub user: Option<String>,
    /// Additional groups (comma-separated gids, or the flag repeated).
    #[arg(long, short = 'g', value_delimiter = ',')]
    pub additional_gids: Vec<u32>,
    /// Sub-cgroup to run in: only the container's own ("/" or empty); the
    /// guest's cgroups are the container's alone.
    #[arg(long)]
    pub cgroup: Vec<String>,
    /// runc: exec into a paused container. Refused here, with the reason.
    #[arg(long)]
    pub ignore_paused: bool,
    pub id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

fn parse_user(u: &str) -> anyhow::Result<(u32, u32)> {
    let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
    Ok((uid.parse().context("uid")?, gid.parse().context("gid")?))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    for c in &a.cgroup {
        let path = c.rsplit_once(':').map_or(c.as_str(), |(_, p)| p);
        if !matches!(path, "" | "/") {
            bail!(
                "--cgroup {c}: sub-cgroups are not supported: the process joins the \
                 container's cgroup inside its VM"
            );
        }
    }
    if a.ignore_paused && ops::state(ctx.root(), &a.id)?["status"] == "paused" {
        bail!(
            "--ignore-paused: exec into a paused container is not supported: the guest's \
             libcontainer would set the process up inside the frozen cgroup; resume it first"
        );
    }
    let mut process: serde_json::Value = match &a.process {
        Some(p) => {
            serde_json::from_slice(&std::fs::read(p).with_context(|| p.display().to_string())?)?
        }
        None => {
            if a.args.is_empty() {
                bail!("exec needs a command (or --process)");
            }
            let state = ops::state(ctx.root(), &a.id)?;
            let bundle = PathBuf::from(state["bundle"].as_str().unwrap_or_default());
            let spec = Bundle::load(&bundle).map(|b| b.spec).unwrap_or_default();
            let user = a.user.as_deref().map(parse_user).transpose()?;
            ops::exec_process(&spec, &a.args, &a.env, a.cwd.as_deref(), user, a.tty)
        }
    };
    if !process.is_object() {
        bail!("the process must be a JSON object");
    }
    // runc runs a process without `user` as uid 0.
    if !process["user"].is_object() {
        process["user"] = serde_json::json!({"uid": 0, "gid": 0});
    }
    if !a.additional_gids.is_empty() {
        process["user"]["additionalGids"] = a.additional_gids.clone().into();
    }
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    let foreground_tty = terminal && !a.detach && a.console_socket.is_none();
    if foreground_tty {
        if let Some((rows, cols)) = tty::stdin_size() {
            process["consoleSize"] = serde_json::json!({"height": rows, "width": cols});
        }
    }
    if a.detach {
        return detached(ctx, &a, &process);
    }
    if let Some(p) = &a.pid_file {
        create::write_pid_file(p, std::process::id())?;
    }
    let root = ctx.root();
    let _raw = foreground_tty.then(RawMode::stdin);
    let status = crate::block_on(async {
        let exec = ops::exec(root, &a.id, &process, a.console_socket.as_deref()).await?;
        let exec_id = exec.exec_id.clone();
        let mut winch = signal(SignalKind::window_change())?;
        let wait = exec.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                s = &mut wait => break Ok::<_, anyhow::Error>(s?),
                _ = winch.recv(), if foreground_tty => {
                    if let Some((rows, cols)) = tty::stdin_size() {
                        if let Err(e) = ops::resize(root, &a.id, Some(&exec_id), rows, cols).await {
                            log::warn!("resize: {}", vessel_runtime::chain(&e));
                        }
                    }
                }
            }
        }
    })??;
    Ok(ExitCode::from(status.clamp(0, 255) as u8))
}

fn detached(ctx: &Ctx, a: &Args, process: &serde_json::Value) -> anyhow::Result<ExitCode> {
    let dir = ctx.root().join(&a.id);
    if !dir.is_dir() {
        bail!("container {} does not exist", a.id);
    }
    let file = tempfile_in(&dir)?;
    std::fs::write(&file, serde_json::to_vec(process)?)?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&ctx.global_args)
        .arg("supervise-exec")
        .arg("--process")
        .arg(&file);
    if let Some(s) = &a.console_socket {
        cmd.arg("--console-socket").arg(std::path::absolute(s)?);
    }
    cmd.arg(&a.id);
    let inherit = !process["terminal"].as_bool().unwrap_or(false);
    let (mut child, reply) = create::spawn_supervisor(&mut cmd, inherit, None)?;
    let _ = std::fs::remove_file(&file);
    match reply.lines().next().and_then(|l| l.strip_prefix("OK ")) {
        Some(_) => {}
        None => {
            let _ = child.wait();
            let msg = reply
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("ERR "))
                .unwrap_or("exec supervisor exited early");
            bail!("{msg}");
        }
    }
    if let Some(p) = &a.pid_file {
        create::write_pid_file(&std::path::absolute(p)?, child.id())?;
    }
    Ok(ExitCode::SUCCESS)
}

fn tempfile_in(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .subsec_nanos();
    Ok(dir.join(format!("exec-{}-{nanos}.json", std::process::id())))
}
