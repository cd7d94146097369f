//! What runs in a container's process between libcontainer's set-up and the
//! exec of the payload (libcontainer's executor hook), as runc does it:
//! - the ENOSYS filter for syscalls libseccomp has no name for ([`seccomp`]);
//! - the `startContainer` hooks, run here rather than by libcontainer so that
//!   a failing one is reported to `start` with the reason (runc: "error
//!   running startContainer hook"; libcontainer only logs it and the process
//!   exits, so `start` succeeded and the container just stopped);
//! - for a terminal process, a short wait until the agent has handed the pty
//!   slave to the process user (it does so when it receives the master, which
//!   for an exec races with the process's start).
//!
//! The report goes through a pipe whose write end the helper passes on at
//! [`REPORT_FD`] (close-on-exec): the agent reads end of file once the
//! payload runs, or the hook's error.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::{Hook, Spec};

use super::seccomp;

/// The fd number the helper gives the report pipe's write end.
pub const REPORT_FD: RawFd = 3;
/// At most this much of a report (and of a hook's output) is kept.
pub const REPORT_CAP: usize = 4096;
/// How long a terminal process waits for the agent to own its pty slave to it.
const TTY_OWNER_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct VesselExecutor {
    inner: Box<dyn Executor>,
    container_id: String,
    bundle: PathBuf,
    start_hooks: Vec<Hook>,
    report_fd: Option<RawFd>,
}

impl VesselExecutor {
    pub fn new(
        container_id: String,
        bundle: PathBuf,
        start_hooks: Vec<Hook>,
        report_fd: Option<RawFd>,
    ) -> Self {
        VesselExecutor {
            inner: libcontainer::workload::default::get_executor(),
            container_id,
            bundle,
            start_hooks,
            report_fd,
        }
    }

    fn report(&self, msg: &str) {
        let Some(fd) = self.report_fd else { return };
        // SAFETY: the helper passed this fd for us alone; wrapping it in a
        // File that is forgotten afterwards leaves it open for exec's close.
        let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let bytes = msg.as_bytes();
        let _ = f.write_all(&bytes[..bytes.len().min(REPORT_CAP)]);
    }

    fn run_start_hooks(&self, spec: &Spec) -> Result<(), String> {
        if self.start_hooks.is_empty() {
            return Ok(());
        }
        let state = serde_json::json!({
            "ociVersion": spec.version(),
            "id": self.container_id,
            "status": "created",
            "pid": std::process::id(),
            "bundle": self.bundle,
            "annotations": spec.annotations().clone().unwrap_or_default(),
        })
        .to_string();
        for (i, hook) in self.start_hooks.iter().enumerate() {
            run_hook(hook, state.as_bytes()).map_err(|reason| {
                format!(
                    "error running startContainer hook #{i} ({}): {reason}",
                    hook.path().display()
                )
            })?;
        }
        Ok(())
    }
}

impl Executor for VesselExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            if seccomp::wants_enosys(seccomp) {
                let above = seccomp::highest_known() as u32;
                if let Err(e) = seccomp::load_enosys_filter(above) {
                    tracing::debug!("no ENOSYS filter above syscall {above}: {e}");
                }
            }
        }
        if let Err(msg) = self.run_start_hooks(spec) {
            self.report(&msg);
            return Err(ExecutorError::Other(msg));
        }
        wait_for_tty_owner(spec);
        self.inner.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        self.inner.validate(spec)
    }

    fn setup_envs(
        &self,
        envs: std::collections::HashMap<String, String>,
    ) -> Result<(), libcontainer::workload::ExecutorSetEnvsError> {
        self.inner.setup_envs(envs)
    }
}

/// Runs one hook with the state on stdin; its output (capped) goes into the
/// error, as runc reports it.
fn run_hook(hook: &Hook, state: &[u8]) -> Result<(), String> {
    let mut cmd = Command::new(hook.path());
    match hook.args().as_ref().and_then(|a| a.split_first()) {
        Some((arg0, rest)) => {
            cmd.arg0(arg0).args(rest);
        }
        None => {
            cmd.arg0(hook.path());
        }
    }
    // Without its own env a hook gets the process's (set up by now).
    if let Some(env) = hook.env() {
        cmd.env_clear();
        for e in env {
            if let Some((k, v)) = e.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    let output = memfd();
    let pair = output
        .as_ref()
        .and_then(|f| Some((f.try_clone().ok()?, f.try_clone().ok()?)));
    let (out, err) = match pair {
        Some((o, e)) => (Stdio::from(o), Stdio::from(e)),
        None => (Stdio::null(), Stdio::null()),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin closes it: not an error.
        let _ = stdin.write_all(state);
    }
    let status = match hook.timeout().filter(|t| *t > 0) {
        None => child.wait().map_err(|e| format!("wait: {e}"))?,
        Some(secs) => {
            let deadline = Instant::now() + Duration::from_secs(secs as u64);
            loop {
                if let Some(s) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
                    break s;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("timed out after {secs}s"));
                }
                // Hooks are rare and short; a coarse poll keeps this simple.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut reason = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!(
            "signal: {}{}",
            signal_description(sig),
            if status.core_dumped() {
                " (core dumped)"
            } else {
                ""
            }
        ),
        _ => status.to_string(),
    };
    if let Some(text) = output.and_then(read_capped) {
        if !text.trim().is_empty() {
            reason.push_str(&format!(", output: {}", text.trim()));
        }
    }
    Err(reason)
}

/// A memory file for a hook's output, or None where the profile denies
/// memfd_create (the output is then dropped).
fn memfd() -> Option<std::fs::File> {
    // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"hook-output".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: a fresh fd that nothing else owns.
    (fd >= 0).then(|| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn read_capped(mut f: std::fs::File) -> Option<String> {
    use std::io::{Read, Seek};
    f.rewind().ok()?;
    let mut buf = Vec::new();
    f.take(REPORT_CAP as u64).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// "bad system call" for SIGSYS: the C library's description, in lower
/// case as Go (runc) prints it, or the number.
fn signal_description(sig: i32) -> String {
    // SAFETY: strsignal returns a NUL-terminated string (static or in a
    // per-thread buffer) that stays valid until the next call; it is copied
    // before anything else runs on this thread.
    let p = unsafe { libc::strsignal(sig) };
    if p.is_null() {
        return format!("signal {sig}");
    }
    // SAFETY: non-null, NUL-terminated, valid until the copy below ends.
    let s = unsafe { std::ffi::CStr::from_ptr(p) };
    s.to_string_lossy().to_lowercase()
}

/// For a terminal process of a user other than root: waits (briefly) until
/// its stdin, the pty slave, belongs to it. The agent hands it over when it
/// receives the master; this keeps the payload from seeing root's slave.
fn wait_for_tty_owner(spec: &Spec) {
    let Some(p) = spec.process().as_ref() else {
        return;
    };
    let uid = nix::unistd::getuid().as_raw();
    if !p.terminal().unwrap_or(false) || uid == 0 {
        return;
    }
    let deadline = Instant::now() + TTY_OWNER_WAIT;
    while Instant::now() < deadline {
        match nix::sys::stat::fstat(0) {
            Ok(st) if st.st_uid != uid => std::thread::sleep(Duration::from_millis(1)),
            _ => return,
        }
    }
    tracing::warn!("the terminal still belongs to another user after {TTY_OWNER_WAIT:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_hook_gets_the_state_and_its_failures_say_why() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("state");
        let ok = hook(&format!(
            r#"{{"path": "/bin/sh", "args": ["sh", "-c", "cat > {}"]}}"#,
            out.display()
        ));
        run_hook(&ok, br#"{"id":"c1"}"#).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), r#"{"id":"c1"}"#);
        let code = hook(r#"{"path": "/bin/sh", "args": ["sh", "-c", "echo oops >&2; exit 3"]}"#);
        assert_eq!(
            run_hook(&code, b"{}").unwrap_err(),
            "exit status 3, output: oops"
        );
        let killed = hook(r#"{"path": "/bin/sh", "args": ["sh", "-c", "kill -SYS $$"]}"#);
        let err = run_hook(&killed, b"{}").unwrap_err();
        assert!(err.starts_with("signal: bad system call"), "{err}");
        let slow = hook(r#"{"path": "/bin/sleep", "args": ["sleep", "100"], "timeout": 1}"#);
        assert_eq!(run_hook(&slow, b"{}").unwrap_err(), "timed out after 1s");
        let missing = hook(r#"{"path": "/no/such/hook"}"#);
        assert!(run_hook(&missing, b"{}")
            .unwrap_err()
            .starts_with("start: "));
    }
}
