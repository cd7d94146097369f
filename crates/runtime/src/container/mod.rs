//! Containers: one per sandbox VM, driven through the runc-compatible CLI.
//!
//! Layout of `<root>/<id>/`: `state.json` (written under the container's lock,
//! `<root>/.locks/<id>`, by the CLI), `exit` (written once by the supervisor
//! when init exits), `supervisor.sock`, `shared/` (virtio-fs staging, see [`share`]) and, when
//! the path is short enough for Unix sockets, `vm/` (the sandbox run dir).
//!
//! - [`status`]: the state machine; [`state`]: state.json; [`lock`]: flock.
//! - [`bundle`]: config.json checks and VM sizing; [`share`]: rootfs sharing.
//! - [`stdio`], [`console`]: relays (the agent client is [`crate::agent`]).
//! - [`supervisor`]: the per-container process that owns the VM (a pod of
//!   one); [`create`]: launches it; [`ops`]: the other OCI operations, which
//!   reach the pod through the supervisor's [`control`] socket; [`hooks`].

pub mod bundle;
pub mod console;
pub mod control;
pub mod create;
pub mod hooks;
pub mod lock;
pub mod ops;
pub mod share;
pub mod sockpath;
pub mod state;
pub mod status;
pub mod stdio;
pub mod supervisor;

use std::path::{Path, PathBuf};

pub use crate::agent::{AgentClient, NewContainer};
pub use bundle::Bundle;
pub use lock::ContainerLock;
pub use state::State;
pub use status::Status;

/// Container errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ContainerError {
    /// container {0} does not exist
    NotFound(String),
    /// container {0} already exists
    Exists(String),
    /// container: {0}
    InvalidId(vessel_protocol::id::InvalidId),
    /// bad bundle {bundle}: {reason}
    BadBundle { bundle: String, reason: String },
    /// container {id} is {status}: cannot {op}
    WrongState {
        id: String,
        status: Status,
        op: &'static str,
    },
    /// state file {path} is corrupt: {reason}
    BadState { path: String, reason: String },
    /// {path}
    Io {
        path: String,
        source: std::io::Error,
    },
    /// {what} {path}
    Mount {
        what: String,
        path: String,
        source: nix::Error,
    },
    /// {0} is still mounted; refusing to remove it
    StillMounted(String),
    /// staging the share
    Staging(#[source] crate::beneath::BeneathError),
    /// agent
    Agent(#[from] crate::agent::AgentError),
    /// console: {0}
    Console(String),
    /// sandbox
    Sandbox(#[source] Box<crate::Error>),
    /// pod
    Pod(#[source] Box<crate::pod::PodError>),
    /// supervisor: {0}
    Supervisor(String),
    /// error running {kind} hook #{index} ({path}): {reason}
    Hook {
        kind: String,
        index: usize,
        path: String,
        reason: String,
    },
    /// container {id} does not run on the vsock channel; set channel = "vsock"
    NeedsVsock { id: String },
    /// network: {0}
    Network(String),
}

impl ContainerError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ContainerError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl From<crate::Error> for ContainerError {
    fn from(e: crate::Error) -> Self {
        ContainerError::Sandbox(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, ContainerError>;

/// Name of the file holding init's exit status.
pub const EXIT_FILE: &str = "exit";
/// Name of the supervisor's control socket.
pub const CONTROL_SOCKET: &str = "supervisor.sock";
/// Name of the file counting the OOM kills the supervisor saw.
pub const OOM_FILE: &str = "oom";

/// Checks a container id against the one id rule ([`vessel_protocol::id`]):
/// it becomes a directory and a guest id.
pub fn validate_id(id: &str) -> Result<()> {
    vessel_protocol::id::check_id(id).map_err(ContainerError::InvalidId)
}

/// `<root>/<id>`, after checking the id.
pub fn container_dir(root: &Path, id: &str) -> Result<PathBuf> {
    validate_id(id)?;
    Ok(root.join(id))
}

/// Where the sandbox of `dir` keeps its run directory: `(state_root, vm id)`
/// for [`crate::Sandbox::boot`]. The VM id is a hash of `dir`, unique on the
/// host: the jailer names the VM's jail and cgroup after it (a fixed name made
/// two jailed containers collide). The run directory is `<dir>/<vm id>` when its
/// sockets fit in `sun_path`, else under /run/vessel-vm.
/// Where a VM's run directory goes when the container directory's path is too long
/// for its sockets ([`vm_location`]).
pub const VM_ROOT_FALLBACK: &str = "/run/vessel-vm";

pub fn vm_location(dir: &Path) -> (PathBuf, String) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let id = format!("{:016x}", h.finish());
    // Longest socket below the run dir: "/vsock.sock_1025" plus virtiofsd's.
    if dir.join(&id).join("virtiofsd-0.sock.pid").as_os_str().len() <= 100 {
        return (dir.to_path_buf(), id);
    }
    (PathBuf::from(VM_ROOT_FALLBACK), id)
}

/// Reads init's exit status recorded by the supervisor, if any.
pub fn read_exit(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(EXIT_FILE)).ok()?;
    text.trim().parse().ok()
}

/// An existing container, locked for the duration of one operation.
pub struct Container {
    pub dir: PathBuf,
    pub state: State,
    _lock: ContainerLock,
}

impl Container {
    /// Locks and loads container `id` under `root`.
    pub fn open(root: &Path, id: &str) -> Result<Container> {
        let dir = container_dir(root, id)?;
        let lock = ContainerLock::acquire(root, id)?;
        if !dir.is_dir() {
            // Deleted (or never created): leave no lock file behind either.
            lock.remove();
            return Err(ContainerError::NotFound(id.to_string()));
        }
        let mut state = State::load(&dir, id)?;
        if state.exit_status.is_none() {
            state.exit_status = read_exit(&dir);
        }
        Ok(Container {
            dir,
            state,
            _lock: lock,
        })
    }

    /// Loads container `id` WITHOUT the lock, for read-only commands (`state`,
    /// `list`) that must not wait for a `create` that is still booting.
    /// state.json is replaced atomically, so the read is consistent.
    pub fn peek(root: &Path, id: &str) -> Result<State> {
        let dir = container_dir(root, id)?;
        let mut state = State::load(&dir, id)?;
        if state.exit_status.is_none() {
            state.exit_status = read_exit(&dir);
        }
        Ok(state)
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    pub fn status(&self) -> Status {
        self.state.refreshed_status()
    }

    /// Fails with `WrongState` unless `ok(status)`.
    pub fn require(&self, op: &'static str, ok: fn(Status) -> bool) -> Result<()> {
        let status = self.status();
        if ok(status) {
            Ok(())
        } else {
            Err(ContainerError::WrongState {
                id: self.id().to_string(),
                status,
                op,
            })
        }
    }

    pub fn save(&self) -> Result<()> {
        self.state.save(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_vm_location() {
        for (id, ok) in vessel_protocol::id::test_cases() {
            assert_eq!(validate_id(&id).is_ok(), ok, "{id:?}");
        }
        let (root, id) = vm_location(Path::new("/run/vessel/c1"));
        assert_eq!(root.as_path(), Path::new("/run/vessel/c1"));
        assert_eq!(id.len(), 16);
        // Unique per container directory: jails and cgroups are named after it.
        assert_ne!(vm_location(Path::new("/run/vessel/c2")).1, id);
        let long = PathBuf::from("/run/containerd/runc/default").join("y".repeat(64));
        let (root, id) = vm_location(&long);
        assert_eq!(root, Path::new("/run/vessel-vm"));
        assert_eq!(id.len(), 16);
    }
}
