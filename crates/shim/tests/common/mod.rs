//! A private containerd 1.6 (tests/support/containerd-harness.sh) with the
//! shim under test on its PATH and a Vessel config pointing at `make guest`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub const IMAGE: &str = "localhost/vessel-busybox:latest";
pub const RUNTIME: &str = "io.containerd.vessel.v2";

use vessel_testutil::{guest_dir, repo};

/// A running containerd; stopped (and its directory cleaned) on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub state_root: PathBuf,
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    let guest = guest_dir();
    for p in [
        guest.join("vmlinux"),
        guest.join("initramfs.cpio.gz"),
        "/usr/bin/qemu-system-x86_64".into(),
        "/usr/local/bin/vhost-device-vsock".into(),
        "/usr/local/bin/virtiofsd".into(),
        "/usr/bin/containerd".into(),
        "/usr/bin/ctr".into(),
        "/usr/bin/umoci".into(),
        "/usr/bin/skopeo".into(),
        "/bin/busybox".into(),
    ] {
        if !p.exists() {
            missing.push(p.display().to_string());
        }
    }
    if nix::unistd::geteuid().as_raw() != 0 {
        missing.push("root".into());
    }
    missing
}

impl Containerd {
    /// Starts containerd, or returns `None` (loudly) when prerequisites are
    /// missing outside CI. In CI a missing prerequisite fails the test.
    pub fn start() -> Option<Containerd> {
        let missing = missing_prerequisites();
        if !missing.is_empty() {
            vessel_testutil::skip(
                "this test",
                &format!(
                    "it runs containerd with the Vessel shim and needs: {} (run `make deps guest` as root)",
                    missing.join(", ")
                ),
            );
            return None;
        }
        // Short paths: Unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("vc")
            .tempdir_in("/tmp")
            .unwrap();
        let state_root = dir.path().join("s");
        let guest = guest_dir();
        let config = dir.path().join("vessel.toml");
        vessel_testutil::write_config(&config, &state_root, &guest);
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-vessel-v2"));
        let images = vessel_testutil::image_dir();
        let out = Command::new(repo().join("tests/support/containerd-harness.sh"))
            .args(["start"])
            .arg(dir.path().join("c"))
            .env("VESSEL_SHIM_DIR", shim.parent().unwrap())
            .env("VESSEL_CONFIG", &config)
            .env("VESSEL_IMAGE_DIR", &images)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "harness start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sock = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Containerd {
            dir,
            sock,
            state_root,
        })
    }

    /// `ctr -a <sock> -n <ns> args...`
    pub fn ctr_ns(&self, ns: &str, args: &[&str]) -> Output {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap();
        eprintln!(
            "ctr {}: {} stdout={:?} stderr={:?}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_ns("default", args)
    }

    /// Real CNI for CRI and `ctr run --cni`: Debian's bridge, host-local,
    /// loopback and portmap plugins, one bridge network `name` on bridge
    /// `bridge` (made in the host namespace by the plugin, removed by the
    /// returned guard) with `subnet` (a /24: `<net>.0/24`, gateway `<net>.1`
    /// on the bridge). IP allocations stay in this containerd's directory.
    pub fn real_cni(&self, name: &str, bridge: &str, net: &str) -> Bridge {
        let cni = self.dir.path().join("c/cni");
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            let link = cni.join("bin").join(plugin);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(PathBuf::from("/usr/lib/cni").join(plugin), &link).unwrap();
        }
        let data = self.dir.path().join("c/cni/data");
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": name,
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                 "hairpinMode": true,
                 "ipam": {"type": "host-local", "dataDir": data,
                          "ranges": [[{"subnet": format!("{net}.0/24"), "gateway": format!("{net}.1")}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}
            ]
        });
        std::fs::write(
            cni.join(format!("conf/10-{name}.conflist")),
            serde_json::to_vec_pretty(&conf).unwrap(),
        )
        .unwrap();
        Bridge(bridge.to_string())
    }

    /// `ctr ... args` with CNI's fixed directories (/etc/cni/net.d,
    /// /opt/cni/bin: `ctr run --cni` has no flags for them) bound to this
    /// containerd's CNI directories in a private mount namespace.
    pub fn ctr_with_cni(&self, args: &[&str]) -> Output {
        let cni = self.dir.path().join("c/cni");
        let out = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount --bind \"$1/conf\" /etc/cni/net.d && mount -t tmpfs tmpfs /opt && \
                 mkdir -p /opt/cni/bin && mount --bind \"$1/bin\" /opt/cni/bin && \
                 shift && exec ctr \"$@\"",
            )
            .arg("sh")
            .arg(&cni)
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap();
        eprintln!(
            "ctr (cni) {}: {} stdout={:?} stderr={:?}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The task pid `ctr -n <ns> task ls` shows for `id`.
    pub fn task_pid(&self, ns: &str, id: &str) -> String {
        let ls = String::from_utf8_lossy(&self.ctr_ns(ns, &["task", "ls"]).stdout).to_string();
        ls.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("no task {id}: {ls}"))
            .to_string()
    }

    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("c/containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("tests/support/containerd-harness.sh"))
            .arg("stop")
            .arg(self.dir.path().join("c"))
            .status();
    }
}

/// A bridge in the host namespace made by CNI's bridge plugin; removed on
/// drop (its veths go with the pods' namespaces).
pub struct Bridge(pub String);

impl Bridge {
    /// The bridge's ports (veths of pods still attached).
    pub fn ports(&self) -> String {
        let o = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A subnet (`10.245.<n>`) and a bridge name of this test process (`tag`
/// tells its networks apart).
pub fn test_net(tag: u32) -> (String, String) {
    let pid = std::process::id();
    (
        format!("10.245.{}", (pid * 3 + tag) % 250),
        format!("vb{}n{tag}", pid % 100_000),
    )
}

/// The body of `url` fetched from the host (curl, 3 s), or `None`.
pub fn host_get(url: &str) -> Option<String> {
    let o = Command::new("curl")
        .args(["-sf", "-m", "3", url])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The inode of `/proc/<pid>/ns/net` (`pid` may be `self`).
pub fn netns_inode(pid: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

/// A pod's network namespace, held by a bind mount of the test's own so that
/// it can still be inspected after the runtime and CNI are done with it.
pub struct PodNetns {
    path: PathBuf,
    /// The name its creator gave it under /var/run/netns, if any.
    named: Option<PathBuf>,
}

impl PodNetns {
    /// Holds the network namespace of host process `pid`, which must not be
    /// the host's.
    pub fn hold(c: &Containerd, pid: &str) -> PodNetns {
        use std::os::unix::fs::MetadataExt;
        let ino = netns_inode(pid);
        assert_ne!(
            ino,
            netns_inode("self"),
            "task pid {pid} is in the host's network namespace"
        );
        let path = c.dir.path().join(format!("netns-{pid}"));
        std::fs::write(&path, "").unwrap();
        let ok = Command::new("mount")
            .arg("--bind")
            .arg(format!("/proc/{pid}/ns/net"))
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "bind-mount the network namespace of {pid}");
        let named = std::fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino));
        eprintln!("holding the network namespace of pid {pid} ({named:?})");
        PodNetns { path, named }
    }

    fn run(&self, args: &[&str]) -> String {
        let o = Command::new("nsenter")
            .arg(format!("--net={}", self.path.display()))
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ip -o link` inside.
    pub fn links(&self) -> String {
        self.run(&["ip", "-o", "link"])
    }

    /// `tc qdisc show` inside.
    pub fn qdiscs(&self) -> String {
        self.run(&["tc", "qdisc", "show"])
    }

    /// `tc filter show dev <dev> ingress` inside.
    pub fn filters(&self, dev: &str) -> String {
        self.run(&["tc", "filter", "show", "dev", dev, "ingress"])
    }

    /// After the pod is gone: only loopback is left inside (no tap, no veth,
    /// so no tc filter either), no ingress qdisc, and the namespace's name
    /// is gone.
    pub fn assert_empty(self) {
        let links = self.links();
        let names: Vec<&str> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
            .collect();
        assert_eq!(names, ["lo"], "links left in the pod's namespace: {links}");
        assert!(
            !self.qdiscs().contains("ingress"),
            "qdiscs left: {}",
            self.qdiscs()
        );
        if let Some(named) = &self.named {
            assert!(!named.exists(), "namespace {named:?} left behind");
        }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Mount points whose path mentions `needle`.
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.contains(needle))
        .map(str::to_string)
        .collect()
}

pub use vessel_testutil::{processes_mentioning, wait_until};

pub mod cri;
pub mod leaks;
pub mod workload;
