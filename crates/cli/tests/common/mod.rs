//! Shared set-up for end-to-end tests of the `vessel` CLI with real guests
//! (QEMU backend). Missing prerequisites skip loudly, and fail in CI.

#![allow(dead_code)]

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VESSEL: &str = env!("CARGO_BIN_EXE_vessel");

pub struct Env {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub config: PathBuf,
}

/// A state root and config pointing at the guest from `make guest`, or
/// `None` (loudly) when a prerequisite is missing outside CI.
pub fn env() -> Option<Env> {
    let guest = vessel_testutil::guest_dir();
    let (kernel, initramfs) = (guest.join("vmlinux"), guest.join("initramfs.cpio.gz"));
    let mut missing: Vec<String> = [
        kernel.clone(),
        initramfs.clone(),
        "/usr/bin/qemu-system-x86_64".into(),
        "/usr/local/bin/vhost-device-vsock".into(),
        "/usr/local/bin/virtiofsd".into(),
        "/bin/busybox".into(),
    ]
    .iter()
    .filter(|p| !p.is_file())
    .map(|p| p.display().to_string())
    .collect();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".into());
    }
    if !missing.is_empty() {
        vessel_testutil::skip(
            "this test",
            &format!(
                "it boots real guests and needs: {} (run `make guest deps` as root)",
                missing.join(", ")
            ),
        );
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("vt")
        .tempdir_in("/tmp")
        .unwrap();
    let root = dir.path().join("r");
    let config = dir.path().join("config.toml");
    vessel_testutil::write_config(&config, &root, &guest);
    Some(Env { dir, root, config })
}

impl Env {
    /// A busybox bundle running `args` (non-terminal, writable root; the
    /// config from `vessel spec`); `edit` adjusts config.json. Built here in
    /// one process, not with tests/support/busybox-bundle.sh (which makes the
    /// same bundle for `make demo` and the benches): in the KVM lane every exec
    /// costs about 0.1 s, and the script's ~270 `ln` and two Python starts
    /// took about a minute per bundle.
    pub fn bundle(
        &self,
        name: &str,
        args: &[&str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> PathBuf {
        let b = self.dir.path().join(name);
        busybox_rootfs(&b.join("rootfs"));
        let o = Command::new(VESSEL)
            .args(["spec", "--bundle"])
            .arg(&b)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "vessel spec: {}", text(&o));
        let p = b.join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c["process"]["terminal"] = false.into();
        c["process"]["args"] = args.into();
        c["root"]["readonly"] = false.into();
        edit(&mut c);
        std::fs::write(&p, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
        b
    }

    /// An executable that runs `vessel --config <this config> ARGS`: the
    /// `--runtime` for podman. conmon does not pass the environment on, and
    /// the cleanup podman that conmon starts when the container exits (it may
    /// be the one that runs `delete --force`) gets `--runtime` but not
    /// `--runtime-flag`, so a flag would leave that delete looking in the
    /// default state root.
    pub fn runtime_script(&self) -> PathBuf {
        let path = self.dir.path().join("vessel-runtime");
        if !path.exists() {
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\nexec {VESSEL} --config {} \"$@\"\n",
                    self.config.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        path
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(VESSEL);
        c.arg("--config")
            .arg(&self.config)
            .arg("--root")
            .arg(&self.root);
        c
    }

    /// Runs `vessel <args>` with stdin from /dev/null; returns the output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `vessel create` with stdout/stderr to files (the supervisor keeps
    /// them open until the container exits, as runc's container process does).
    pub fn create(&self, id: &str, bundle: &Path) -> (PathBuf, PathBuf) {
        let (out, err) = (
            self.dir.path().join(format!("{id}.out")),
            self.dir.path().join(format!("{id}.err")),
        );
        let st = self
            .cmd()
            .args(["create", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "create {id}: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        (out, err)
    }

    pub fn state(&self, id: &str) -> Option<serde_json::Value> {
        let o = self.run(&["state", id]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    pub fn status(&self, id: &str) -> String {
        self.state(id)
            .map(|s| s["status"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "gone".into())
    }

    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) {
        assert!(
            wait_until(timeout, || self.status(id) == want),
            "{id} never became {want} (is {})",
            self.status(id)
        );
    }

    /// Asserts nothing of container `id` is left: state dir, processes, mounts.
    pub fn assert_clean(&self, id: &str) {
        let dir = self.root.join(id);
        assert!(!dir.exists(), "{} left behind", dir.display());
        let needle = format!("{}/", dir.display());
        assert!(
            wait_until(Duration::from_secs(10), || processes_mentioning(&needle)
                .is_empty()),
            "processes left: {:?}",
            processes_mentioning(&needle)
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&needle), "mounts left under {needle}");
        let netns = self.root.join("netns").join(id);
        assert!(!netns.exists(), "{} left behind", netns.display());
    }
}

/// A failed test must not leave VMs running: force-delete what is left.
impl Drop for Env {
    fn drop(&mut self) {
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = self
                .cmd()
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .output();
        }
    }
}

/// Busybox's root filesystem at `root`: /bin/busybox (static) with a symlink
/// per applet, /etc/passwd and /etc/group with root and nobody, empty /tmp,
/// /proc, /sys and /dev (as tests/support/busybox-bundle.sh makes it).
pub fn busybox_rootfs(root: &Path) {
    const BUSYBOX: &str = "/bin/busybox";
    let elf = std::fs::read(BUSYBOX).unwrap();
    assert!(
        !has_interpreter(&elf),
        "{BUSYBOX} is not static (apt-get install busybox-static)"
    );
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    assert!(list.status.success(), "busybox --list: {}", text(&list));
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        let link = root.join("bin").join(applet);
        if !applet.is_empty() && !applet.contains('/') && !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

/// Whether the 64-bit little-endian ELF `elf` names a program interpreter
/// (PT_INTERP): a dynamically linked executable, which a busybox rootfs
/// without libraries cannot run.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a 64-bit LE ELF file"
    );
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// Detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// What a state root still holds for containers: its entries, except the runtime's shared
/// bookkeeping directories (`netns`, `.locks`, `wired`), whose own entries (a namespace, a
/// lock file, a wiring record of some container) are listed as `dir/name`, and the
/// templates (`templates`: kept for the next sandbox of their shape, by design).
pub fn state_left(root: &Path) -> Vec<String> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let mut left = Vec::new();
    for n in names(root) {
        if n == "templates" {
            continue;
        }
        if matches!(n.as_str(), "netns" | ".locks" | "wired" | "images") {
            left.extend(
                names(&root.join(&n))
                    .into_iter()
                    .map(|m| format!("{n}/{m}")),
            );
        } else {
            left.push(n);
        }
    }
    left
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Everything read from a pty master, collected by a thread.
pub struct Reader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    got: Vec<u8>,
}

impl Reader {
    pub fn new(f: OwnedFd) -> Reader {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::from(f);
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Reader {
            rx,
            got: Vec::new(),
        }
    }

    /// Reads until `want` appears or `timeout`; returns all text so far.
    pub fn until(&mut self, want: &str, timeout: Duration) -> String {
        let start = Instant::now();
        while start.elapsed() < timeout && !String::from_utf8_lossy(&self.got).contains(want) {
            if let Ok(b) = self.rx.recv_timeout(Duration::from_millis(100)) {
                self.got.extend(b);
            }
        }
        String::from_utf8_lossy(&self.got).into_owned()
    }
}

pub use vessel_testutil::{processes_mentioning, wait_until};

/// A terminal window size of `rows` x `cols`.
pub fn winsize(rows: u16, cols: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Compiles the C program `source` statically into `<rootfs>/probe`; the source goes
/// beside the rootfs, not into it.
pub fn build_probe(rootfs: &Path, source: &str) {
    let src = rootfs.join("../probe.c");
    std::fs::write(&src, source).unwrap();
    let o = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("probe"))
        .arg(&src)
        .output()
        .expect("gcc (build-essential, from make deps)");
    assert!(o.status.success(), "gcc: {}", text(&o));
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
