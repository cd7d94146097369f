//! The container state machine (OCI runtime spec "Lifecycle").

use serde::{Deserialize, Serialize};

/// OCI container status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is still running.
    Creating,
    /// Created, init process waiting for `start`.
    Created,
    Running,
    Paused,
    /// Init exited (or the sandbox died).
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    pub fn can_start(self) -> bool {
        self == Status::Created
    }

    /// runc allows signals to created, running and paused containers.
    pub fn can_kill(self) -> bool {
        matches!(self, Status::Created | Status::Running | Status::Paused)
    }

    /// Without --force: stopped containers, created ones (never started;
    /// runc kills and deletes them too) and a create that failed half-way.
    pub fn can_delete(self) -> bool {
        matches!(self, Status::Stopped | Status::Created | Status::Creating)
    }

    pub fn can_exec(self) -> bool {
        self == Status::Running
    }

    pub fn can_pause(self) -> bool {
        self == Status::Running
    }

    pub fn can_resume(self) -> bool {
        self == Status::Paused
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards() {
        use Status::*;
        assert!(Created.can_start() && !Running.can_start() && !Stopped.can_start());
        assert!(Created.can_kill() && Running.can_kill() && Paused.can_kill());
        assert!(!Stopped.can_kill());
        assert!(Stopped.can_delete() && Created.can_delete() && !Running.can_delete());
        assert!(!Paused.can_delete());
        assert!(Running.can_pause() && !Paused.can_pause() && Paused.can_resume());
        assert!(Running.can_exec() && !Created.can_exec());
        assert_eq!(serde_json::to_string(&Paused).unwrap(), "\"paused\"");
    }
}
