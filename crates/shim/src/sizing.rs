//! VM size of a pod from its sandbox spec.
//!
//! In order of precedence:
//! - `io.vessel.vm.vcpus` / `io.vessel.vm.memory_mib`: explicit (needs the
//!   runtime's `pod_annotations = ["io.vessel.*"]` in containerd's config);
//! - the CRI pod-level resources, `io.kubernetes.cri.sandbox-memory` (bytes),
//!   `io.kubernetes.cri.sandbox-cpu-quota` / `-cpu-period` (containerd >= 1.7), or
//!   the sandbox spec's `linux.resources` (what `ctr run --memory-limit` sets):
//!   the pod's limit is added to the configured default so the guest kernel and
//!   agent keep their share, CPUs are rounded up;
//! - otherwise the configuration defaults.

use oci_spec::runtime::Spec;

pub const VCPUS_ANNOTATION: &str = "io.vessel.vm.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.vessel.vm.memory_mib";
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Bounds that keep a typo from asking QEMU for something absurd.
const MAX_VCPUS: u32 = 64;
const MIN_MEMORY_MIB: u32 = 64;
const MAX_MEMORY_MIB: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

pub fn vm_size(spec: &Spec, default: VmSize) -> VmSize {
    let ann = |k: &str| {
        spec.annotations()
            .as_ref()
            .and_then(|a| a.get(k))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let mem_limit = ann(CRI_MEMORY)
        .or_else(|| {
            res.and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
        })
        .filter(|b| *b > 0);
    let cpu = res.and_then(|r| r.cpu().as_ref());
    let quota = ann(CRI_CPU_QUOTA).or_else(|| cpu.and_then(|c| c.quota()));
    let period = ann(CRI_CPU_PERIOD).or_else(|| cpu.and_then(|c| c.period().map(|p| p as i64)));

    let mut size = default;
    if let Some(bytes) = mem_limit {
        let mib = (bytes as u64).div_ceil(1 << 20).min(u32::MAX as u64) as u32;
        size.memory_mib = default.memory_mib.saturating_add(mib);
    }
    if let (Some(q), Some(p)) = (quota, period) {
        if q > 0 && p > 0 {
            size.vcpus = size.vcpus.max((q as u64).div_ceil(p as u64) as u32);
        }
    }
    if let Some(v) = ann(VCPUS_ANNOTATION).filter(|v| *v > 0) {
        size.vcpus = v.min(MAX_VCPUS as i64) as u32;
    }
    if let Some(m) = ann(MEMORY_ANNOTATION).filter(|v| *v > 0) {
        size.memory_mib = m.min(MAX_MEMORY_MIB as i64) as u32;
    }
    size.vcpus = size.vcpus.clamp(1, MAX_VCPUS);
    size.memory_mib = size.memory_mib.clamp(MIN_MEMORY_MIB, MAX_MEMORY_MIB);
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEF: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 256,
    };

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_without_resources() {
        assert_eq!(vm_size(&spec(r#"{"ociVersion":"1.0.2"}"#), DEF), DEF);
    }

    #[test]
    fn cri_annotations_add_to_default() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{
            "io.kubernetes.cri.sandbox-memory":"536870912",
            "io.kubernetes.cri.sandbox-cpu-quota":"150000",
            "io.kubernetes.cri.sandbox-cpu-period":"100000"}}"#,
        );
        assert_eq!(
            vm_size(&s, DEF),
            VmSize {
                vcpus: 2,
                memory_mib: 768
            }
        );
    }

    #[test]
    fn spec_resources_and_explicit_override() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"resources":{"memory":{"limit":134217728},
            "cpu":{"quota":300000,"period":100000}}}}"#,
        );
        assert_eq!(
            vm_size(&s, DEF),
            VmSize {
                vcpus: 3,
                memory_mib: 384
            }
        );
        let s = spec(
            r#"{"ociVersion":"1.0.2","annotations":{"io.vessel.vm.vcpus":"9999",
            "io.vessel.vm.memory_mib":"1","io.kubernetes.cri.sandbox-memory":"garbage"}}"#,
        );
        assert_eq!(
            vm_size(&s, DEF),
            VmSize {
                vcpus: 64,
                memory_mib: 64
            }
        );
    }
}
