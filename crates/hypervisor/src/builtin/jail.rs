//! Running vessel-vmm under `vessel-jailer` (crates/jailer): the jailer's command line,
//! with the VMM's host paths rewritten to where the jail shows them.
//!
//! The kernel and initramfs are bound read-only at fixed in-jail paths; the sandbox's
//! run directory (API socket, vsock socket, serial log, virtiofsd sockets) is the jail's
//! one read-write directory, at [`RUN_DIR_IN_JAIL`], so the sockets the VMM creates
//! there appear on the host where the runtime expects them.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::Start;
use crate::{Error, Result, VmConfig};

/// vessel-jailer's default `--jail-root` (crates/jailer).
pub const DEFAULT_JAIL_ROOT: &str = "/srv/vessel/jail";
/// Where the jail shows the sandbox's run directory.
pub const RUN_DIR_IN_JAIL: &str = "/run/vessel";
/// Where the jail shows the guest kernel.
const KERNEL_IN_JAIL: &str = "/boot/kernel";
/// Where the jail shows the initramfs.
const INITRAMFS_IN_JAIL: &str = "/boot/initramfs";
/// Where the jail shows the snapshot a VM is restored from (read-only).
const SNAPSHOT_IN_JAIL: &str = "/snapshot";
/// Where a jailed VMM writes a snapshot: inside the run directory, the one
/// directory it may write; the runtime then moves the files out.
pub const SNAPSHOT_STAGING: &str = "snapshot.partial";

/// How the built-in VMM is jailed.
#[derive(Debug, Clone, PartialEq)]
pub struct JailerConfig {
    /// `vessel-jailer` binary.
    pub path: PathBuf,
    /// Unprivileged user and group the VMM runs as.
    pub uid: u32,
    pub gid: u32,
    /// Directory of the per-VM jails (`<jail_root>/<id>/root`).
    pub jail_root: PathBuf,
    /// cgroup memory limit in MiB (`None`: no limit).
    pub cgroup_mem_mib: Option<u64>,
    /// cgroup CPU limit in CPUs (`None`: no limit).
    pub cgroup_cpus: Option<f64>,
}

/// The jailer command that runs `vmm` for VM `cfg`, and `start` with its host paths
/// rewritten to where the jail shows them. Hands the run directory and the sockets already
/// in it (the agent's ready listener, virtiofsd's) to the jail's user, so that the VMM can
/// create its own sockets there and connect to those.
pub fn command(
    jailer: &JailerConfig,
    vmm: &Path,
    cfg: &VmConfig,
    start: Start,
) -> Result<(Command, Start)> {
    if !jailer.path.is_file() {
        return Err(Error::NotFound {
            what: "vessel-jailer",
            path: jailer.path.clone(),
            hint: "run 'make install' or set builtin.jailer_path in /etc/vessel/config.toml",
        });
    }
    let (mut args, start) = jailer_args(jailer, vmm, &cfg.id, &cfg.run_dir, start)?;
    if cfg.cgroup.is_some() {
        // The jailer starts in the sandbox's cgroup (crate::process::spawn) and its
        // VMM stays there, under the sandbox's limits.
        if jailer.cgroup_mem_mib.is_some() || jailer.cgroup_cpus.is_some() {
            return Err(Error::InvalidConfig(
                "jailer cgroup limits and a sandbox host cgroup exclude each other".into(),
            ));
        }
        args.insert(0, "--no-cgroup".into());
    }
    hand_over_run_dir(&cfg.run_dir, jailer.uid, jailer.gid)?;
    let mut cmd = Command::new(&jailer.path);
    cmd.args(args);
    Ok((cmd, start))
}

/// The jailer's arguments (binds for the kernel, initramfs or snapshot, `--keep-fd` for
/// each tap, then `-- --api-sock <in-jail socket>`), and `start` with in-jail paths.
pub fn jailer_args(
    jailer: &JailerConfig,
    vmm: &Path,
    id: &str,
    run_dir: &Path,
    start: Start,
) -> Result<(Vec<String>, Start)> {
    let mut a: Vec<String> = vec![
        "--id".into(),
        id.into(),
        "--exec".into(),
        vmm.display().to_string(),
        "--uid".into(),
        jailer.uid.to_string(),
        "--gid".into(),
        jailer.gid.to_string(),
        "--jail-root".into(),
        jailer.jail_root.display().to_string(),
        // The supervisor spawns with SIGKILL as parent-death signal; the jailer turns it
        // into SIGTERM so that it still removes the jail and cgroup.
        "--die-with-parent".into(),
        // VMs share one jail user: their own PID namespaces keep them from seeing or
        // signalling each other.
        "--new-pid-ns".into(),
        "--rw-bind".into(),
        format!("{}:{RUN_DIR_IN_JAIL}", run_dir.display()),
    ];
    if let Some(mib) = jailer.cgroup_mem_mib {
        a.extend(["--cgroup-mem-mib".into(), mib.to_string()]);
    }
    if let Some(cpus) = jailer.cgroup_cpus {
        a.extend(["--cgroup-cpus".into(), cpus.to_string()]);
    }
    let in_run = |p: &Path| in_run_dir(run_dir, p).map(PathBuf::from);
    let start = match start {
        Start::Boot(mut c) => {
            c.kernel = ro_bind(&mut a, &c.kernel, KERNEL_IN_JAIL);
            if let Some(i) = &c.initramfs {
                c.initramfs = Some(ro_bind(&mut a, i, INITRAMFS_IN_JAIL));
            }
            if let Some(p) = &c.serial_log {
                c.serial_log = Some(in_run(p)?);
            }
            if let Some(v) = &mut c.vsock {
                v.uds = in_run(&v.uds)?;
            }
            for f in &mut c.fs {
                f.socket = in_run(&f.socket)?;
            }
            if !c.block.is_empty() {
                return Err(Error::Unsupported {
                    backend: "builtin (jailed)",
                    operation: "block devices inside the jail",
                });
            }
            for n in &c.net {
                // A tap the runtime opened; the VMM inherits it under the same number.
                let fd = n.fd.filter(|_| n.tap.is_none()).ok_or(Error::Unsupported {
                    backend: "builtin (jailed)",
                    operation: "opening a tap by name inside the jail (pass an open tap fd)",
                })?;
                a.extend(["--keep-fd".into(), fd.to_string()]);
            }
            Start::Boot(c)
        }
        Start::Restore {
            dir,
            serial_log,
            serial_log_limits,
            vsock_uds,
            fs_sockets,
            net_fds,
        } => Start::Restore {
            serial_log_limits,
            // The VMM opens the snapshot's files read-only and maps the memory file
            // privately (or copies it): a read-only bind is enough.
            dir: ro_bind(&mut a, &dir, SNAPSHOT_IN_JAIL),
            serial_log: in_run(&serial_log)?,
            vsock_uds: in_run(&vsock_uds)?,
            fs_sockets: fs_sockets
                .iter()
                .map(|s| in_run(s))
                .collect::<Result<_>>()?,
            net_fds: {
                for fd in &net_fds {
                    // The clone's taps, inherited under the same numbers.
                    a.extend(["--keep-fd".into(), fd.to_string()]);
                }
                net_fds
            },
        },
    };
    a.push("--".into());
    a.push("--api-sock".into());
    a.push(in_run_dir(run_dir, &run_dir.join(super::API_SOCKET))?);
    Ok((a, start))
}

/// Adds a read-only bind of `host` at `at` in the jail; returns `at`.
fn ro_bind(a: &mut Vec<String>, host: &Path, at: &str) -> PathBuf {
    a.extend(["--ro-bind".into(), format!("{}:{at}", host.display())]);
    PathBuf::from(at)
}

/// `run_dir/x` as the jail shows it: `RUN_DIR_IN_JAIL/x`.
fn in_run_dir(run_dir: &Path, host: &Path) -> Result<String> {
    let rel = host.strip_prefix(run_dir).map_err(|_| {
        Error::InvalidConfig(format!(
            "{} is outside the run directory {}: the jailed VMM sees only that directory",
            host.display(),
            run_dir.display()
        ))
    })?;
    Ok(Path::new(RUN_DIR_IN_JAIL).join(rel).display().to_string())
}

/// Moves a snapshot the jailed VMM wrote into `run_dir/snapshot.partial` to
/// `dir`, owned by root and private (mode 0600): the files hold guest memory.
pub fn collect_snapshot(run_dir: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let staging = run_dir.join(SNAPSHOT_STAGING);
    let io = |what: String| move |source| Error::Io { what, source };
    let entries = std::fs::read_dir(&staging).map_err(io(format!(
        "read the jailed VMM's snapshot {}",
        staging.display()
    )))?;
    for e in entries {
        let e = e.map_err(io(format!("read {}", staging.display())))?;
        let from = e.path();
        let meta =
            std::fs::symlink_metadata(&from).map_err(io(format!("stat {}", from.display())))?;
        // The jail user owns the staging directory: take plain files only.
        if !meta.file_type().is_file() {
            return Err(Error::InvalidConfig(format!(
                "{} in the jailed VMM's snapshot is not a regular file",
                from.display()
            )));
        }
        let to = dir.join(e.file_name());
        if std::fs::rename(&from, &to).is_err() {
            // Another file system (the run directory is usually a tmpfs).
            std::fs::copy(&from, &to).map_err(io(format!(
                "copy {} to {}",
                from.display(),
                to.display()
            )))?;
        }
        std::os::unix::fs::chown(&to, Some(0), Some(0))
            .map_err(io(format!("chown {}", to.display())))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod {}", to.display())))?;
    }
    std::fs::remove_dir_all(&staging).map_err(io(format!("remove {}", staging.display())))
}

/// Lets the jail's group read the snapshot in `dir` (directory 0750, files
/// 0640, group `gid`, owner unchanged), so that a jailed VMM can restore it.
/// Nobody else gains access: the files hold guest memory.
pub fn grant_snapshot_read(dir: &Path, gid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: String| move |source| Error::Io { what, source };
    let set = |p: &Path, mode: u32| -> Result<()> {
        std::os::unix::fs::chown(p, None, Some(gid))
            .map_err(io(format!("chgrp {} to the jail group {gid}", p.display())))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("chmod {}", p.display())))
    };
    set(dir, 0o750)?;
    for e in std::fs::read_dir(dir).map_err(io(format!("read {}", dir.display())))? {
        let e = e.map_err(io(format!("read {}", dir.display())))?;
        if e.file_type().is_ok_and(|t| t.is_file()) {
            set(&e.path(), 0o640)?;
        }
    }
    Ok(())
}

/// Makes `run_dir` and the sockets in it owned by the jail's user (the runtime keeps
/// access as root).
fn hand_over_run_dir(run_dir: &Path, uid: u32, gid: u32) -> Result<()> {
    let chown = |p: &Path| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|source| Error::Io {
            what: format!("chown {} to the jail user {uid}:{gid}", p.display()),
            source,
        })
    };
    chown(run_dir)?;
    let entries = std::fs::read_dir(run_dir).map_err(|source| Error::Io {
        what: format!("read {}", run_dir.display()),
        source,
    })?;
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            chown(&e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_vmm_api as vmm_api;

    fn jailer() -> JailerConfig {
        JailerConfig {
            path: "/usr/local/bin/vessel-jailer".into(),
            uid: 900,
            gid: 901,
            jail_root: "/srv/vessel/jail".into(),
            cgroup_mem_mib: Some(512),
            cgroup_cpus: None,
        }
    }

    fn args(start: Start) -> Result<(String, Start)> {
        jailer_args(
            &jailer(),
            Path::new("/usr/local/bin/vessel-vmm"),
            "sb1",
            Path::new("/run/vessel/sb1"),
            start,
        )
        .map(|(a, s)| (a.join(" "), s))
    }

    fn config() -> vmm_api::VmConfig {
        let mut c: vmm_api::VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "/k/vmlinux",
            "initramfs": "/k/i.cpio.gz",
            "cmdline": "console=ttyS0 reboot=k",
            "mem_mib": 256,
            "serial_log": "/run/vessel/sb1/console.log",
            "vsock": {"uds": "/run/vessel/sb1/vsock.sock", "cid": 3},
            "fs": [{"socket": "/run/vessel/sb1/fs0.sock", "tag": "rootfs"}],
            "rng": true,
        }))
        .unwrap();
        c.net = vec!["fd=9,mac=02:00:00:00:00:01".parse().unwrap()];
        c
    }

    #[test]
    fn paths_are_rewritten_into_the_jail() {
        let (a, start) = args(Start::Boot(Box::new(config()))).unwrap();
        let (jailer, vmm) = a.split_once(" -- ").unwrap();
        assert_eq!(
            jailer,
            "--id sb1 --exec /usr/local/bin/vessel-vmm --uid 900 --gid 901 \
             --jail-root /srv/vessel/jail --die-with-parent --new-pid-ns \
             --rw-bind /run/vessel/sb1:/run/vessel --cgroup-mem-mib 512 \
             --ro-bind /k/vmlinux:/boot/kernel --ro-bind /k/i.cpio.gz:/boot/initramfs \
             --keep-fd 9"
        );
        assert_eq!(vmm, "--api-sock /run/vessel/vmm-api.sock");
        let Start::Boot(c) = start else {
            panic!("{start:?}")
        };
        let mut want = config();
        want.kernel = "/boot/kernel".into();
        want.initramfs = Some("/boot/initramfs".into());
        want.serial_log = Some("/run/vessel/console.log".into());
        want.vsock.as_mut().unwrap().uds = "/run/vessel/vsock.sock".into();
        want.fs[0].socket = "/run/vessel/fs0.sock".into();
        assert_eq!(*c, want, "only paths change; the tap keeps its fd number");
    }

    #[test]
    fn paths_outside_the_run_dir_and_unsupported_devices_are_refused() {
        let mut c = config();
        c.serial_log = Some("/var/log/c.log".into());
        let e = args(Start::Boot(Box::new(c))).unwrap_err();
        assert!(e.to_string().contains("outside the run directory"), "{e}");
        let mut c = config();
        c.block = vec!["/img".parse().unwrap()];
        let e = args(Start::Boot(Box::new(c))).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        let mut c = config();
        c.net = vec!["tap0".parse().unwrap()];
        let e = args(Start::Boot(Box::new(c))).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    }

    #[test]
    fn restore_binds_the_snapshot_read_only() {
        let (a, start) = args(Start::Restore {
            dir: "/var/lib/snap".into(),
            serial_log: "/run/vessel/sb1/console.log".into(),
            serial_log_limits: Default::default(),
            vsock_uds: "/run/vessel/sb1/vsock.sock".into(),
            fs_sockets: vec!["/run/vessel/sb1/fs0.sock".into()],
            net_fds: vec![7],
        })
        .unwrap();
        let (jailer, vmm) = a.split_once(" -- ").unwrap();
        assert!(
            jailer.ends_with("--ro-bind /var/lib/snap:/snapshot --keep-fd 7"),
            "{jailer}"
        );
        assert_eq!(vmm, "--api-sock /run/vessel/vmm-api.sock");
        assert_eq!(
            start,
            Start::Restore {
                dir: "/snapshot".into(),
                serial_log: "/run/vessel/console.log".into(),
                serial_log_limits: Default::default(),
                vsock_uds: "/run/vessel/vsock.sock".into(),
                fs_sockets: vec!["/run/vessel/fs0.sock".into()],
                net_fds: vec![7],
            }
        );
    }

    #[test]
    fn snapshot_files_are_moved_out_of_the_run_dir() {
        use std::os::unix::fs::PermissionsExt;
        let run = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let staging = run.path().join(SNAPSHOT_STAGING);
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(staging.join("state.json"), "{}").unwrap();
        std::fs::write(staging.join("memory"), [7u8; 4096]).unwrap();
        if nix::unistd::geteuid().is_root() {
            collect_snapshot(run.path(), out.path()).unwrap();
            assert!(!staging.exists());
            let m = std::fs::metadata(out.path().join("memory")).unwrap();
            assert_eq!((m.len(), m.permissions().mode() & 0o777), (4096, 0o600));
            assert!(out.path().join("state.json").is_file());
        }
        // A link planted by the VMM is refused.
        std::fs::create_dir_all(&staging).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", staging.join("memory")).unwrap();
        let e = collect_snapshot(run.path(), out.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn run_dir_and_its_sockets_are_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vsock.sock_1024");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::write(dir.path().join("plain"), "").unwrap();
        // Without root only a chown to oneself is allowed; it exercises the same path.
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        hand_over_run_dir(dir.path(), uid, gid).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&sock).unwrap();
        assert_eq!((m.uid(), m.gid()), (uid, gid));
    }

    #[test]
    fn a_missing_jailer_binary_is_named() {
        let mut j = jailer();
        j.path = "/nonexistent/vessel-jailer".into();
        let cfg = VmConfig {
            id: "a".into(),
            run_dir: "/r/a".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            kernel_args: vec![],
            vcpus: 1,
            memory_mib: 128,
            channel: crate::AgentChannel::Vsock,
            vsock_uds: "/r/a/v.sock".into(),
            console_log: "/r/a/c.log".into(),
            log_limits: Default::default(),
            shared_dirs: vec![],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        };
        let start = Start::Boot(Box::new(config()));
        let e = command(&j, Path::new("/v"), &cfg, start).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vessel-jailer"), "{e}");
    }
}
