//! virtiofsd helpers: one daemon per shared directory, sandbox left on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::process::{spawn, wait_for_path};
use crate::{Error, Result, VmConfig};

/// How long a helper (virtiofsd, vhost-device-vsock, QEMU's QMP socket) may take to
/// create its socket: milliseconds on a real host; a hung helper is what it catches.
/// 30 s, as for the built-in VMM's API socket: 10 s ran out for virtiofsd in the KVM
/// lane, whose host side runs under emulation, with the host loaded.
pub const HELPER_START_TIMEOUT: Duration = Duration::from_secs(30);

/// vhost-user socket of the virtiofsd serving shared directory `index`.
pub fn socket(run_dir: &Path, index: usize) -> PathBuf {
    run_dir.join(format!("fs{index}.sock"))
}

/// Starts one virtiofsd per `cfg.shared_dirs` entry; each started child is
/// pushed to `helpers` (also on error, so the caller can stop them).
pub async fn start(bin: &Path, cfg: &VmConfig, helpers: &mut Vec<Child>) -> Result<()> {
    for (i, share) in cfg.shared_dirs.iter().enumerate() {
        if !bin.is_file() {
            return Err(Error::NotFound {
                what: "virtiofsd",
                path: bin.to_path_buf(),
                hint: "run 'make deps' (cargo install virtiofsd)",
            });
        }
        let sock = socket(&cfg.run_dir, i);
        let log = cfg.run_dir.join(format!("virtiofsd-{i}.log"));
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", sock.display()));
        cmd.arg(format!("--shared-dir={}", share.host_path.display()));
        // The default sandbox (namespaces + seccomp) stays on.
        cmd.args(["--cache=auto", "--announce-submounts", "--xattr"]);
        if share.read_only {
            cmd.arg("--readonly");
        }
        let mut child = spawn("virtiofsd", cmd, &log, cfg)?;
        let ready = wait_for_path(&sock, &mut child, "virtiofsd", &log, HELPER_START_TIMEOUT).await;
        helpers.push(child);
        ready?;
    }
    Ok(())
}
