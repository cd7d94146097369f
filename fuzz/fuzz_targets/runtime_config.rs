//! What the runtime reads from the operator and the user before use. First byte:
//! - even: `config.toml` (`vessel_runtime::Config::parse`);
//! - odd: an OCI bundle's `config.json` (`Bundle::parse`: version, root, process checks
//!   against a small rootfs), then the VM size, annotations and terminal it implies.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use vessel_runtime::container::bundle::Bundle;
use vessel_runtime::Config;

/// A bundle directory with a rootfs holding `/bin/sh` (made once per process).
fn bundle_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("vessel-fuzz-bundle-{}", std::process::id()));
        std::fs::create_dir_all(d.join("rootfs/bin")).unwrap();
        std::fs::write(d.join("rootfs/bin/sh"), b"").unwrap();
        d
    })
    .clone()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            if let Ok(cfg) = Config::parse(text) {
                let _ = cfg.template_dir();
                let _ = cfg.log_limits();
            }
        }
    } else if let Ok(b) = Bundle::parse(bundle_dir(), rest) {
        let _ = b.vm_size(&Config::default());
        let _ = b.annotations();
        let _ = b.terminal();
    }
});
