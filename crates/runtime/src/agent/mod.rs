//! The host-side client of vessel-agent: ONE client per sandbox, one
//! connection (cloned by every user), one timeout policy, one error type.
//!
//! - here: connecting, readiness, `Health` and the sandbox-wide `Agent` RPCs
//!   (clock, entropy, probe);
//! - [`container`]: the container RPCs and stdio streams.
//!
//! Everything read from the guest is untrusted: the readiness line and the
//! hybrid-vsock reply are length-bounded and parsed strictly; RPC replies are
//! protobuf-decoded by ttrpc and validated here.
//!
//! Timeouts: [`CONNECT_TIMEOUT`] for connecting and stream handshakes,
//! [`RPC_TIMEOUT`] for every RPC that does not block by design ([`TCG_RPC_TIMEOUT`] for a
//! sandbox's own client when its guest is emulated); `WaitProcess` and `GetOOMEvent`
//! block until their event.

pub mod container;
pub mod reply;

pub use container::{ExitStatus, NewContainer};

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use ttrpc::r#async::transport::Socket;
use vessel_hypervisor::AgentEndpoint;
use vessel_protocol::agent::{
    GuestMetricsRequest, GuestMetricsResponse, ProbeRequest, ReseedRandomRequest, SetPolicyRequest,
    SetTimeRequest,
};
use vessel_protocol::agent_ttrpc::AgentClient as AgentTtrpc;
use vessel_protocol::health::{CheckRequest, VersionRequest, VersionResponse};
use vessel_protocol::health_ttrpc::HealthClient;
use vessel_protocol::hybrid_vsock;
use vessel_protocol::ports::{AGENT_VSOCK_PORT, READY_VSOCK_PORT};

/// Timeout of every RPC that does not block by design.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// [`RPC_TIMEOUT`] for a guest under TCG, which runs 10-50 times slower than under KVM:
/// 20 pods starting at once on 2 cores saw CreateContainer and SetNetwork take over 30 s.
pub const TCG_RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout for connecting (hybrid-vsock handshake) and for a stdio stream's
/// header reply.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval for polling a Unix socket that the hypervisor has not created yet.
const CONNECT_POLL: Duration = Duration::from_millis(5);

/// Agent client errors.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AgentError {
    /// Cannot listen for agent readiness on {path}
    ReadyListen {
        path: String,
        source: std::io::Error,
    },
    /// Bad readiness message from the guest: {0}
    BadReady(String),
    /// Cannot connect to the agent at {path}
    Connect {
        path: String,
        source: std::io::Error,
    },
    /// Hybrid vsock handshake with the agent failed
    Handshake(#[from] hybrid_vsock::HandshakeError),
    /// Agent RPC {rpc} failed
    Rpc {
        rpc: &'static str,
        source: RpcFailure,
    },
    /// Agent reply to {rpc} is invalid: {reason}
    BadReply { rpc: &'static str, reason: String },
    /// {what}: {reason}
    Stdio { what: String, reason: String },
    /// Refusing to send {rpc}: {reason}
    BadRequest { rpc: &'static str, reason: String },
}

type Result<T> = std::result::Result<T, AgentError>;

/// The ttrpc error of a failed RPC. A status from the agent reads
/// `CODE: message` (`PERMISSION_DENIED: ExecProcess denied by ...`), not
/// ttrpc's debug dump of the status message.
#[derive(Debug)]
pub struct RpcFailure(pub ttrpc::Error);

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ttrpc::Error::RpcStatus(s) => write!(f, "{:?}: {}", s.code(), s.message),
            other => other.fmt(f),
        }
    }
}

impl std::error::Error for RpcFailure {}

impl From<ttrpc::Error> for RpcFailure {
    fn from(e: ttrpc::Error) -> Self {
        RpcFailure(e)
    }
}

use reply::rpc_error;

/// `<uds>_<port>`: where guest-initiated vsock connections arrive.
pub fn guest_initiated_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Listens for the agent's readiness connection (bind before the VM starts).
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    pub fn bind(uds: &Path) -> Result<Self> {
        let path = guest_initiated_path(uds, READY_VSOCK_PORT);
        let listener = UnixListener::bind(&path).map_err(|source| AgentError::ReadyListen {
            path: path.display().to_string(),
            source,
        })?;
        Ok(ReadyListener { listener, path })
    }

    /// Waits for the agent's `VESSEL-AGENT-READY <version>` line; returns the version.
    pub async fn wait(&self) -> Result<String> {
        let (mut conn, _) =
            self.listener
                .accept()
                .await
                .map_err(|source| AgentError::ReadyListen {
                    path: self.path.display().to_string(),
                    source,
                })?;
        let mut buf = Vec::with_capacity(64);
        let mut limited = (&mut conn).take(reply::MAX_READY_LINE as u64 + 1);
        limited
            .read_to_end(&mut buf)
            .await
            .map_err(|e| AgentError::BadReady(e.to_string()))?;
        reply::ready_line(&buf)
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Length of the RNG sample in a `Probe` reply.
pub const PROBE_SAMPLE_LEN: usize = 16;
/// Host entropy sent with `ReseedRandom` after a restore.
const RESEED_BYTES: usize = 64;

/// A connected agent: one connection per sandbox, shared by clones.
#[derive(Clone)]
pub struct AgentClient {
    health: HealthClient,
    agent: AgentTtrpc,
    /// Where stdio streams are opened (hybrid vsock only).
    endpoint: AgentEndpoint,
    /// Timeout of the RPCs that do not block by design.
    rpc_timeout: Duration,
    latency: crate::metrics::RpcLatency,
}

/// What `Agent.Probe` reports, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProbe {
    /// Guest wall clock.
    pub realtime: std::time::SystemTime,
    /// A fresh sample of the guest RNG.
    pub random_sample: [u8; PROBE_SAMPLE_LEN],
    pub boot_id: String,
}

impl AgentClient {
    /// Connects to the agent. For `Serial`, waits (up to `timeout`) for the
    /// hypervisor to create the socket.
    pub async fn connect(endpoint: &AgentEndpoint, timeout: Duration) -> Result<Self> {
        let stream = connect_socket(endpoint, AGENT_VSOCK_PORT, timeout).await?;
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        Ok(AgentClient {
            health: HealthClient::new(client.clone()),
            agent: AgentTtrpc::new(client),
            endpoint: endpoint.clone(),
            rpc_timeout: RPC_TIMEOUT,
            latency: Default::default(),
        })
    }

    /// The RPC timeout for a guest on `accelerator`: [`TCG_RPC_TIMEOUT`] under TCG.
    pub fn for_accelerator(mut self, accelerator: vessel_hypervisor::Accelerator) -> Self {
        self.rpc_timeout = match accelerator {
            vessel_hypervisor::Accelerator::Kvm => RPC_TIMEOUT,
            vessel_hypervisor::Accelerator::Tcg => TCG_RPC_TIMEOUT,
        };
        self
    }

    /// Connects to the agent of a running sandbox whose run directory is
    /// `run_dir` (see [`crate::sandbox::agent_socket`]).
    pub async fn connect_run_dir(run_dir: &Path) -> Result<Self> {
        let endpoint = AgentEndpoint::HybridVsock {
            uds: crate::sandbox::agent_socket(run_dir),
        };
        Self::connect(&endpoint, CONNECT_TIMEOUT).await
    }

    /// Sets the guest wall clock to the host's (after a restore the guest's
    /// clock is where it was when the snapshot was taken).
    pub async fn sync_clock(&self) -> Result<()> {
        self.set_clock(std::time::SystemTime::now()).await
    }

    /// Sets the guest wall clock to `time` (`Agent.SetTime`).
    pub async fn set_clock(&self, time: std::time::SystemTime) -> Result<()> {
        let now = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let req = SetTimeRequest {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos(),
            ..Default::default()
        };
        self.call("Agent.SetTime", self.agent.set_time(no_deadline(), &req))
            .await?;
        Ok(())
    }

    /// Mixes fresh host entropy into the guest RNG and reseeds it, so that
    /// clones of one snapshot never share RNG state.
    pub async fn reseed_random(&self) -> Result<()> {
        let mut data = vec![0u8; RESEED_BYTES];
        getrandom(&mut data).map_err(|e| AgentError::BadReply {
            rpc: "Agent.ReseedRandom",
            reason: format!("no host entropy: {e}"),
        })?;
        let req = ReseedRandomRequest {
            data,
            ..Default::default()
        };
        self.call(
            "Agent.ReseedRandom",
            self.agent.reseed_random(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    /// Configures the guest's network (`Agent.SetNetwork`); `net` is checked
    /// here first, as the agent checks it again.
    pub async fn set_network(&self, net: &vessel_protocol::net::Network) -> Result<()> {
        net.validate().map_err(|e| AgentError::BadRequest {
            rpc: "Agent.SetNetwork",
            reason: e.to_string(),
        })?;
        self.call(
            "Agent.SetNetwork",
            self.agent.set_network(no_deadline(), &net.to_request()),
        )
        .await?;
        Ok(())
    }

    /// Sets the agent's policy (`Agent.SetPolicy`). The agent takes one, before
    /// the first container: see [`vessel_protocol::policy`].
    pub async fn set_policy(&self, policy: &vessel_protocol::policy::Policy) -> Result<()> {
        let req = SetPolicyRequest {
            policy_json: policy.to_json(),
            ..Default::default()
        };
        self.call(
            "Agent.SetPolicy",
            self.agent.set_policy(no_deadline(), &req),
        )
        .await?;
        Ok(())
    }

    /// `Agent.Probe`, validated: the guest clock and an RNG sample.
    pub async fn probe(&self) -> Result<GuestProbe> {
        let p = self
            .call(
                "Agent.Probe",
                self.agent.probe(no_deadline(), &ProbeRequest::new()),
            )
            .await?;
        reply::probe(p)
    }

    /// `Health.Check`; `timeout` bounds the wait (on virtio-serial the first
    /// call also waits for the agent to open its port).
    pub async fn check(&self, timeout: Duration) -> Result<()> {
        let resp = within(
            timeout,
            self.health.check(no_deadline(), &CheckRequest::new()),
        )
        .await
        .map_err(|source| rpc_error("Health.Check", source))?;
        reply::health(&resp)
    }

    /// `Agent.GuestMetrics` within `timeout`, checked and capped
    /// ([`reply::guest_metrics`]).
    pub async fn guest_metrics(&self, timeout: Duration) -> Result<GuestMetricsResponse> {
        let started = std::time::Instant::now();
        let r = within(
            timeout,
            self.agent
                .guest_metrics(no_deadline(), &GuestMetricsRequest::new()),
        )
        .await;
        self.latency.observe("GuestMetrics", started.elapsed());
        Ok(reply::guest_metrics(r.map_err(|source| {
            rpc_error("Agent.GuestMetrics", source)
        })?))
    }

    /// Runs `rpc` within the RPC timeout, records its latency as `name`'s and
    /// maps its error.
    pub(crate) async fn call<T>(
        &self,
        name: &'static str,
        rpc: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let r = within(self.rpc_timeout, rpc).await;
        self.latency.observe(name, started.elapsed());
        r.map_err(|source| rpc_error(name, source))
    }

    /// The latencies of this client's RPCs.
    pub fn latency(&self) -> &crate::metrics::RpcLatency {
        &self.latency
    }

    /// `Health.Version`, validated.
    pub async fn version(&self) -> Result<VersionResponse> {
        let v = self
            .call(
                "Health.Version",
                self.health.version(no_deadline(), &VersionRequest::new()),
            )
            .await?;
        reply::version(v)
    }
}

/// A context without a deadline: the host bounds each RPC by its own clock ([`within`]).
/// ttrpc would otherwise send the deadline along and the agent's server would enforce it
/// by the guest's clock, which an emulated guest that calibrated its TSC under load runs
/// too fast: 20 pods started at once under TCG had CreateContainer fail with the agent's
/// "timeout" well before the host's deadline.
pub(crate) fn no_deadline() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

/// `rpc`, failed if it has no reply within `limit` by the host's clock.
pub(crate) async fn within<T>(
    limit: Duration,
    rpc: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> ttrpc::Result<T> {
    tokio::time::timeout(limit, rpc).await.unwrap_or_else(|_| {
        Err(ttrpc::Error::Others(format!(
            "no reply within {} s",
            limit.as_secs()
        )))
    })
}

/// Fills `buf` from the host kernel's CSPRNG.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Opens a stream to guest vsock `port` (hybrid vsock handshake bounded by
/// `timeout`), or, for `Serial`, to the agent's virtio-serial socket.
pub async fn connect_socket(
    endpoint: &AgentEndpoint,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream> {
    match endpoint {
        AgentEndpoint::HybridVsock { uds } => {
            let mut s = UnixStream::connect(uds)
                .await
                .map_err(|source| AgentError::Connect {
                    path: uds.display().to_string(),
                    source,
                })?;
            tokio::time::timeout(timeout, hybrid_vsock::handshake(&mut s, port))
                .await
                .map_err(|_| {
                    hybrid_vsock::HandshakeError::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no reply to CONNECT within {timeout:?}"),
                    ))
                })??;
            Ok(s)
        }
        AgentEndpoint::Serial { path } => connect_when_present(path, timeout).await,
    }
}

async fn connect_when_present(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(CONNECT_POLL).await
            }
            Err(source) => {
                return Err(AgentError::Connect {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_parsed_strictly() {
        assert_eq!(
            reply::ready_line(b"VESSEL-AGENT-READY 0.1.0\n").unwrap(),
            "0.1.0"
        );
        assert_eq!(
            reply::ready_line(b"VESSEL-AGENT-READY 0.1.0").unwrap(),
            "0.1.0"
        );
        for bad in [
            &b""[..],
            b"VESSEL-AGENT-READY\n",
            b"VESSEL-AGENT-READY \n",
            b"HELLO 1\n",
            b"VESSEL-AGENT-READY 1 2\n",
            b"VESSEL-AGENT-READY \xff\n",
        ] {
            assert!(reply::ready_line(bad).is_err(), "{bad:?}");
        }
        let long = format!("VESSEL-AGENT-READY {}\n", "9".repeat(200));
        assert!(reply::ready_line(long.as_bytes()).is_err());
    }

    #[test]
    fn guest_status_messages_are_bounded_and_printable() {
        let status = ttrpc::get_status(ttrpc::Code::INTERNAL, format!("a\nb{}", "x".repeat(5000)));
        let AgentError::Rpc {
            source: RpcFailure(ttrpc::Error::RpcStatus(s)),
            ..
        } = rpc_error("X", ttrpc::Error::RpcStatus(status))
        else {
            panic!("not an RPC status");
        };
        assert!(
            s.message.starts_with("a b") && s.message.chars().count() == reply::MAX_STATUS_MESSAGE
        );
    }

    #[test]
    fn a_failed_rpc_reads_code_and_message() {
        let status = ttrpc::get_status(ttrpc::Code::PERMISSION_DENIED, "X denied".to_string());
        let e = rpc_error("Agent.X", ttrpc::Error::RpcStatus(status));
        assert_eq!(
            crate::chain(&e).to_string(),
            "Agent RPC Agent.X failed: PERMISSION_DENIED: X denied"
        );
        let e = rpc_error("Agent.X", ttrpc::Error::LocalClosed);
        assert_eq!(
            crate::chain(&e).to_string(),
            "Agent RPC Agent.X failed: ttrpc err: local stream closed"
        );
    }

    #[test]
    fn guest_initiated_socket_name() {
        assert_eq!(
            guest_initiated_path(Path::new("/r/v.sock"), 1025),
            PathBuf::from("/r/v.sock_1025")
        );
    }

    #[tokio::test]
    async fn oversized_ready_message_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = ReadyListener::bind(&uds).unwrap();
        let path = guest_initiated_path(&uds, READY_VSOCK_PORT);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut s = UnixStream::connect(path).await.unwrap();
            // A hostile guest that never stops talking.
            let _ = s.write_all(&vec![b'A'; 1 << 20]).await;
        });
        assert!(matches!(l.wait().await, Err(AgentError::BadReady(_))));
    }
}
