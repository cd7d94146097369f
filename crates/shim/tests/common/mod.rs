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

    /// Gives CRI a pod network without touching the host's: a CNI plugin that
    /// configures nothing and reports eth0 with a fixed address (containerd
    /// needs one to run a pod that is not on the node's network; the Vessel
    /// VM is the pod's network anyway). containerd picks the configuration up
    /// within a moment: wait for CRI's NetworkReady before the first pod.
    pub fn fake_cni(&self) {
        use std::os::unix::fs::PermissionsExt;
        let cni = self.dir.path().join("c/cni");
        let plugin = cni.join("bin/vessel-test-cni");
        std::fs::write(
            &plugin,
            r#"#!/bin/sh
cat >/dev/null
case "$CNI_COMMAND" in
ADD) printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"10.88.0.2/16","interface":0}]}' "$CNI_IFNAME" "$CNI_NETNS" ;;
VERSION) printf '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}' ;;
esac
"#,
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // containerd adds a loopback network to every pod.
        let lo = cni.join("bin/loopback");
        if !lo.exists() {
            std::os::unix::fs::symlink(&plugin, &lo).unwrap();
        }
        std::fs::write(
            cni.join("conf/10-vessel-test.conflist"),
            r#"{"cniVersion":"0.4.0","name":"vessel-test","plugins":[{"type":"vessel-test-cni"}]}"#,
        )
        .unwrap();
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
