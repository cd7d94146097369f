//! OCI hooks, run on the host with the container state on stdin.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ContainerError, Result};

/// Runs every hook of `kind` (`prestart`, `createRuntime`, `poststart`,
/// `poststop`, ...) in order; the first failure stops the rest.
pub fn run(spec: &Value, kind: &str, state: &Value) -> Result<()> {
    for (index, hook) in spec["hooks"][kind]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        run_one(kind, index, hook, state)?;
    }
    Ok(())
}

fn run_one(kind: &str, index: usize, hook: &Value, state: &Value) -> Result<()> {
    let path = hook["path"].as_str().unwrap_or_default();
    let err = |reason: String| ContainerError::Hook {
        kind: kind.to_string(),
        index,
        path: path.to_string(),
        reason,
    };
    let strs = |k: &str| -> Vec<String> {
        hook[k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let args = strs("args");
    let mut cmd = Command::new(path);
    if let Some((arg0, rest)) = args.split_first() {
        std::os::unix::process::CommandExt::arg0(&mut cmd, arg0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for e in strs("env") {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state.to_string().as_bytes());
    }
    let timeout = hook["timeout"].as_u64().map(Duration::from_secs);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| err(e.to_string()))? {
            break s;
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err(format!("timed out after {timeout:?}")));
        }
        // Hooks are rare and short; a coarse poll keeps this simple.
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    match stderr.trim() {
        "" => Err(err(status.to_string())),
        text => Err(err(format!("{status}: {text}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_state_on_stdin() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let spec = serde_json::json!({"hooks": {"poststop": [
            {"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]},
        ], "prestart": [{"path": "/bin/false"}]}});
        let state = serde_json::json!({"id": "c1"});
        run(&spec, "poststop", &state).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), r#"{"id":"c1"}"#);
        assert_eq!(
            run(&spec, "prestart", &state).unwrap_err().to_string(),
            "error running prestart hook #0 (/bin/false): exit status: 1"
        );
        run(&spec, "poststart", &state).unwrap();
        // A hook killed by a signal fails with the signal named.
        let killed = serde_json::json!({"hooks": {"createRuntime": [
            {"path": "/bin/true"},
            {"path": "/bin/sh", "args": ["sh", "-c", "kill -SYS $$"]},
        ]}});
        let e = run(&killed, "createRuntime", &state)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("error running createRuntime hook #1 (/bin/sh): signal: 31 (SIGSYS)"),
            "{e}"
        );
    }
}
