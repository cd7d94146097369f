//! `vessel update`: new resource limits for a container, as runc takes them
//! (`--resources FILE|-` with OCI `linux.resources` JSON, or flags). They
//! are applied to the container's cgroup inside the guest; the VM keeps the
//! vCPUs and memory it booted with, so a limit above them is bounded by them.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::{Map, Value};

use crate::Ctx;

#[derive(clap::Args)]
pub struct Args {
    /// OCI linux.resources JSON file, or "-" for stdin (the flags are then ignored).
    #[arg(long, short)]
    pub resources: Option<PathBuf>,
    /// Memory limit (bytes, or with a k/m/g suffix; -1: unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Memory soft limit.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_reservation: Option<String>,
    /// Memory plus swap limit.
    #[arg(long, allow_hyphen_values = true)]
    pub memory_swap: Option<String>,
    /// Kernel memory limit: cgroup v2 has none (runc ignores it there too).
    #[arg(long, hide = true)]
    pub kernel_memory: Option<String>,
    #[arg(long, hide = true)]
    pub kernel_memory_tcp: Option<String>,
    /// CPU CFS period (microseconds).
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPU CFS quota (microseconds; -1: unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU shares (relative weight).
    #[arg(long)]
    pub cpu_share: Option<u64>,
    #[arg(long)]
    pub cpu_rt_period: Option<u64>,
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_rt_runtime: Option<i64>,
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// Maximum number of pids (-1: unlimited).
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    #[arg(long, hide = true)]
    pub l3_cache_schema: Option<String>,
    #[arg(long, hide = true)]
    pub mem_bw_schema: Option<String>,
    pub id: String,
}

/// Docker's `RAMInBytes`, which runc uses: a number with an optional
/// binary suffix (b, k, m, g, t, p; "kb", "KiB" alike); -1 is unlimited.
pub fn parse_bytes(s: &str) -> anyhow::Result<i64> {
    if s.trim() == "-1" {
        return Ok(-1);
    }
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits);
    let unit = unit.trim().trim_end_matches("ib").trim_end_matches('b');
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1024.0,
        "m" => 1024.0 * 1024.0,
        "g" => 1024.0 * 1024.0 * 1024.0,
        "t" => 1024f64.powi(4),
        "p" => 1024f64.powi(5),
        _ => bail!("invalid size {s:?}: expected bytes with an optional k, m, g, t or p suffix"),
    };
    let n: f64 = num.parse().with_context(|| format!("invalid size {s:?}"))?;
    Ok((n * mult) as i64)
}

/// The OCI `linux.resources` object the flags describe.
fn from_flags(a: &Args) -> anyhow::Result<Value> {
    if a.kernel_memory.is_some() || a.kernel_memory_tcp.is_some() {
        bail!("--kernel-memory: cgroup v2 (the guest's) has no kernel memory limit");
    }
    if a.l3_cache_schema.is_some() || a.mem_bw_schema.is_some() {
        bail!("--l3-cache-schema/--mem-bw-schema: Intel RDT is not available in the VM");
    }
    let mut r = Map::new();
    let mut section = |name: &str, fields: Vec<(&str, Option<Value>)>| {
        let m: Map<String, Value> = fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
            .collect();
        if !m.is_empty() {
            r.insert(name.to_string(), Value::Object(m));
        }
    };
    let bytes = |v: &Option<String>| -> anyhow::Result<Option<Value>> {
        v.as_deref()
            .map(|s| parse_bytes(s).map(Value::from))
            .transpose()
    };
    section(
        "memory",
        vec![
            ("limit", bytes(&a.memory)?),
            ("reservation", bytes(&a.memory_reservation)?),
            ("swap", bytes(&a.memory_swap)?),
        ],
    );
    section(
        "cpu",
        vec![
            ("shares", a.cpu_share.map(Value::from)),
            ("quota", a.cpu_quota.map(Value::from)),
            ("period", a.cpu_period.map(Value::from)),
            ("realtimePeriod", a.cpu_rt_period.map(Value::from)),
            ("realtimeRuntime", a.cpu_rt_runtime.map(Value::from)),
            ("cpus", a.cpuset_cpus.clone().map(Value::from)),
            ("mems", a.cpuset_mems.clone().map(Value::from)),
        ],
    );
    section("pids", vec![("limit", a.pids_limit.map(Value::from))]);
    section("blockIO", vec![("weight", a.blkio_weight.map(Value::from))]);
    Ok(Value::Object(r))
}

pub fn run(ctx: &Ctx, a: Args) -> anyhow::Result<ExitCode> {
    let resources = match &a.resources {
        Some(p) => {
            let mut text = Vec::new();
            if p.as_os_str() == "-" {
                std::io::stdin()
                    .read_to_end(&mut text)
                    .context("read resources from stdin")?;
            } else {
                text = std::fs::read(p).with_context(|| p.display().to_string())?;
            }
            let v: Value = serde_json::from_slice(&text).context("resources JSON")?;
            if !v.is_object() {
                bail!("resources: expected a JSON object (OCI linux.resources)");
            }
            v
        }
        None => from_flags(&a)?,
    };
    log::debug!("update {}: {resources}", a.id);
    crate::block_on(vessel_runtime::container::ops::update(
        ctx.root(),
        &a.id,
        resources,
    ))??;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_runc() {
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_bytes("10M").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("1g").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512kb").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("2MiB").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("-1").unwrap(), -1);
        assert!(parse_bytes("ten").is_err() && parse_bytes("5x").is_err());
    }
}
