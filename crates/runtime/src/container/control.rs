//! The supervisor's control socket (`<dir>/supervisor.sock`): every OCI
//! operation on a live container (start, kill, pause, resume, ps, stats,
//! exec, shutdown) goes through it to the supervisor's [`Pod`], so that the
//! pod's status guards and its one agent client are the only path. One JSON
//! request line, one JSON reply line; an exec gets a second reply line when
//! it exits.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;
use vessel_protocol::agent::StatsContainerResponse;

use super::{Status, CONTROL_SOCKET};
use crate::pod::{Pod, PodError, Stdio};

/// Longest request, and longest reply stream, read from a control connection.
const MAX_LINE: u64 = 1 << 20;
/// How long the supervisor waits for a request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A request (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    /// Start the container's init (`vessel start`).
    Start,
    /// Stop the VM now; the container ends with status 137.
    Shutdown,
    Kill {
        signal: u32,
        all: bool,
    },
    Pause,
    Resume,
    /// Guest pids of the container's processes.
    Processes,
    /// runc's stats object (`events --stats` data).
    Stats,
    /// Window size of the terminal of init (`exec_id` None) or an exec.
    Resize {
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    /// New OCI `linux.resources` for the container's cgroup in the guest.
    Update {
        resources: Value,
    },
    /// Start an OCI `process` in the running container; the caller relays
    /// its stdio streams (all three, or the tty).
    Exec {
        exec_id: String,
        process: Value,
        terminal: bool,
    },
}

/// A reply (one JSON line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    Done,
    /// An exec started: its guest pid. Its [`Reply::Exited`] follows.
    Started {
        pid: u32,
    },
    Pids {
        pids: Vec<u32>,
    },
    Stats {
        stats: Value,
    },
    /// Shell convention: code, or 128 + signal.
    Exited {
        status: i32,
    },
    /// The pod's status guard refused the operation in this status.
    Refused {
        status: Status,
    },
    Failed {
        error: String,
    },
}

/// A control connection after its request was answered.
pub struct Call {
    reader: BufReader<tokio::io::Take<OwnedReadHalf>>,
    _writer: tokio::net::unix::OwnedWriteHalf,
}

impl Call {
    /// Sends `req` to the supervisor of container directory `dir`; returns
    /// its reply (bounded by `timeout`) and the connection.
    pub async fn send(
        dir: &Path,
        req: &Request,
        timeout: Duration,
    ) -> std::io::Result<(Reply, Call)> {
        let path = dir.join(CONTROL_SOCKET);
        let exchange = async {
            let addr = super::sockpath::SocketPath::new(&path)?;
            let (rd, mut wr) = UnixStream::connect(addr.as_path()).await?.into_split();
            let mut line = serde_json::to_string(req).expect("a request serializes");
            line.push('\n');
            wr.write_all(line.as_bytes()).await?;
            let mut call = Call {
                reader: BufReader::new(rd.take(MAX_LINE)),
                _writer: wr,
            };
            Ok((call.next().await?, call))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply from the supervisor within {timeout:?}"),
            )),
        }
    }

    /// The next reply (an exec's exit: no timeout).
    pub async fn next(&mut self) -> std::io::Result<Reply> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// What serving one connection left to do.
pub enum Served<'a> {
    Done,
    /// The caller asked the supervisor to shut down.
    Shutdown,
    /// An exec started: this resolves once its exit was sent to the caller.
    Exec(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>),
}

/// Serves one connection for container `id` of `pod` (its state in `dir`):
/// reads a request, acts on the pod, replies.
pub async fn serve_one<'a>(conn: UnixStream, pod: &'a Pod, id: &'a str, dir: &Path) -> Served<'a> {
    let (rd, mut wr) = conn.into_split();
    let mut rd = BufReader::new(rd.take(MAX_LINE));
    let mut line = String::new();
    let req = match tokio::time::timeout(READ_TIMEOUT, rd.read_line(&mut line)).await {
        Ok(Ok(_)) => serde_json::from_str::<Request>(&line).map_err(|e| e.to_string()),
        _ => Err("no request".to_string()),
    };
    let reply = match &req {
        Ok(r) => reply(act(pod, id, dir, r).await),
        Err(e) => Reply::Failed { error: e.clone() },
    };
    let started = matches!(reply, Reply::Started { .. });
    if !write(&mut wr, &reply).await {
        log::debug!("{id}: the caller left before the reply");
    }
    match req {
        Ok(Request::Exec { exec_id, .. }) if started => Served::Exec(Box::pin(async move {
            let status = exec_exit(pod, id, &exec_id).await;
            write(&mut wr, &Reply::Exited { status }).await;
        })),
        Ok(Request::Shutdown) => Served::Shutdown,
        _ => Served::Done,
    }
}

async fn write(wr: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> bool {
    let mut out = serde_json::to_string(reply).expect("a reply serializes");
    out.push('\n');
    wr.write_all(out.as_bytes()).await.is_ok()
}

fn reply(r: crate::pod::Result<Reply>) -> Reply {
    match r {
        Ok(r) => r,
        Err(PodError::WrongState { status, .. }) => Reply::Refused { status },
        Err(e) => Reply::Failed {
            error: crate::chain(&e).to_string(),
        },
    }
}

/// Acts on the pod; the guards are the pod's ([`Pod::require`] where the
/// operation itself has none: the runc-compatible ones).
async fn act(pod: &Pod, id: &str, dir: &Path, req: &Request) -> crate::pod::Result<Reply> {
    let live = |s: Status| matches!(s, Status::Created | Status::Running | Status::Paused);
    Ok(match req {
        Request::Ping | Request::Shutdown => Reply::Done,
        Request::Start => {
            pod.start(id, None).await?;
            Reply::Done
        }
        Request::Kill { signal, all } => {
            pod.require(id, None, "kill", Status::can_kill)?;
            pod.kill(id, None, *signal, *all).await?;
            Reply::Done
        }
        Request::Pause => {
            pod.pause(id).await?;
            Reply::Done
        }
        Request::Resume => {
            pod.resume(id).await?;
            Reply::Done
        }
        Request::Processes => {
            pod.require(id, None, "list processes of", live)?;
            Reply::Pids {
                pids: pod.processes(id).await?,
            }
        }
        Request::Stats => {
            pod.require(id, None, "get stats of", |s| {
                matches!(s, Status::Running | Status::Paused)
            })?;
            let ooms = std::fs::read_to_string(dir.join(super::OOM_FILE))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            Reply::Stats {
                stats: runc_stats(&pod.stats(id).await?, ooms),
            }
        }
        Request::Resize {
            exec_id,
            rows,
            cols,
        } => {
            pod.resize(id, exec_id.as_deref(), *rows, *cols).await?;
            Reply::Done
        }
        Request::Update { resources } => {
            pod.require(id, None, "update", live)?;
            let json = serde_json::to_vec(resources).expect("a JSON value serializes");
            pod.update(id, json).await?;
            Reply::Done
        }
        Request::Exec {
            exec_id,
            process,
            terminal,
        } => {
            // runc execs into a created container too (the agent does).
            pod.require(id, None, "exec in", |s| {
                matches!(s, Status::Created | Status::Running)
            })?;
            let json = serde_json::to_vec(process).expect("a JSON value serializes");
            let stdio = Stdio::Caller {
                terminal: *terminal,
            };
            pod.add_exec(id, exec_id, json, stdio)?;
            match pod.start(id, Some(exec_id)).await {
                Ok(pid) => Reply::Started { pid },
                Err(e) => {
                    let _ = pod.delete(id, Some(exec_id)).await;
                    return Err(e);
                }
            }
        }
    })
}

/// Waits for an exec to exit, then forgets it.
async fn exec_exit(pod: &Pod, id: &str, exec_id: &str) -> i32 {
    let status = match pod.exit_watch(id, Some(exec_id)) {
        Ok(mut rx) => match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.map(|e| e.status),
            Err(_) => None,
        },
        Err(_) => None,
    };
    if let Err(e) = pod.delete(id, Some(exec_id)).await {
        log::debug!("{id}: forgetting exec {exec_id}: {e}");
    }
    status.unwrap_or(crate::pod::LOST_EXIT_STATUS) as i32
}

/// runc's stats object from the agent's; `ooms`: OOM kills the supervisor saw.
fn runc_stats(s: &StatsContainerResponse, ooms: u64) -> Value {
    let (m, cpu, pids) = (
        s.memory.clone().unwrap_or_default(),
        s.cpu.clone().unwrap_or_default(),
        s.pids.clone().unwrap_or_default(),
    );
    serde_json::json!({
        "cpu": {"usage": {"total": cpu.usage_usec * 1000, "user": cpu.user_usec * 1000, "kernel": cpu.system_usec * 1000},
                "throttling": {"throttledPeriods": cpu.nr_throttled, "throttledTime": cpu.throttled_usec * 1000}},
        "memory": {"usage": {"usage": m.usage_bytes, "limit": m.limit_bytes},
                   "raw": {"anon": m.anon_bytes, "file": m.file_bytes, "oom": m.oom_events, "oom_kill": m.oom_kill_events.max(ooms)}},
        "pids": {"current": pids.current, "limit": pids.limit},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_strict() {
        let kill: Request =
            serde_json::from_str(r#"{"op":"kill","signal":9,"all":false}"#).unwrap();
        assert_eq!(
            kill,
            Request::Kill {
                signal: 9,
                all: false
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"shutdown"}"#).unwrap(),
            Request::Shutdown
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"kill","signal":9,"all":false,"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        let refused = Reply::Refused {
            status: Status::Paused,
        };
        let text = serde_json::to_string(&refused).unwrap();
        assert_eq!(text, r#"{"reply":"refused","status":"paused"}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), refused);
    }
}
