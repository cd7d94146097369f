//! `vessel run`: create + start + wait; exits with the container's status
//! (128 + signal when it was killed) and deletes it, as runc does.
//! SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 are forwarded to the container.

use std::process::ExitCode;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use vessel_runtime::container::ops;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub create: crate::create::Args,
    /// Return after start; leave the container running.
    #[arg(long, short)]
    pub detach: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let id = a.create.id.clone();
    let pid = crate::create::create(ctx, a.create)?;
    let root = ctx.root();
    let code = crate::block_on(async {
        // Handlers first: a signal that arrives once the container runs
        // must be forwarded, not kill this process.
        let kinds = [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::quit(),
            SignalKind::user_defined1(),
            SignalKind::user_defined2(),
        ];
        let mut streams = Vec::new();
        if !a.detach {
            for k in kinds {
                streams.push((k.as_raw_value() as u32, signal(k)?));
            }
        }
        if let Err(e) = ops::start(root, &id).await {
            let _ = ops::delete(root, &id, true).await;
            return Err(anyhow::Error::from(e));
        }
        if a.detach {
            return Ok(0);
        }
        let mut wait =
            tokio::task::spawn_blocking(move || waitpid(Pid::from_raw(pid as i32), None));
        let status = loop {
            let any_signal = futures_select(&mut streams);
            tokio::select! {
                w = &mut wait => break w?,
                sig = any_signal => {
                    if let Err(e) = ops::kill(root, &id, sig, false).await {
                        log::warn!("forwarding signal {sig}: {}", vessel_runtime::chain(&e));
                    }
                }
            }
        };
        let code = match status {
            Ok(WaitStatus::Exited(_, c)) => c,
            Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            other => anyhow::bail!("waiting for the supervisor of {id}: {other:?}"),
        };
        if let Err(e) = ops::delete(root, &id, true).await {
            log::warn!("deleting {id}: {}", vessel_runtime::chain(&e));
        }
        Ok(code)
    })??;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Resolves with the number of the first signal that arrives.
async fn futures_select(streams: &mut [(u32, tokio::signal::unix::Signal)]) -> u32 {
    std::future::poll_fn(|cx| {
        for (n, s) in streams.iter_mut() {
            if s.poll_recv(cx).is_ready() {
                return std::task::Poll::Ready(*n);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
