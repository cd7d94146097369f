//! `vessel events [--stats] [--interval D] <id>`: runc's event JSON lines
//! (`{"type":"stats","id":...,"data":{...}}`, `{"type":"oom","id":...}`),
//! and Vessel's security events (`{"type":"security","id":...,"data":{"kind":
//! ...}}`, see docs/threat-model.md): with `--stats` those recorded so far,
//! else each new one every interval.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use vessel_runtime::container::ops;

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// Print one stats event and exit.
    #[arg(long)]
    pub stats: bool,
    /// Time between stats events, as runc takes it: a Go duration ("5s",
    /// "100ms", "1m30s").
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    pub id: String,
}

/// runc's event, fields in its order.
#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<serde_json::Value>,
}

/// A Go `time.ParseDuration` string: decimal numbers with units ns, us
/// (µs), ms, s, m, h, e.g. "1m30s", "1.5s", "100ms". A bare number is
/// seconds (what earlier vessel versions took).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let bad = || format!("invalid duration {s:?}: expected e.g. 5s, 100ms, 1m30s");
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        bail!(bad());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .with_context(bad)?;
        let value: f64 = rest[..n].parse().with_context(bad)?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => bail!(bad()),
        };
        total += value * unit;
        rest = &rest[u..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn print(e: &Event) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(e)?);
    Ok(())
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    if a.interval.is_zero() {
        bail!("--interval must be greater than 0");
    }
    let root = ctx.root();
    let dir = vessel_runtime::container::container_dir(root, &a.id)?;
    crate::block_on(async {
        let mut ooms = 0u64;
        let mut security = 0usize;
        loop {
            let recorded = vessel_runtime::guest_events::recorded(&dir);
            for data in recorded.into_iter().skip(security) {
                security += 1;
                print(&Event {
                    kind: "security",
                    id: &a.id,
                    data: Some(data),
                })?;
            }
            let data = match ops::stats(root, &a.id).await {
                Ok(d) => d,
                Err(e) if !a.stats => {
                    log::info!("events: {}", vessel_runtime::chain(&e));
                    return Ok(());
                }
                Err(e) => return Err(anyhow::Error::from(e)),
            };
            let now = data["memory"]["raw"]["oom_kill"].as_u64().unwrap_or(0);
            if now > ooms {
                ooms = now;
                print(&Event {
                    kind: "oom",
                    id: &a.id,
                    data: None,
                })?;
            }
            print(&Event {
                kind: "stats",
                id: &a.id,
                data: Some(data),
            })?;
            if a.stats {
                return Ok(());
            }
            tokio::time::sleep(a.interval).await;
        }
    })??;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "5x", "ms", "-1s", "1s5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
