//! `vessel run`: create + start + wait; exits with the container's status
//! (128 + signal when it was killed) and deletes it, as runc does.
//! SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2 are forwarded to the container;
//! before it runs (image read, VM booting) they stop the run (crate::signals).
//! A terminal process without `--console-socket` runs on our own terminal
//! (raw mode, window size at start and on SIGWINCH), as with runc.
//! With `--image REF` the bundle is made from an image first (crate::image)
//! and removed after the run.

use std::fs::File;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use vessel_runtime::container::{ops, Bundle};

use crate::signals::{self, Signals};
use crate::tty::{self, ConsoleSocket, RawMode};
use crate::Ctx;

/// How long the terminal's last output may take to arrive after the exit.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub create: crate::create::Args,
    /// Return after start; leave the container running.
    #[arg(long, short)]
    pub detach: bool,
    /// Do not delete the container after it exits.
    #[arg(long)]
    pub keep: bool,
    /// Run this image instead of a bundle: an OCI archive
    /// (`oci-archive:PATH[:TAG]` or a file), an OCI layout (`oci:DIR[:TAG]` or a
    /// directory) or a registry reference (`HOST[:PORT]/NAME[:TAG]`; plain HTTP
    /// to a registry on the loopback interface). Its bundle is temporary.
    #[arg(long, value_name = "REF", conflicts_with_all = ["bundle", "detach", "keep"])]
    pub image: Option<String>,
    /// With --image: run the process on a terminal.
    #[arg(long, short, requires = "image")]
    pub tty: bool,
    /// With --image: the network namespace to join (default: a new one,
    /// loopback only).
    #[arg(long, value_name = "PATH", requires = "image")]
    pub netns: Option<std::path::PathBuf>,
    /// With --image: the command, replacing the image's Cmd (its entrypoint stays).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// A terminal on our own stdio: the pty master our supervisor sent.
struct Foreground {
    master: File,
    output_done: std::sync::mpsc::Receiver<()>,
    _raw: RawMode,
}

impl Foreground {
    /// Relays stdin -> master and master -> stdout; raw mode on stdin.
    fn start(master: File) -> anyhow::Result<Foreground> {
        let (tx, output_done) = std::sync::mpsc::channel();
        let (input, output) = (master.try_clone()?, master.try_clone()?);
        let (stdin, stdout) = (tty::dup_std(0)?, tty::dup_std(1)?);
        let raw = RawMode::stdin();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut &stdin, &mut &input);
        });
        std::thread::spawn(move || {
            // Ends with EIO once the supervisor closed the slave.
            let _ = copy_flushed(&output, &stdout);
            let _ = tx.send(());
        });
        Ok(Foreground {
            master,
            output_done,
            _raw: raw,
        })
    }

    fn window_changed(&self) {
        if let Some(size) = tty::stdin_size() {
            if let Err(e) = tty::set_size(&self.master, size) {
                log::warn!("resize: {e}");
            }
        }
    }
}

fn copy_flushed(mut src: &File, mut dst: &File) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
    }
}

pub fn run(ctx: &Ctx, mut a: Args) -> anyhow::Result<ExitCode> {
    let id = a.create.id.clone();
    anyhow::ensure!(
        a.image.is_some() || a.command.is_empty(),
        "a command after the container id needs --image (a bundle's command is in its config.json)"
    );
    let rt = crate::runtime()?;
    // Caught before anything is made: until the container runs, a signal stops
    // the run and everything it made goes; then they are forwarded.
    let mut signals = match a.detach {
        true => None,
        false => Some(Signals::catch(&rt)?),
    };
    // Dropped when this returns, after the container was deleted: the bundle goes.
    let _image_bundle = match (&a.image, signals.as_mut()) {
        (Some(reference), Some(signals)) => {
            let opts = vessel_runtime::image::RunOptions {
                args: std::mem::take(&mut a.command),
                terminal: a.tty,
                netns: a.netns.take().map(std::path::absolute).transpose()?,
                // sethostname(2) takes at most 64 bytes.
                hostname: id.chars().take(63).collect(),
            };
            let (b, sig) = crate::image::prepare(ctx, reference, &id, &opts, &rt, signals);
            if let Some(sig) = sig {
                log::warn!("{id}: signal {sig} while reading the image: stopped");
                return Ok(signals::status(sig));
            }
            let b = b?;
            a.create.bundle = b.path().to_path_buf();
            Some(b)
        }
        _ => None,
    };
    let bundle = std::path::absolute(&a.create.bundle)?;
    let foreground_tty = !a.detach
        && a.create.console_socket.is_none()
        && Bundle::load(&bundle).is_ok_and(|b| b.terminal());
    let console = if foreground_tty {
        let c = ConsoleSocket::bind()?;
        a.create.console_socket = Some(c.path.clone());
        Some(c)
    } else {
        None
    };
    let size = console.as_ref().and_then(|_| tty::stdin_size());
    let root = ctx.root();
    let create = || crate::create::create(ctx, a.create, size);
    let pid = match signals.as_mut() {
        Some(signals) => match signals.during(&rt, || {}, create) {
            (created, None) => created?,
            // The VM booted (or failed to) meanwhile: a created container goes.
            (created, Some(sig)) => {
                log::warn!("{id}: signal {sig} while the VM booted: stopping");
                match created {
                    Ok(_) => {
                        if let Err(e) = rt.block_on(ops::delete(root, &id, true)) {
                            log::warn!("deleting {id}: {}", vessel_runtime::chain(&e));
                        }
                    }
                    Err(e) => log::warn!("{id}: {e:#}"),
                }
                return Ok(signals::status(sig));
            }
        },
        None => create()?,
    };
    let fg = match console
        .as_ref()
        .map(|c| c.receive().and_then(Foreground::start))
    {
        Some(Ok(f)) => Some(f),
        Some(Err(e)) => {
            let _ = rt.block_on(ops::delete(root, &id, true));
            return Err(e);
        }
        None => None,
    };
    drop(console);
    let code = rt.block_on(async {
        let mut winch = signal(SignalKind::window_change())?;
        if let Err(e) = ops::start(root, &id).await {
            let _ = ops::delete(root, &id, true).await;
            return Err(anyhow::Error::from(e));
        }
        let Some(signals) = signals.as_mut() else {
            return Ok(0);
        };
        let mut wait =
            tokio::task::spawn_blocking(move || waitpid(Pid::from_raw(pid as i32), None));
        let status = loop {
            tokio::select! {
                w = &mut wait => break w?,
                sig = signals.next() => {
                    if let Err(e) = ops::kill(root, &id, sig as u32, false).await {
                        log::warn!("forwarding signal {sig}: {}", vessel_runtime::chain(&e));
                    }
                }
                _ = winch.recv() => {
                    if let Some(f) = &fg {
                        f.window_changed();
                    }
                }
            }
        };
        let code = match status {
            Ok(WaitStatus::Exited(_, c)) => c,
            Ok(WaitStatus::Signaled(_, s, _)) => 128 + s as i32,
            other => anyhow::bail!("waiting for the supervisor of {id}: {other:?}"),
        };
        if let Some(f) = &fg {
            if f.output_done.recv_timeout(DRAIN).is_err() {
                log::warn!("{id}: terminal output still open after exit; cut");
            }
        }
        if !a.keep {
            if let Err(e) = ops::delete(root, &id, true).await {
                log::warn!("deleting {id}: {}", vessel_runtime::chain(&e));
            }
        }
        Ok(code)
    })?;
    drop(fg);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
