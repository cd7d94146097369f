//! A pod's background work: the VM watcher (every live process reported
//! exited when the VM dies), the OOM loop, the guest events loop and the
//! metrics socket.

use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};

use super::{Containers, Exit, Pod, PodEvent, EVENTS_WAIT, LOST_EXIT_STATUS};

/// Lines of a dead VM's console log searched for a kernel crash (an oops report is
/// 30-60 lines; the crash line comes first).
const CONSOLE_CRASH_LINES: usize = 80;
use crate::agent::AgentClient;
use crate::metrics::{self, MetricsServer};

/// Records an exit once and reports it; later calls are no-ops.
pub(super) fn record_exit(
    sender: &watch::Sender<Option<Exit>>,
    events: &mpsc::UnboundedSender<PodEvent>,
    container_id: &str,
    exec_id: Option<&str>,
    pid: u32,
    status: u32,
) {
    let exit = Exit {
        status,
        at: SystemTime::now(),
    };
    if sender.send_if_modified(|e| e.is_none() && e.replace(exit).is_none()) {
        let _ = events.send(PodEvent::Exit {
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
            pid,
            exit,
        });
    }
}

/// The VM died: every live process exited, status unknown. Init processes
/// are reported with the VMM's pid `host_pid` (see [`Pod::task_pid`]), in
/// [`death_order`].
fn vm_died(
    containers: &Mutex<Containers>,
    events: &mpsc::UnboundedSender<PodEvent>,
    pod_id: &str,
    host_pid: u32,
) {
    let containers = containers.lock().unwrap_or_else(|e| e.into_inner());
    let ids = containers
        .iter()
        .map(|(cid, c)| (cid.as_str(), c.execs.keys().map(String::as_str).collect()))
        .collect();
    for (cid, exec_id) in death_order(pod_id, ids) {
        let Some(c) = containers.get(cid) else {
            continue;
        };
        let (p, pid) = match exec_id {
            None => (&c.init, host_pid),
            Some(e) => match c.execs.get(e) {
                Some(p) => (p, p.pid),
                None => continue,
            },
        };
        record_exit(&p.exit, events, cid, exec_id, pid, LOST_EXIT_STATUS);
    }
}

/// The order a dead VM's processes are reported exited in: every exec first,
/// then the containers' init processes, and the pod's own container (the CRI
/// sandbox, whose id is the pod's) last, as when a pod stops in order. A
/// client handles the sandbox's exit by tearing the pod down (containerd's
/// CRI plugin deletes the sandbox task, one event at a time): its containers'
/// exits must not wait behind that.
fn death_order<'a>(
    pod_id: &str,
    mut containers: Vec<(&'a str, Vec<&'a str>)>,
) -> Vec<(&'a str, Option<&'a str>)> {
    containers.sort_by_key(|(cid, _)| (*cid == pod_id, *cid));
    let execs = containers
        .iter()
        .flat_map(|(cid, execs)| execs.iter().map(move |e| (*cid, Some(*e))));
    let inits = containers.iter().map(|(cid, _)| (*cid, None));
    execs.chain(inits).collect()
}

/// Forwards the guest's log lines and security events as [`PodEvent`]s,
/// within the rate limits, until the agent stops answering.
async fn guest_events_loop(
    agent: AgentClient,
    events: mpsc::UnboundedSender<PodEvent>,
    pod_id: String,
    security: metrics::SecurityEvents,
) {
    use crate::guest_events::{InstanceWatch, RateLimit, EVENT_RATE, LOG_RATE};
    let (mut logs_rl, mut events_rl) = (RateLimit::new(LOG_RATE), RateLimit::new(EVENT_RATE));
    let mut instance = InstanceWatch::default();
    let (mut dropped_logs, mut dropped_events) = (0u64, 0u64);
    loop {
        let batch = match agent.events(EVENTS_WAIT).await {
            Ok(b) => b,
            Err(e) => {
                log::debug!("pod {pod_id}: guest events loop ends: {e}");
                return;
            }
        };
        if let Some(e) = instance.check(&batch.instance) {
            security.count(&e);
            let _ = events.send(PodEvent::Security {
                sandbox: pod_id.clone(),
                event: e,
            });
        }
        let now = std::time::Instant::now();
        for line in logs_rl.admit(batch.logs, now) {
            let sandbox = pod_id.clone();
            let _ = events.send(PodEvent::GuestLog { sandbox, line });
        }
        for event in events_rl.admit(batch.events, now) {
            security.count(&event);
            let sandbox = pod_id.clone();
            let _ = events.send(PodEvent::Security { sandbox, event });
        }
        let refused = (logs_rl.take_refused(), events_rl.take_refused());
        if refused != (0, 0) {
            log::warn!(
                "pod {pod_id}: the guest exceeds its log rate limits: dropped {} log lines and {} events",
                refused.0,
                refused.1
            );
        }
        if batch.dropped_logs > dropped_logs || batch.dropped_events > dropped_events {
            log::warn!(
                "pod {pod_id}: the agent dropped {} log lines and {} events so far (its queues were full)",
                batch.dropped_logs,
                batch.dropped_events
            );
            (dropped_logs, dropped_events) = (batch.dropped_logs, batch.dropped_events);
        }
    }
}

impl Pod {
    /// Starts the VM watcher (fan-out of exits when it dies), the OOM loop
    /// and the guest events loop.
    pub(super) fn watch(&mut self) {
        let (sandbox, containers, events) = (
            self.sandbox.clone(),
            self.containers.clone(),
            self.events.clone(),
        );
        let (id, host_pid) = (self.id.clone(), self.host_pid());
        let security = self.security.clone();
        self.tasks.push(tokio::spawn(async move {
            let exit = sandbox.vm().wait().await;
            log::error!("pod {id}: the VM exited unexpectedly ({exit}); its processes are lost");
            // A guest kernel that oopsed panics and ends the VM, as does the agent's
            // exit (it is PID 1): the console says which.
            let console = sandbox.console_log();
            let tail = tokio::task::spawn_blocking(move || {
                vessel_hypervisor::exit_log_tail(&console, CONSOLE_CRASH_LINES)
            })
            .await
            .unwrap_or_default();
            if let Some(event) = crate::guest_events::console_crash(&tail) {
                log::error!(
                    "pod {id}: the guest console shows why the VM ended ({:?}): {}",
                    event.kind,
                    event.detail
                );
                security.count(&event);
                let _ = events.send(PodEvent::Security {
                    sandbox: id.clone(),
                    event,
                });
            }
            vm_died(&containers, &events, &id, host_pid);
            let _ = events.send(PodEvent::VmExited);
        }));
        let (agent, events) = (self.agent.clone(), self.events.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                match agent.oom_event().await {
                    Ok(container_id) => {
                        log::info!("OOM kill in {container_id}");
                        let _ = events.send(PodEvent::Oom { container_id });
                    }
                    Err(e) => {
                        log::debug!("OOM event loop ends: {e}");
                        return;
                    }
                }
            }
        }));
        let (agent, events, id) = (self.agent.clone(), self.events.clone(), self.id.clone());
        let security = self.security.clone();
        self.tasks
            .push(tokio::spawn(guest_events_loop(agent, events, id, security)));
    }

    /// Serves the pod's metrics socket. A socket that cannot be bound costs the
    /// pod its metrics only (logged).
    pub(super) fn serve_metrics(&mut self, backend: &'static str) {
        let containers = self.containers.clone();
        let source = metrics::Source {
            id: self.id.clone(),
            backend,
            sandbox: self.sandbox.clone(),
            containers: Box::new(move || {
                let containers = containers.lock().unwrap_or_else(|e| e.into_inner());
                containers
                    .iter()
                    .filter(|(_, c)| c.init.exited().is_none())
                    .map(|(id, _)| id.clone())
                    .collect()
            }),
            guest: Default::default(),
            security: self.security.clone(),
        };
        match MetricsServer::start(source) {
            Ok(m) => self.metrics = Some(m),
            Err(e) => log::warn!("pod {}: no metrics socket: {e}", self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::death_order;

    #[test]
    fn a_dead_vm_reports_execs_then_containers_then_the_sandbox() {
        let order = death_order(
            "pod",
            vec![("pod", vec!["p1"]), ("b", vec![]), ("a", vec!["a1", "a2"])],
        );
        let (execs, inits) = order.split_at(3);
        assert!(execs.iter().all(|(_, e)| e.is_some()), "{order:?}");
        assert_eq!(inits, [("a", None), ("b", None), ("pod", None)]);
        // A pod whose id names none of its containers (vessel run, ctr run): all reported.
        assert_eq!(death_order("x", vec![("c", vec![])]), [("c", None)]);
    }
}
