//! The Health service: liveness and identity of the guest.

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use vessel_protocol::health::{
    check_response::ServingStatus, CheckRequest, CheckResponse, VersionRequest, VersionResponse,
};
use vessel_protocol::health_ttrpc::Health;

pub struct HealthService;

pub(crate) fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[async_trait]
impl Health for HealthService {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: VersionRequest,
    ) -> ttrpc::Result<VersionResponse> {
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let uptime_seconds = read_trimmed("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            protocol_version: vessel_protocol::PROTOCOL_VERSION,
            kernel_release,
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            uptime_seconds,
            ..Default::default()
        })
    }
}
