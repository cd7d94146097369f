//! Where the agent listens and how it announces itself.

/// vsock port on which the agent serves its ttrpc API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Host vsock port the agent connects to once its server is up (guest-initiated
/// connection). With hybrid vsock it reaches the host Unix socket `<uds>_1025`.
/// The host must not send `CONNECT` before this arrives: some vsock backends
/// lock up when a connection is attempted before the guest driver is ready.
pub const READY_VSOCK_PORT: u32 = 1025;

/// The vsock CID of the host, as seen from the guest.
pub const HOST_CID: u32 = 2;

/// Line the agent writes on the ready connection, followed by its version and `\n`.
pub const READY_MAGIC: &str = "VESSEL-AGENT-READY";

/// Name of the virtio-serial port that carries the agent ttrpc stream when the
/// channel is virtio-serial (`/sys/class/virtio-ports/vport*/name`).
pub const AGENT_SERIAL_PORT_NAME: &str = "vessel.agent";

/// Kernel command-line key that selects the agent channel: `vessel.channel=vsock|serial`.
pub const CHANNEL_CMDLINE_KEY: &str = "vessel.channel";

/// vsock port on which the agent accepts process stdio streams. Each connection
/// starts with one [`crate::stdio::StdioHeader`] line, then carries raw bytes.
/// With `--listen unix://<path>` the agent serves the same on `<path>.stdio`.
pub const STDIO_VSOCK_PORT: u32 = 1026;
