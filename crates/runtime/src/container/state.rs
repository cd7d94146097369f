//! Persistent container state: `<root>/<id>/state.json`.
//!
//! Written atomically (temp file + rename) under the container lock. The
//! supervisor's pid and start time identify a live container; when the
//! supervisor has gone the container is stopped, whatever the file says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ContainerError, Result, Status};

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub id: String,
    pub bundle: PathBuf,
    /// Host path of the bundle's rootfs.
    pub rootfs: PathBuf,
    pub status: Status,
    /// Pid of the supervisor (the pid runc callers see); 0 before it runs.
    pub pid: u32,
    /// Start time of `pid` (field 22 of /proc/<pid>/stat), against pid reuse.
    pub pid_start_time: u64,
    /// Guest pid of the init process.
    pub guest_pid: u32,
    /// RFC 3339 creation time.
    pub created: String,
    pub annotations: BTreeMap<String, String>,
    /// Init's exit status (shell convention) once known.
    pub exit_status: Option<i32>,
    /// The sandbox VM's run directory (sockets, logs).
    pub vm_dir: PathBuf,
    /// Directory for the sandbox's `Config::state_root` (the parent of vm_dir).
    pub vm_root: PathBuf,
    /// Exec ids in use, for `exec`.
    #[serde(default)]
    pub execs: Vec<String>,
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path, id: &str) -> Result<State> {
        let path = Self::path(dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ContainerError::NotFound(id.to_string()))
            }
            Err(source) => return Err(ContainerError::io(&path, source)),
        };
        serde_json::from_slice(&text).map_err(|e| ContainerError::BadState {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(".state.json.tmp");
        let json = serde_json::to_vec_pretty(self).expect("state serializes");
        std::fs::write(&tmp, json).map_err(|e| ContainerError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ContainerError::io(&path, e))
    }

    /// Whether the supervisor recorded in the state still runs.
    pub fn supervisor_alive(&self) -> bool {
        self.pid != 0 && process_start_time(self.pid) == Some(self.pid_start_time)
    }

    /// The status with the supervisor's liveness folded in.
    pub fn refreshed_status(&self) -> Status {
        match self.status {
            Status::Creating | Status::Stopped => self.status,
            _ if self.exit_status.is_some() || !self.supervisor_alive() => Status::Stopped,
            s => s,
        }
    }

    /// The OCI state (`runc state` output), with runc's extra fields.
    pub fn oci(&self) -> serde_json::Value {
        serde_json::to_value(self.oci_state()).expect("the OCI state serializes")
    }

    /// [`State::oci`] as a struct: its fields serialize in runc's order.
    pub fn oci_state(&self) -> OciState {
        let status = self.refreshed_status();
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        OciState {
            oci_version: "1.0.2",
            id: self.id.clone(),
            pid,
            status,
            bundle: self.bundle.clone(),
            rootfs: self.rootfs.clone(),
            created: self.created.clone(),
            annotations: self.annotations.clone(),
            owner: owner_name(),
        }
    }
}

/// The OCI state with runc's extra fields (`rootfs`, `created`, `owner`),
/// in runc's field order; `annotations` only when there are some.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: &'static str,
    pub id: String,
    pub pid: u32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub owner: String,
}

/// runc's `owner`: the name of the user that runs the runtime (its state is
/// that user's), or the uid when it has no name.
fn owner_name() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

/// Start time of a live, non-zombie process, in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Current time as RFC 3339 UTC with nanoseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mut s = State {
            id: "c1".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            status: Status::Running,
            pid: me,
            pid_start_time: process_start_time(me).unwrap(),
            guest_pid: 1,
            created: now_rfc3339(),
            annotations: BTreeMap::new(),
            exit_status: None,
            vm_dir: "/v".into(),
            vm_root: "/".into(),
            execs: vec![],
        };
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path(), "c1").unwrap(), s);
        assert_eq!(s.refreshed_status(), Status::Running);
        assert_eq!(s.oci()["pid"], me);
        s.pid_start_time += 1;
        assert_eq!(s.refreshed_status(), Status::Stopped);
        assert_eq!(s.oci()["pid"], 0);
        assert!(matches!(
            State::load(&dir.path().join("x"), "x"),
            Err(ContainerError::NotFound(_))
        ));
        std::fs::write(State::path(dir.path()), b"{").unwrap();
        assert!(matches!(
            State::load(dir.path(), "c1"),
            Err(ContainerError::BadState { .. })
        ));
    }
}
