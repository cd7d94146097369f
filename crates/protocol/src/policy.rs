//! The agent policy: which `Agent` RPCs, and which request fields, a sandbox's
//! agent serves. One type for both ends: the host reads it from TOML
//! (`[agent] policy` in config.toml) and sends it as JSON in `SetPolicy`; the
//! agent decodes the JSON and asks [`Policy`] about every request.
//!
//! Schema, version 1 (every key but `version` is optional; unknown keys are an
//! error):
//!
//! ```toml
//! version = 1
//! # Agent RPCs served, by their agent.proto names. Default: all of them (what the
//! # runtime calls). SetPolicy is not listed: it is accepted once, see docs/agent-protocol.md.
//! allowed_rpcs = ["CreateContainer", "StartContainer", "WaitProcess", ...]
//! # false: ExecProcess is denied (the same as leaving it out of allowed_rpcs).
//! exec = true
//! # Most containers at once in the VM (a pod's sandbox container counts).
//! max_containers = 8
//! # Capabilities a process (container init or exec) may hold, in any of its
//! # sets; any other is denied (a "privileged" spec asks for all of them).
//! allowed_capabilities = ["CAP_CHOWN", "CAP_KILL", ...]
//! # OCI mount types a container may have (spec `mounts[].type`).
//! allowed_mount_types = ["bind", "proc", "tmpfs", ...]
//! # Guest paths (whole components) under which bind-mount sources must lie.
//! allowed_bind_sources = ["/run/vessel"]
//! # File system types of the host shares a container may mount (Storage.fstype).
//! allowed_storage_fstypes = ["virtiofs", "9p"]
//! # Executables (process.args[0], exactly) a container or exec may run.
//! allowed_commands = ["/pause", "/bin/sh"]
//! ```
//!
//! What a policy cannot do: a compromised agent ignores it. It bounds what a
//! confused or compromised host-side caller can make the guest do.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The schema version this crate reads and writes.
pub const POLICY_VERSION: u32 = 1;

/// Largest policy accepted on the wire, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// The `Agent` RPCs a policy governs (every RPC but `SetPolicy`), named as in
/// agent.proto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Rpc {
    CreateContainer,
    StartContainer,
    ExecProcess,
    SignalProcess,
    WaitProcess,
    RemoveContainer,
    ListProcesses,
    PauseContainer,
    ResumeContainer,
    CloseStdin,
    ResizeTty,
    UpdateContainer,
    StatsContainer,
    StateContainer,
    #[serde(rename = "GetOOMEvent")]
    GetOomEvent,
    SetTime,
    ReseedRandom,
    Probe,
    SetNetwork,
    GuestMetrics,
    GetEvents,
}

impl Rpc {
    pub const ALL: [Rpc; 21] = [
        Rpc::CreateContainer,
        Rpc::StartContainer,
        Rpc::ExecProcess,
        Rpc::SignalProcess,
        Rpc::WaitProcess,
        Rpc::RemoveContainer,
        Rpc::ListProcesses,
        Rpc::PauseContainer,
        Rpc::ResumeContainer,
        Rpc::CloseStdin,
        Rpc::ResizeTty,
        Rpc::UpdateContainer,
        Rpc::StatsContainer,
        Rpc::StateContainer,
        Rpc::GetOomEvent,
        Rpc::SetTime,
        Rpc::ReseedRandom,
        Rpc::Probe,
        Rpc::SetNetwork,
        Rpc::GuestMetrics,
        Rpc::GetEvents,
    ];
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rpc::GetOomEvent => f.write_str("GetOOMEvent"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// An agent policy (see the module documentation for the schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub version: u32,
    #[serde(default = "all_rpcs")]
    pub allowed_rpcs: BTreeSet<Rpc>,
    #[serde(default = "yes")]
    pub exec: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_containers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_capabilities: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_mount_types: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_bind_sources: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_storage_fstypes: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_commands: Option<BTreeSet<String>>,
}

fn all_rpcs() -> BTreeSet<Rpc> {
    Rpc::ALL.into_iter().collect()
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    /// What the runtime needs: every RPC, no field rules.
    fn default() -> Self {
        Policy {
            version: POLICY_VERSION,
            allowed_rpcs: all_rpcs(),
            exec: true,
            max_containers: None,
            allowed_capabilities: None,
            allowed_mount_types: None,
            allowed_bind_sources: None,
            allowed_storage_fstypes: None,
            allowed_commands: None,
        }
    }
}

/// A policy that cannot be read.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum PolicyError {
    /// invalid agent policy: {0}
    Parse(String),
    /// agent policy version {0} is not supported (this build reads version 1)
    Version(u32),
    /// agent policy: {0}
    Invalid(String),
}

// A request the policy denies: its message names the RPC (and field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
/// {0} denied by the sandbox's agent policy
pub struct Denied(pub String);

/// The parts of an OCI process the policy looks at; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
struct ProcessView {
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    capabilities: Option<CapsView>,
}

#[derive(Debug, Default, Deserialize)]
struct CapsView {
    #[serde(default)]
    bounding: Option<Vec<String>>,
    #[serde(default)]
    effective: Option<Vec<String>>,
    #[serde(default)]
    inheritable: Option<Vec<String>>,
    #[serde(default)]
    permitted: Option<Vec<String>>,
    #[serde(default)]
    ambient: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct MountView {
    #[serde(default, rename = "type")]
    typ: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    options: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct SpecView {
    #[serde(default)]
    process: Option<ProcessView>,
    #[serde(default)]
    mounts: Option<Vec<MountView>>,
}

impl Policy {
    /// Parses the JSON a `SetPolicy` request carries.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, PolicyError> {
        if bytes.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::Invalid(format!(
                "{} bytes, more than {MAX_POLICY_BYTES}",
                bytes.len()
            )));
        }
        let p: Policy =
            serde_json::from_slice(bytes).map_err(|e| PolicyError::Parse(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    /// The JSON a `SetPolicy` request carries.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a policy serializes")
    }

    /// Checks what serde cannot: the version and the paths. Call it after
    /// decoding a policy from any format.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.version != POLICY_VERSION {
            return Err(PolicyError::Version(self.version));
        }
        for s in self.allowed_bind_sources.iter().flatten() {
            if !s.starts_with('/') || s.split('/').any(|c| c == "..") {
                return Err(PolicyError::Invalid(format!(
                    "allowed_bind_sources entry {s:?} must be an absolute path without \"..\""
                )));
            }
        }
        Ok(())
    }

    /// Whether `rpc` is served at all.
    pub fn check_rpc(&self, rpc: Rpc) -> Result<(), Denied> {
        let allowed = self.allowed_rpcs.contains(&rpc) && (rpc != Rpc::ExecProcess || self.exec);
        if allowed {
            Ok(())
        } else {
            Err(Denied(rpc.to_string()))
        }
    }

    /// `CreateContainer` with `spec_json` and shares of `storage_fstypes`, when
    /// `existing` containers exist (or are being created).
    pub fn check_create<'a>(
        &self,
        spec_json: &[u8],
        storage_fstypes: impl IntoIterator<Item = &'a str>,
        existing: usize,
    ) -> Result<(), Denied> {
        let rpc = Rpc::CreateContainer;
        self.check_rpc(rpc)?;
        let deny = |field: String| Denied(format!("{rpc} {field}"));
        self.check_container_count(existing)?;
        if let Some(allowed) = &self.allowed_storage_fstypes {
            for t in storage_fstypes {
                if !allowed.contains(t) {
                    return Err(deny(format!("storages fstype {t:?}")));
                }
            }
        }
        if !self.has_spec_rules() {
            // Nothing to check in it: a bad spec stays the agent's INVALID_ARGUMENT.
            return Ok(());
        }
        let spec: SpecView = serde_json::from_slice(spec_json)
            .map_err(|_| deny("spec_json (not an OCI spec the policy can check)".into()))?;
        for m in spec.mounts.iter().flatten() {
            let bind = m.typ.as_deref() == Some("bind")
                || m.options
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            let typ = m.typ.as_deref().unwrap_or(if bind { "bind" } else { "" });
            if let Some(allowed) = &self.allowed_mount_types {
                if !allowed.contains(typ) {
                    return Err(deny(format!("mount type {typ:?}")));
                }
            }
            if let (true, Some(allowed)) = (bind, &self.allowed_bind_sources) {
                let source = m.source.as_deref().unwrap_or("");
                if !allowed.iter().any(|a| under(source, a)) {
                    return Err(deny(format!("bind mount source {source:?}")));
                }
            }
        }
        self.check_process(rpc, "process.", spec.process.as_ref())
    }

    /// One more container when `existing` exist or are being created
    /// (`max_containers`). Part of [`Policy::check_create`]; the agent asks again
    /// under the lock that registers the new container, so concurrent requests
    /// cannot pass together.
    pub fn check_container_count(&self, existing: usize) -> Result<(), Denied> {
        match self.max_containers {
            Some(max) if existing >= max as usize => Err(Denied(format!(
                "{} (a container beyond max_containers = {max})",
                Rpc::CreateContainer
            ))),
            _ => Ok(()),
        }
    }

    /// `ExecProcess` with `process_json` (an OCI process object).
    pub fn check_exec(&self, process_json: &[u8]) -> Result<(), Denied> {
        let rpc = Rpc::ExecProcess;
        self.check_rpc(rpc)?;
        if !self.has_process_rules() {
            return Ok(());
        }
        let process: ProcessView = serde_json::from_slice(process_json).map_err(|_| {
            Denied(format!(
                "{rpc} process_json (not an OCI process the policy can check)"
            ))
        })?;
        self.check_process(rpc, "", Some(&process))
    }

    fn has_process_rules(&self) -> bool {
        self.allowed_commands.is_some() || self.allowed_capabilities.is_some()
    }

    fn has_spec_rules(&self) -> bool {
        self.has_process_rules()
            || self.allowed_mount_types.is_some()
            || self.allowed_bind_sources.is_some()
    }

    fn check_process(
        &self,
        rpc: Rpc,
        prefix: &str,
        process: Option<&ProcessView>,
    ) -> Result<(), Denied> {
        let Some(p) = process else { return Ok(()) };
        if let Some(allowed) = &self.allowed_commands {
            let cmd = p.args.iter().flatten().next().map_or("", String::as_str);
            if !allowed.contains(cmd) {
                return Err(Denied(format!("{rpc} {prefix}args[0] {cmd:?}")));
            }
        }
        if let (Some(allowed), Some(caps)) = (&self.allowed_capabilities, &p.capabilities) {
            let sets = [
                ("bounding", &caps.bounding),
                ("effective", &caps.effective),
                ("inheritable", &caps.inheritable),
                ("permitted", &caps.permitted),
                ("ambient", &caps.ambient),
            ];
            for (set, caps) in sets {
                if let Some(cap) = caps.iter().flatten().find(|c| !allowed.contains(*c)) {
                    return Err(Denied(format!("{rpc} {prefix}capabilities.{set} {cap}")));
                }
            }
        }
        Ok(())
    }
}

/// Whether absolute `path` is `dir` or lies under it, by whole components, with
/// no `..` anywhere.
fn under(path: &str, dir: &str) -> bool {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return false;
    }
    let comps = |p: &'_ str| -> Vec<String> {
        p.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect()
    };
    let (p, d) = (comps(path), comps(dir));
    p.len() >= d.len() && p[..d.len()] == d[..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml(text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        p.validate()?;
        Ok(p)
    }

    const SPEC: &str = r#"{
        "process": {"args": ["/bin/sh", "-c", "true"],
                    "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]}},
        "root": {"path": "/run/c1/rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/run/vessel/shared/hosts",
             "options": ["rbind", "ro"]}
        ]
    }"#;

    #[test]
    fn the_smallest_policy_is_the_default_one() {
        assert_eq!(toml("version = 1").unwrap(), Policy::default());
        let p = Policy::default();
        for rpc in Rpc::ALL {
            assert_eq!(p.check_rpc(rpc), Ok(()), "{rpc}");
        }
        assert_eq!(p.check_create(SPEC.as_bytes(), ["virtiofs"], 100), Ok(()));
        assert_eq!(p.check_exec(br#"{"args": ["/x"]}"#), Ok(()));
        // Without field rules a bad spec is not the policy's business (the agent
        // answers INVALID_ARGUMENT).
        assert_eq!(p.check_create(b"{not json", [], 0), Ok(()));
        assert_eq!(p.check_exec(b"[]"), Ok(()));
        assert_eq!(Policy::from_json(&p.to_json()).unwrap(), p);
    }

    #[test]
    fn bad_policies_are_errors_that_name_the_problem() {
        for (text, needle) in [
            ("", "missing field `version`"),
            ("version = 2", "version 2 is not supported"),
            (
                "version = 1\nexec = false\nexecs = 1",
                "unknown field `execs`",
            ),
            (
                "version = 1\nallowed_rpcs = [\"Exec\"]",
                "unknown variant `Exec`",
            ),
            (
                "version = 1\nallowed_bind_sources = [\"run\"]",
                "must be an absolute path",
            ),
            (
                "version = 1\nallowed_bind_sources = [\"/run/../etc\"]",
                "must be an absolute path",
            ),
        ] {
            let e = toml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
        let big = vec![b' '; MAX_POLICY_BYTES + 1];
        assert!(matches!(
            Policy::from_json(&big),
            Err(PolicyError::Invalid(_))
        ));
        assert!(Policy::from_json(br#"{"version": 1, "x": 1}"#).is_err());
    }

    #[test]
    fn exec_false_or_an_rpc_left_out_is_denied_by_name() {
        let p = toml("version = 1\nexec = false").unwrap();
        let e = p.check_exec(br#"{"args": ["/bin/sh"]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ExecProcess denied by the sandbox's agent policy"
        );
        assert_eq!(p.check_rpc(Rpc::StartContainer), Ok(()));
        let p = toml("version = 1\nallowed_rpcs = [\"CreateContainer\", \"GetOOMEvent\"]").unwrap();
        assert_eq!(p.check_rpc(Rpc::GetOomEvent), Ok(()));
        assert_eq!(
            p.check_rpc(Rpc::PauseContainer).unwrap_err().to_string(),
            "PauseContainer denied by the sandbox's agent policy"
        );
        assert!(p.check_exec(br#"{"args": ["/bin/sh"]}"#).is_err());
        assert_eq!(p.check_create(SPEC.as_bytes(), [], 0), Ok(()));
    }

    #[test]
    fn container_fields_are_checked() {
        let spec = SPEC.as_bytes();
        let deny = |p: &str, storages: &[&str], n: usize| {
            toml(&format!("version = 1\n{p}"))
                .unwrap()
                .check_create(spec, storages.iter().copied(), n)
                .err()
                .map(|d| d.0)
        };
        assert_eq!(deny("max_containers = 2", &[], 1), None);
        assert_eq!(
            deny("max_containers = 2", &[], 2).as_deref(),
            Some("CreateContainer (a container beyond max_containers = 2)")
        );
        let fs = "allowed_storage_fstypes = [\"virtiofs\"]";
        assert_eq!(deny(fs, &["virtiofs"], 0), None);
        assert_eq!(
            deny(fs, &["virtiofs", "9p"], 0).as_deref(),
            Some("CreateContainer storages fstype \"9p\"")
        );
        assert_eq!(
            deny("allowed_mount_types = [\"proc\"]", &[], 0).as_deref(),
            Some("CreateContainer mount type \"bind\"")
        );
        assert_eq!(
            deny("allowed_mount_types = [\"proc\", \"bind\"]", &[], 0),
            None
        );
        assert_eq!(
            deny("allowed_bind_sources = [\"/run/vessel\"]", &[], 0),
            None
        );
        assert_eq!(
            deny("allowed_bind_sources = [\"/run/vessel/shared/h\"]", &[], 0).as_deref(),
            Some("CreateContainer bind mount source \"/run/vessel/shared/hosts\"")
        );
        assert_eq!(
            deny("allowed_capabilities = [\"CAP_CHOWN\"]", &[], 0).as_deref(),
            Some("CreateContainer process.capabilities.bounding CAP_KILL")
        );
        assert_eq!(deny("allowed_capabilities = [\"CAP_KILL\"]", &[], 0), None);
        assert_eq!(
            deny("allowed_commands = [\"/pause\"]", &[], 0).as_deref(),
            Some("CreateContainer process.args[0] \"/bin/sh\"")
        );
        assert_eq!(deny("allowed_commands = [\"/bin/sh\"]", &[], 0), None);
        let p = toml("version = 1\nallowed_mount_types = [\"proc\"]").unwrap();
        assert_eq!(
            p.check_create(b"{\"mounts\": 3}", [], 0).unwrap_err().0,
            "CreateContainer spec_json (not an OCI spec the policy can check)"
        );
    }

    #[test]
    fn exec_fields_are_checked() {
        let p = toml(
            "version = 1\nallowed_commands = [\"/bin/ls\"]\nallowed_capabilities = [\"CAP_KILL\"]",
        )
        .unwrap();
        assert_eq!(p.check_exec(br#"{"args": ["/bin/ls", "/"]}"#), Ok(()));
        assert_eq!(
            p.check_exec(br#"{"args": ["/bin/sh"]}"#).unwrap_err().0,
            "ExecProcess args[0] \"/bin/sh\""
        );
        assert_eq!(
            p.check_exec(br#"{"args": []}"#).unwrap_err().0,
            "ExecProcess args[0] \"\""
        );
        let caps = br#"{"args": ["/bin/ls"], "capabilities": {"ambient": ["CAP_SYS_ADMIN"]}}"#;
        assert_eq!(
            p.check_exec(caps).unwrap_err().0,
            "ExecProcess capabilities.ambient CAP_SYS_ADMIN"
        );
    }

    #[test]
    fn bind_sources_match_whole_components_without_dot_dot() {
        assert!(under("/run/vessel", "/run/vessel"));
        assert!(under("/run/vessel/a/b", "/run/vessel/"));
        assert!(!under("/run/vesselx", "/run/vessel"));
        assert!(!under("/run/vessel/../etc", "/run/vessel"));
        assert!(!under("run/vessel/a", "/run/vessel"));
        assert!(under("/anything", "/"));
    }
}
