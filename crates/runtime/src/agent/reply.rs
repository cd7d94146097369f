//! Validation of what the agent answers: everything read from the guest is untrusted.
//! Each function takes a decoded reply (or a line read from a stream) and returns what
//! the host may use, or [`AgentError::BadReply`]. The RPC methods call these after
//! ttrpc decoded the reply; the fuzz targets call them on arbitrary bytes.

use std::time::Duration;

use vessel_protocol::agent::{
    GuestMetricsResponse, ListProcessesResponse, OOMEvent, ProbeResponse, WaitProcessResponse,
};
use vessel_protocol::health::{CheckResponse, VersionResponse};
use vessel_protocol::ports::READY_MAGIC;
use vessel_protocol::stdio::REPLY_OK;

use super::{AgentError, ExitStatus, GuestProbe, Result, RpcFailure, PROBE_SAMPLE_LEN};

/// Longest readiness line accepted.
pub const MAX_READY_LINE: usize = 128;
/// Longest RPC status message kept from the guest.
pub const MAX_STATUS_MESSAGE: usize = 1024;
/// Most pids accepted from ListProcesses.
pub const MAX_PIDS: usize = 65_536;

/// A failed RPC. The guest is not trusted: a status message it sent is cut
/// to [`MAX_STATUS_MESSAGE`] characters and its control characters blanked.
pub fn rpc_error(rpc: &'static str, source: ttrpc::Error) -> AgentError {
    let source = match source {
        ttrpc::Error::RpcStatus(mut s) => {
            s.message = s
                .message
                .chars()
                .take(MAX_STATUS_MESSAGE)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            ttrpc::Error::RpcStatus(s)
        }
        other => other,
    };
    AgentError::Rpc {
        rpc,
        source: RpcFailure(source),
    }
}

/// The agent's `VESSEL-AGENT-READY <version>` line; returns the version.
pub fn ready_line(buf: &[u8]) -> Result<String> {
    if buf.len() > MAX_READY_LINE {
        return Err(AgentError::BadReady(format!(
            "longer than {MAX_READY_LINE} bytes"
        )));
    }
    let text = std::str::from_utf8(buf).map_err(|_| AgentError::BadReady("not UTF-8".into()))?;
    let line = text.strip_suffix('\n').unwrap_or(text);
    let version = line
        .strip_prefix(READY_MAGIC)
        .and_then(|rest| rest.strip_prefix(' '))
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| AgentError::BadReady(format!("{line:?}")))?;
    Ok(version.to_string())
}

/// A guest pid in a reply to `rpc`.
pub fn pid(rpc: &'static str, pid: u32) -> Result<u32> {
    if pid == 0 || pid > 4_194_304 {
        return Err(AgentError::BadReply {
            rpc,
            reason: format!("pid {pid}"),
        });
    }
    Ok(pid)
}

/// `WaitProcess`: an exit status in 0..=255, and a signal only as 128 + signal.
pub fn exit_status(r: &WaitProcessResponse) -> Result<ExitStatus> {
    let bad = |reason: String| AgentError::BadReply {
        rpc: "WaitProcess",
        reason,
    };
    if !(0..=255).contains(&r.exit_status) {
        return Err(bad(format!("exit status {} out of 0..=255", r.exit_status)));
    }
    let signal = match r.signal {
        0 => None,
        s if (1..=64).contains(&s) && r.exit_status == 128 + s as i32 => Some(s),
        s => {
            return Err(bad(format!(
                "signal {s} with exit status {}",
                r.exit_status
            )))
        }
    };
    Ok(ExitStatus {
        status: r.exit_status,
        signal,
    })
}

/// `ListProcesses`: at most [`MAX_PIDS`] pids.
pub fn pids(r: ListProcessesResponse) -> Result<Vec<u32>> {
    if r.pids.len() > MAX_PIDS {
        return Err(AgentError::BadReply {
            rpc: "ListProcesses",
            reason: format!("{} pids", r.pids.len()),
        });
    }
    Ok(r.pids)
}

/// `GetOOMEvent`: a valid container id.
pub fn oom_event(r: OOMEvent) -> Result<String> {
    if !vessel_protocol::id::valid_id(&r.container_id) {
        return Err(AgentError::BadReply {
            rpc: "GetOOMEvent",
            reason: "invalid container id".into(),
        });
    }
    Ok(r.container_id)
}

/// `Agent.Probe`: a clock after the epoch, a sample of the right size, a printable boot id.
pub fn probe(p: ProbeResponse) -> Result<GuestProbe> {
    let bad = |reason: String| AgentError::BadReply {
        rpc: "Agent.Probe",
        reason,
    };
    if p.realtime_seconds < 0 || p.realtime_nanos >= 1_000_000_000 {
        return Err(bad(format!(
            "clock {}.{:09} out of range",
            p.realtime_seconds, p.realtime_nanos
        )));
    }
    let random_sample: [u8; PROBE_SAMPLE_LEN] =
        p.random_sample.as_slice().try_into().map_err(|_| {
            bad(format!(
                "random sample of {} bytes, expected {PROBE_SAMPLE_LEN}",
                p.random_sample.len()
            ))
        })?;
    if p.boot_id.is_empty()
        || p.boot_id.len() > 64
        || !p.boot_id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad(format!("boot_id {:?} is not printable", p.boot_id)));
    }
    Ok(GuestProbe {
        realtime: std::time::UNIX_EPOCH
            + Duration::new(p.realtime_seconds as u64, p.realtime_nanos),
        random_sample,
        boot_id: p.boot_id,
    })
}

/// Most interfaces, and most disks, kept from a `GuestMetrics` reply.
pub const MAX_GUEST_DEVICES: usize = 16;
/// Longest interface or disk name kept from a `GuestMetrics` reply.
pub const MAX_GUEST_DEVICE_NAME: usize = 32;

/// Whether a guest device name may become a metric label: short, `[A-Za-z0-9._:@-]`.
pub fn device_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_GUEST_DEVICE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// `Agent.GuestMetrics`: the first [`MAX_GUEST_DEVICES`] interfaces and disks whose
/// names pass [`device_name_ok`], each name once; everything else (and unknown fields)
/// dropped. Numbers are taken as they are: they only ever become sample values.
pub fn guest_metrics(mut r: GuestMetricsResponse) -> GuestMetricsResponse {
    fn keep<T>(items: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
        let mut seen = std::collections::HashSet::new();
        items
            .into_iter()
            .filter(|i| device_name_ok(name(i)) && seen.insert(name(i).to_string()))
            .take(MAX_GUEST_DEVICES)
            .collect()
    }
    let mut net = keep(std::mem::take(&mut r.net), |n| &n.name);
    net.iter_mut()
        .for_each(|n| n.special_fields = Default::default());
    let mut disks = keep(std::mem::take(&mut r.disks), |d| &d.name);
    disks
        .iter_mut()
        .for_each(|d| d.special_fields = Default::default());
    if let Some(m) = r.memory.as_mut() {
        m.special_fields = Default::default();
    }
    if let Some(c) = r.cpu.as_mut() {
        c.special_fields = Default::default();
    }
    if let Some(l) = r.load.as_mut() {
        l.special_fields = Default::default();
    }
    GuestMetricsResponse {
        memory: r.memory,
        cpu: r.cpu,
        load: r.load,
        net,
        disks,
        ..Default::default()
    }
}

/// `Health.Check`: serving.
pub fn health(r: &CheckResponse) -> Result<()> {
    use vessel_protocol::health::check_response::ServingStatus;
    match r.status.enum_value() {
        Ok(ServingStatus::SERVING) => Ok(()),
        other => Err(AgentError::BadReply {
            rpc: "Health.Check",
            reason: format!("status {other:?}"),
        }),
    }
}

/// `Health.Version`: printable strings and this runtime's protocol version.
pub fn version(v: VersionResponse) -> Result<VersionResponse> {
    let bad = |reason: String| AgentError::BadReply {
        rpc: "Health.Version",
        reason,
    };
    for (name, value) in [
        ("agent_version", &v.agent_version),
        ("kernel_release", &v.kernel_release),
        ("boot_id", &v.boot_id),
    ] {
        if value.is_empty() || value.len() > 128 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(format!(
                "{name} {value:?} is empty, too long or not printable"
            )));
        }
    }
    if v.protocol_version != vessel_protocol::PROTOCOL_VERSION {
        return Err(bad(format!(
            "agent speaks protocol {}, this runtime {}: rebuild the guest initramfs",
            v.protocol_version,
            vessel_protocol::PROTOCOL_VERSION
        )));
    }
    Ok(v)
}

/// The agent's answer to a stdio stream header (`what` names the stream): `OK` or a
/// refusal, whose text is kept without control characters.
pub fn stdio_reply(line: &[u8], what: String) -> Result<()> {
    if line == REPLY_OK.as_bytes() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(line);
    let text: String = text
        .trim_end()
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    Err(AgentError::Stdio {
        what,
        reason: format!("agent refused: {text}"),
    })
}
