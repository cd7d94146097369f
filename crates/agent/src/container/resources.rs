//! Applies an update of OCI `linux.resources` to a container's cgroup v2 files.
//!
//! Applied: memory limit / reservation / swap, cpu quota / period / shares,
//! pids limit. The conversions follow runc's cgroup v2 ones, so a limit means
//! the same as under runc. Everything is validated before the first write.

use std::path::Path;

use oci_spec::runtime::LinuxResources;
use serde_json::Value;

/// The fields an update applies, per `linux.resources` object.
const APPLIED: [(&str, &[&str]); 3] = [
    ("memory", &["limit", "reservation", "swap"]),
    ("cpu", &["shares", "quota", "period"]),
    ("pids", &["limit"]),
];

/// cpu.max period bounds, microseconds (the kernel's).
const CPU_PERIOD_US: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
/// Smallest cpu.max quota, microseconds (the kernel's).
const MIN_CPU_QUOTA_US: i64 = 1_000;
/// cpu.shares bounds (cgroup v1's), mapped onto cpu.weight 1..=10000.
const CPU_SHARES: std::ops::RangeInclusive<u64> = 2..=262_144;

/// Why an update was refused or failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ResourcesError {
    /// invalid linux.resources JSON
    Json(#[from] serde_json::Error),
    /// linux.resources.{0} cannot be updated in the guest; supported: memory.limit, memory.reservation, memory.swap, cpu.quota, cpu.period, cpu.shares, pids.limit
    Unsupported(String),
    /// linux.resources.{field} = {value} is invalid: {reason}
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// write {value:?} to {path}
    Write {
        path: String,
        value: String,
        source: std::io::Error,
    },
}

/// One cgroup v2 file and the value to write to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupWrite {
    pub file: &'static str,
    pub value: String,
}

fn write(file: &'static str, value: impl Into<String>) -> CgroupWrite {
    CgroupWrite {
        file,
        value: value.into(),
    }
}

fn invalid(field: &'static str, value: impl ToString, reason: &'static str) -> ResourcesError {
    ResourcesError::Invalid {
        field,
        value: value.to_string(),
        reason,
    }
}

/// JSON that sets nothing: null, false, "", [], {}.
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Parses `linux.resources` JSON and refuses any field an update cannot apply.
/// `devices` is accepted and left alone: containerd sends the container's
/// whole resources, creation-time device rules included, with every update.
/// Huge page limits of 0 are accepted too (kubelet sends one per host page
/// size; the guest has no huge pages, so a limit of 0 holds).
pub fn parse(json: &[u8]) -> Result<LinuxResources, ResourcesError> {
    let value: Value = serde_json::from_slice(json)?;
    let Value::Object(top) = &value else {
        return Err(ResourcesError::Unsupported(
            "(not a JSON object)".to_string(),
        ));
    };
    for (key, v) in top {
        if key == "devices" || is_unset(v) {
            continue;
        }
        if key == "hugepageLimits" {
            let all_zero = v
                .as_array()
                .is_some_and(|a| a.iter().all(|l| l["limit"].as_i64() == Some(0)));
            if all_zero {
                continue;
            }
        }
        let Some((_, fields)) = APPLIED.iter().find(|(name, _)| name == key) else {
            return Err(ResourcesError::Unsupported(key.clone()));
        };
        let Value::Object(inner) = v else {
            return Err(ResourcesError::Unsupported(format!(
                "{key} (not a JSON object)"
            )));
        };
        if let Some((field, _)) = inner
            .iter()
            .find(|(f, fv)| !fields.contains(&f.as_str()) && !is_unset(fv))
        {
            return Err(ResourcesError::Unsupported(format!("{key}.{field}")));
        }
    }
    Ok(serde_json::from_value(value)?)
}

/// A byte or count limit: -1 = "max", > 0 = the number, 0 = not set.
fn limit(field: &'static str, v: Option<i64>) -> Result<Option<String>, ResourcesError> {
    match v {
        None | Some(0) => Ok(None),
        Some(-1) => Ok(Some("max".into())),
        Some(n) if n > 0 => Ok(Some(n.to_string())),
        Some(n) => Err(invalid(
            field,
            n,
            "expected -1 (unlimited) or a positive number",
        )),
    }
}

/// The cgroup v2 writes of an update. `cpu_max` is the current content of
/// cpu.max (`<quota|max> <period>`), used when only one half changes.
pub fn plan(r: &LinuxResources, cpu_max: Option<&str>) -> Result<Vec<CgroupWrite>, ResourcesError> {
    let mut out = Vec::new();
    if let Some(m) = r.memory() {
        let max = limit("memory.limit", m.limit())?;
        if let Some(v) = &max {
            out.push(write("memory.max", v));
        }
        if let Some(v) = limit("memory.reservation", m.reservation())? {
            out.push(write("memory.low", v));
        }
        // OCI swap is memory + swap; cgroup v2's swap.max is swap alone.
        let swap = match (m.swap(), m.limit()) {
            (None | Some(0), _) => None,
            (Some(-1), _) => Some("max".to_string()),
            (Some(s), Some(l)) if l > 0 && s >= l => Some((s - l).to_string()),
            (Some(s), Some(l)) if l > 0 => {
                return Err(invalid(
                    "memory.swap",
                    s,
                    "memory+swap must be >= memory.limit",
                ))
            }
            (Some(s), _) => {
                return Err(invalid(
                    "memory.swap",
                    s,
                    "a swap limit needs a positive memory.limit in the same update",
                ))
            }
        };
        if let Some(v) = swap {
            out.push(write("memory.swap.max", v));
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(shares) = c.shares().filter(|&s| s != 0) {
            if !CPU_SHARES.contains(&shares) {
                return Err(invalid("cpu.shares", shares, "expected 2..=262144"));
            }
            // runc's mapping of shares [2, 262144] onto weight [1, 10000].
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            out.push(write("cpu.weight", weight.to_string()));
        }
        let quota = match c.quota() {
            None | Some(0) => None,
            Some(-1) => Some("max".to_string()),
            Some(q) if q >= MIN_CPU_QUOTA_US => Some(q.to_string()),
            Some(q) => {
                return Err(invalid(
                    "cpu.quota",
                    q,
                    "expected -1 (unlimited) or at least 1000 microseconds",
                ))
            }
        };
        let period = match c.period() {
            None | Some(0) => None,
            Some(p) if CPU_PERIOD_US.contains(&p) => Some(p),
            Some(p) => {
                return Err(invalid(
                    "cpu.period",
                    p,
                    "expected 1000..=1000000 microseconds",
                ))
            }
        };
        let cpu_max = match (quota, period) {
            (None, None) => None,
            // The kernel keeps the period when only the quota is written.
            (Some(q), None) => Some(q),
            (q, Some(p)) => {
                let current = cpu_max.and_then(|s| s.split_whitespace().next());
                let q = q.or(current.map(str::to_string)).unwrap_or("max".into());
                Some(format!("{q} {p}"))
            }
        };
        if let Some(v) = cpu_max {
            out.push(write("cpu.max", v));
        }
    }
    if let Some(p) = r.pids() {
        if let Some(v) = limit("pids.limit", Some(p.limit()))? {
            out.push(write("pids.max", v));
        }
    }
    Ok(out)
}

/// Writes `writes` in order under the cgroup directory `dir`. A missing
/// memory.swap.max (guest kernel without swap accounting) is skipped: with no
/// swap accounting there is no swap to limit.
pub fn apply(dir: &Path, writes: &[CgroupWrite]) -> Result<(), ResourcesError> {
    for w in writes {
        let path = dir.join(w.file);
        if w.file == "memory.swap.max" && !path.exists() {
            log::info!("{} absent: no swap accounting in the guest", path.display());
            continue;
        }
        std::fs::write(&path, &w.value).map_err(|source| ResourcesError::Write {
            path: path.display().to_string(),
            value: w.value.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_json(json: &str, cpu_max: Option<&str>) -> Result<Vec<CgroupWrite>, ResourcesError> {
        plan(&parse(json.as_bytes())?, cpu_max)
    }

    fn files(w: &[CgroupWrite]) -> Vec<(&str, &str)> {
        w.iter().map(|w| (w.file, w.value.as_str())).collect()
    }

    #[test]
    fn converts_like_runc() {
        // What containerd 1.6 sends for UpdateContainerResources.
        let json = r#"{
            "devices": [{"allow": false, "access": "rwm"}],
            "memory": {"limit": 67108864, "swap": 67108864, "reservation": 0},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "", "mems": ""},
            "pids": {"limit": 100},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}]
        }"#;
        let w = plan_json(json, Some("max 100000")).unwrap();
        assert_eq!(
            files(&w),
            [
                ("memory.max", "67108864"),
                ("memory.swap.max", "0"),
                ("cpu.weight", "39"),
                ("cpu.max", "50000 100000"),
                ("pids.max", "100"),
            ]
        );
        let w = plan_json(r#"{"memory": {"limit": -1, "swap": -1}}"#, None).unwrap();
        assert_eq!(
            files(&w),
            [("memory.max", "max"), ("memory.swap.max", "max")]
        );
        // Only the quota: the kernel keeps the period.
        let w = plan_json(r#"{"cpu": {"quota": 20000}}"#, None).unwrap();
        assert_eq!(files(&w), [("cpu.max", "20000")]);
        // Only the period: the current quota is kept.
        let w = plan_json(r#"{"cpu": {"period": 50000}}"#, Some("30000 100000")).unwrap();
        assert_eq!(files(&w), [("cpu.max", "30000 50000")]);
        let w = plan_json(r#"{"cpu": {"shares": 2}, "pids": {"limit": -1}}"#, None).unwrap();
        assert_eq!(files(&w), [("cpu.weight", "1"), ("pids.max", "max")]);
        let w = plan_json(r#"{"cpu": {"shares": 262144}}"#, None).unwrap();
        assert_eq!(files(&w), [("cpu.weight", "10000")]);
        assert!(plan_json("{}", None).unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_and_unsupported_values() {
        for (json, field) in [
            (r#"{"memory": {"limit": -5}}"#, "memory.limit"),
            (r#"{"memory": {"swap": 100}}"#, "memory.swap"),
            (r#"{"memory": {"limit": 200, "swap": 100}}"#, "memory.swap"),
            (r#"{"cpu": {"quota": 500}}"#, "cpu.quota"),
            (r#"{"cpu": {"quota": -2}}"#, "cpu.quota"),
            (r#"{"cpu": {"period": 100}}"#, "cpu.period"),
            (r#"{"cpu": {"period": 2000000}}"#, "cpu.period"),
            (r#"{"cpu": {"shares": 1}}"#, "cpu.shares"),
            (r#"{"pids": {"limit": -3}}"#, "pids.limit"),
        ] {
            match plan_json(json, None) {
                Err(ResourcesError::Invalid { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        for (json, what) in [
            (r#"{"cpu": {"cpus": "0-1"}}"#, "cpu.cpus"),
            (r#"{"memory": {"swappiness": 10}}"#, "memory.swappiness"),
            (
                r#"{"memory": {"disableOOMKiller": true}}"#,
                "memory.disableOOMKiller",
            ),
            (r#"{"blockIO": {"weight": 10}}"#, "blockIO"),
            (r#"{"unified": {"memory.high": "1"}}"#, "unified"),
            (
                r#"{"hugepageLimits": [{"pageSize": "2MB", "limit": 4096}]}"#,
                "hugepageLimits",
            ),
            (r#"{"madeUp": 1}"#, "madeUp"),
        ] {
            match plan_json(json, None) {
                Err(ResourcesError::Unsupported(f)) => assert_eq!(f, what, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(matches!(
            plan_json("[1]", None),
            Err(ResourcesError::Unsupported(_))
        ));
        assert!(matches!(
            plan_json(r#"{"memory": {"limit": "x"}}"#, None),
            Err(ResourcesError::Json(_))
        ));
    }

    #[test]
    fn applies_in_order_and_skips_missing_swap() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["memory.max", "cpu.max"] {
            std::fs::write(dir.path().join(f), "max\n").unwrap();
        }
        let w = [
            write("memory.max", "4096"),
            write("memory.swap.max", "0"),
            write("cpu.max", "20000 100000"),
        ];
        apply(dir.path(), &w).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(read("memory.max"), "4096");
        assert_eq!(read("cpu.max"), "20000 100000");
        let missing = [write("pids.max", "5")];
        let no_dir = dir.path().join("gone");
        assert!(matches!(
            apply(&no_dir, &missing),
            Err(ResourcesError::Write { .. })
        ));
    }
}
