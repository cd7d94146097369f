//! `vessel kill [--all] <id> [signal]`: names (KILL, SIGKILL) or numbers.

use std::process::ExitCode;
use std::str::FromStr;

use anyhow::bail;
use nix::sys::signal::Signal;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Signal every process of the container.
    #[arg(long, short)]
    pub all: bool,
    pub id: String,
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

pub fn parse_signal(s: &str) -> anyhow::Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        // 0: only checks that the container can be signalled (runc's kill(2) with 0).
        if n <= 64 {
            return Ok(n);
        }
        bail!("signal {n} out of range 0-64");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&name) {
        Ok(sig) => Ok(sig as u32),
        Err(_) => bail!("unknown signal {s:?}"),
    }
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let sig = parse_signal(&a.signal)?;
    crate::block_on(vessel_runtime::container::ops::kill(
        ctx.root(),
        &a.id,
        sig,
        a.all,
    ))??;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("hup").unwrap(), 1);
        assert_eq!(parse_signal("0").unwrap(), 0);
        assert!(parse_signal("FOO").is_err() && parse_signal("65").is_err());
    }
}
