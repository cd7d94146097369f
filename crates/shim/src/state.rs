//! What the shim knows about its pod: containers, their processes and exits.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_shim::api::Status as TaskStatus;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use ttrpc::{Code, Result as TtrpcResult};
use vessel_runtime::container::Status;

use crate::error::err;
use crate::pod::Pod;
use crate::stdio::{Relays, StdioPaths};

#[derive(Debug, Clone)]
pub struct Exit {
    pub status: u32,
    pub at: Timestamp,
}

pub struct Process {
    pub pid: u32,
    pub paused: bool,
    pub started: bool,
    pub stdio: StdioPaths,
    /// OCI `process` JSON of an exec (empty for the init process).
    pub process_json: Vec<u8>,
    pub relays: Arc<Mutex<Relays>>,
    pub exit: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(stdio: StdioPaths, process_json: Vec<u8>) -> Self {
        Process {
            pid: 0,
            paused: false,
            started: false,
            stdio,
            process_json,
            relays: Arc::default(),
            exit: watch::channel(None).0,
        }
    }

    pub fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    pub fn status(&self) -> Status {
        match (self.exited(), self.started, self.paused) {
            (Some(_), _, _) => Status::Stopped,
            (None, false, _) => Status::Created,
            (None, true, true) => Status::Paused,
            (None, true, false) => Status::Running,
        }
    }
}

/// A process status as containerd's task API names it.
pub fn task_status(s: Status) -> TaskStatus {
    match s {
        Status::Creating | Status::Created => TaskStatus::CREATED,
        Status::Running => TaskStatus::RUNNING,
        Status::Paused => TaskStatus::PAUSED,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

pub struct Container {
    pub bundle: String,
    /// containerd's rootfs mounts are mounted at `<bundle>/rootfs`.
    pub rootfs_mounted: bool,
    pub init: Process,
    pub execs: HashMap<String, Process>,
}

#[derive(Default)]
pub struct State {
    pub pod: Option<Pod>,
    /// Tasks that need the pod's VM (death watcher, OOM loop).
    pub pod_tasks: Vec<JoinHandle<()>>,
    pub containers: HashMap<String, Container>,
}

impl State {
    pub fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    pub fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<&Process> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(&c.init);
        }
        c.execs
            .get(exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {id} not found")))
    }

    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> TtrpcResult<&mut Process> {
        let c = self
            .containers
            .get_mut(id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))?;
        if exec_id.is_empty() {
            return Ok(&mut c.init);
        }
        c.execs
            .get_mut(exec_id)
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of {id} not found")))
    }

    pub fn pod(&self) -> TtrpcResult<&Pod> {
        self.pod
            .as_ref()
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }
}
