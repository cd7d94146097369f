//! What the host offers for virtualization.

use std::fmt;
use std::path::Path;

/// The kind of `/dev/kvm` this host has: vessel-vmm-api's one probe.
pub use vessel_vmm_api::HostKvm as KvmKind;

/// The accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// Detects the KVM kind from `/dev/kvm` and the loaded modules under `sys_module`
/// (normally `/sys/module`).
pub fn detect_kvm_at(dev_kvm: &Path, sys_module: &Path) -> (KvmKind, String) {
    vessel_vmm_api::kvm::detect_at(dev_kvm, sys_module)
}

/// Detects this host's KVM kind, with a one-line reason.
pub fn detect_kvm() -> (KvmKind, String) {
    vessel_vmm_api::kvm::detect()
}

/// The accelerator to use for full Linux guests on a host with `kvm`.
pub fn pick_accelerator(kvm: KvmKind) -> Accelerator {
    match kvm {
        KvmKind::Hardware => Accelerator::Kvm,
        KvmKind::Pvm | KvmKind::None => Accelerator::Tcg,
    }
}

/// The host's TSC frequency in kHz, measured once per process against
/// CLOCK_MONOTONIC over [`TSC_MEASURE`], when the host's TSC is invariant
/// (`constant_tsc` and `nonstop_tsc` in /proc/cpuinfo); None otherwise.
///
/// A TCG guest reads the host's TSC, and without a TSC frequency from CPUID
/// (TCG gives none) its kernel calibrates the TSC against the emulated PIT
/// in a few milliseconds of boot: on a loaded host the vCPU thread is
/// descheduled inside that window and the guest's clock runs fast or slow
/// from then on (found by the 20-pod soak: twice as fast). Passing the
/// measured value as `tsc_early_khz=` skips that calibration.
pub fn tsc_khz() -> Option<u32> {
    static KHZ: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        if !(has("constant_tsc") && has("nonstop_tsc")) {
            return None;
        }
        measure_tsc_khz(TSC_MEASURE)
    })
}

/// The interval [`tsc_khz`] measures over: the clocks are read within a
/// microsecond of each other, so the error is a few parts in 10^5.
const TSC_MEASURE: std::time::Duration = std::time::Duration::from_millis(50);

fn measure_tsc_khz(over: std::time::Duration) -> Option<u32> {
    // (TSC, CLOCK_MONOTONIC in ns) read together: of several tries, the one
    // whose two clock reads are closest in time (the thread was not
    // preempted between them).
    fn sample() -> (u64, u128) {
        let now = || {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes only the timespec we pass.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
        };
        (0..32)
            .map(|_| {
                let t0 = now();
                // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it.
                let tsc = unsafe { core::arch::x86_64::_rdtsc() };
                let t1 = now();
                (t1 - t0, tsc, (t0 + t1) / 2)
            })
            .min()
            .map(|(_, tsc, ns)| (tsc, ns))
            .unwrap_or_default()
    }
    let (tsc0, ns0) = sample();
    std::thread::sleep(over);
    let (tsc1, ns1) = sample();
    let ns = ns1.checked_sub(ns0).filter(|&n| n > 0)?;
    let khz = u128::from(tsc1.checked_sub(tsc0)?) * 1_000_000 / ns;
    // Anything outside 100 MHz..100 GHz is a broken clock, not a TSC.
    u32::try_from(khz)
        .ok()
        .filter(|k| (100_000..100_000_000).contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_is_measured_consistently() {
        let a = measure_tsc_khz(TSC_MEASURE).expect("this host's TSC");
        let b = measure_tsc_khz(TSC_MEASURE).expect("this host's TSC");
        let diff = a.abs_diff(b) as f64 / a as f64;
        assert!(diff < 0.002, "{a} kHz then {b} kHz");
        assert_eq!(tsc_khz(), tsc_khz(), "measured once");
    }

    /// The probe itself is tested where it lives (vessel_vmm_api::kvm).
    #[test]
    fn hardware_kvm_runs_kvm_and_anything_else_tcg() {
        assert_eq!(pick_accelerator(KvmKind::Pvm), Accelerator::Tcg);
        assert_eq!(pick_accelerator(KvmKind::None), Accelerator::Tcg);
        assert_eq!(pick_accelerator(KvmKind::Hardware), Accelerator::Kvm);
    }
}
