//! An image config mapped onto a runtime `config.json`, as Docker does:
//! process args are the entrypoint followed by the command (given on the
//! command line, else the image's `Cmd`), env from the image (PATH added
//! when missing), `User` as uid[:gid] with names looked up in the image's
//! own `/etc/passwd` and `/etc/group` (read beneath the rootfs, never
//! through a symlink out of it), `WorkingDir` as cwd. The rest is runc's
//! default spec with Docker's default capabilities and a writable root.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use oci_spec::image::ImageConfiguration;
use serde_json::{json, Value};

use super::ImageError;

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ID_FILE: u64 = 1 << 20;

/// Docker's default capability set.
const CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// What the command line adds to the image's config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replaces the image's `Cmd` when not empty (the entrypoint stays).
    pub args: Vec<String>,
    /// Run the process on a terminal.
    pub terminal: bool,
    /// The network namespace to join; `None`: a new one (loopback only).
    pub netns: Option<PathBuf>,
    /// The container's hostname.
    pub hostname: String,
}

/// runc's default config.json (`vessel spec`): terminal on, `sh`.
pub fn default_spec() -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [DEFAULT_PATH, "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "effective": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "permitted": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
                "ambient": ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// The bundle's config.json for an image whose rootfs is unpacked at `rootfs`.
pub fn bundle_spec(
    image: &ImageConfiguration,
    rootfs: &Path,
    opts: &RunOptions,
) -> Result<Value, ImageError> {
    let config = image.config().clone().unwrap_or_default();
    let mut args: Vec<String> = config.entrypoint().clone().unwrap_or_default();
    if opts.args.is_empty() {
        args.extend(config.cmd().clone().unwrap_or_default());
    } else {
        args.extend(opts.args.iter().cloned());
    }
    if args.is_empty() {
        return Err(ImageError::Config(
            "the image has no entrypoint or cmd: give the command after the container id".into(),
        ));
    }
    let mut env: Vec<String> = config.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.into());
    }
    if opts.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    let user = config.user().clone().unwrap_or_default();
    let (uid, gid) = resolve_user(&user, &|name| read_beneath(rootfs, name))?;
    let cwd = config
        .working_dir()
        .clone()
        .filter(|w| w.starts_with('/'))
        .unwrap_or_else(|| "/".into());

    let mut spec = default_spec();
    let p = &mut spec["process"];
    p["terminal"] = json!(opts.terminal);
    p["args"] = json!(args);
    p["env"] = json!(env);
    p["cwd"] = json!(cwd);
    p["user"] = json!({"uid": uid, "gid": gid});
    for set in ["bounding", "effective", "permitted"] {
        p["capabilities"][set] = json!(CAPS);
    }
    p["capabilities"]
        .as_object_mut()
        .expect("default spec has capabilities")
        .remove("ambient");
    spec["root"]["readonly"] = json!(false);
    spec["hostname"] = json!(opts.hostname);
    if let Some(ns) = &opts.netns {
        for n in spec["linux"]["namespaces"]
            .as_array_mut()
            .expect("default spec has namespaces")
        {
            if n["type"] == "network" {
                n["path"] = json!(ns);
            }
        }
    }
    Ok(spec)
}

/// `User` of an image config (`""`, `uid`, `name`, `uid:gid`,
/// `name:group`, ...) as numbers; `read` gives the image's `etc/passwd` or
/// `etc/group` (`None`: absent). A name that is not there is an error; a
/// uid alone takes its primary group from passwd, else 0.
pub fn resolve_user(
    user: &str,
    read: &dyn Fn(&str) -> Option<String>,
) -> Result<(u32, u32), ImageError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read("etc/passwd").unwrap_or_default();
    // name:x:uid:gid:...
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .as_ref()
            .and_then(|f| f[2].parse().ok())
            .ok_or_else(|| {
                ImageError::Config(format!("user {u:?} is not in the image's /etc/passwd"))
            })?,
    };
    let gid = match g {
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read("etc/group")
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    ImageError::Config(format!("group {g:?} is not in the image's /etc/group"))
                })?,
        },
    };
    Ok((uid, gid))
}

/// A small file of the rootfs, opened with `RESOLVE_IN_ROOT` (a symlink
/// planted by the image resolves inside it), regular files only, capped.
fn read_beneath(rootfs: &Path, rel: &str) -> Option<String> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // SAFETY: open(2) just returned this fd and nothing else owns it.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(root.as_raw_fd(), rel, how).ok()?;
    // SAFETY: openat2(2) just returned this fd and nothing else owns it.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(MAX_ID_FILE).read_to_string(&mut s).ok()?;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/false\nsvc:x:1000:1001::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\nstaff:x:50:\n";

    fn files(name: &str) -> Option<String> {
        match name {
            "etc/passwd" => Some(PASSWD.into()),
            "etc/group" => Some(GROUP.into()),
            _ => None,
        }
    }

    #[test]
    fn users_map_to_numbers_through_the_images_files() {
        assert_eq!(resolve_user("", &files).unwrap(), (0, 0));
        assert_eq!(resolve_user("www-data", &files).unwrap(), (33, 33));
        assert_eq!(resolve_user("svc", &files).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("1000", &files).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("4242", &files).unwrap(), (4242, 0));
        assert_eq!(resolve_user("svc:staff", &files).unwrap(), (1000, 50));
        assert_eq!(resolve_user("7:8", &files).unwrap(), (7, 8));
        assert!(resolve_user("nobody-here", &files).is_err());
        assert!(resolve_user("svc:nogroup", &files).is_err());
    }

    fn image(config: Value) -> ImageConfiguration {
        serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "config": config
        }))
        .unwrap()
    }

    #[test]
    fn entrypoint_cmd_env_and_workdir_become_the_process() {
        let d = tempfile::tempdir().unwrap();
        let img = image(json!({
            "Entrypoint": ["/usr/sbin/nginx"], "Cmd": ["-g", "daemon off;"],
            "Env": ["A=1"], "WorkingDir": "/srv"
        }));
        let opts = RunOptions {
            hostname: "web".into(),
            netns: Some("/run/netns/x".into()),
            ..Default::default()
        };
        let s = bundle_spec(&img, d.path(), &opts).unwrap();
        let p = &s["process"];
        assert_eq!(p["args"], json!(["/usr/sbin/nginx", "-g", "daemon off;"]));
        assert_eq!(p["env"], json!([DEFAULT_PATH, "A=1"]));
        assert_eq!(p["cwd"], "/srv");
        assert_eq!(p["terminal"], false);
        assert_eq!(s["root"]["readonly"], false);
        assert_eq!(s["hostname"], "web");
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert!(ns.contains(&json!({"type": "network", "path": "/run/netns/x"})));
        // Given args replace Cmd, not the entrypoint.
        let opts = RunOptions {
            args: vec!["-v".into()],
            ..Default::default()
        };
        let s = bundle_spec(&img, d.path(), &opts).unwrap();
        assert_eq!(s["process"]["args"], json!(["/usr/sbin/nginx", "-v"]));
    }

    #[test]
    fn an_image_without_a_command_needs_one() {
        let d = tempfile::tempdir().unwrap();
        let img = image(json!({"Env": ["PATH=/bin"]}));
        assert!(bundle_spec(&img, d.path(), &RunOptions::default()).is_err());
        let opts = RunOptions {
            args: vec!["sh".into()],
            ..Default::default()
        };
        let s = bundle_spec(&img, d.path(), &opts).unwrap();
        assert_eq!(s["process"]["env"], json!(["PATH=/bin"]));
        assert_eq!(s["process"]["cwd"], "/");
    }

    #[test]
    fn the_user_is_looked_up_beneath_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // etc/passwd is a symlink to the host's file: resolved inside the
        // rootfs it is missing, so the name is unknown.
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/passwd")).unwrap();
        let img = image(json!({"User": "root", "Cmd": ["sh"]}));
        assert!(bundle_spec(&img, &root, &RunOptions::default()).is_err());
        std::fs::remove_file(root.join("etc/passwd")).unwrap();
        std::fs::write(root.join("etc/passwd"), PASSWD).unwrap();
        let img = image(json!({"User": "www-data", "Cmd": ["sh"]}));
        let s = bundle_spec(&img, &root, &RunOptions::default()).unwrap();
        assert_eq!(s["process"]["user"], json!({"uid": 33, "gid": 33}));
    }
}
