//! Snapshot and template descriptions read back from disk. First byte:
//! - 0: vessel-vmm's `state.json`, parsed and restored into devices
//!   (`vessel_vmm::fuzzing::snapshot_state`);
//! - 1: the runtime's template manifest (`template.json`);
//! - 2: the hypervisor-neutral `vessel-snapshot.json` (`SnapshotInfo`).
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => vessel_vmm::fuzzing::snapshot_state(rest),
        1 => {
            let _ = vessel_runtime::template::parse_manifest(rest);
        }
        _ => {
            if let Ok(info) =
                vessel_hypervisor::SnapshotInfo::parse(rest, Path::new("vessel-snapshot.json"))
            {
                let _ = format!("{info:?}");
            }
        }
    }
});
