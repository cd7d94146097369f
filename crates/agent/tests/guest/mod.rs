//! Boots the real guest (kernel + initramfs with the static agent) in QEMU/TCG
//! with vhost-user-vsock (`vhost-device-vsock`) and a busybox rootfs on 9p, and
//! talks to the agent like the host runtime will: ttrpc on vsock 1024, stdio
//! streams on vsock 1026, both through the hybrid-vsock Unix socket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use ttrpc::r#async::transport::Socket;
use vessel_protocol::agent_ttrpc::AgentClient;
use vessel_protocol::hybrid_vsock::handshake;
use vessel_protocol::ports::{AGENT_VSOCK_PORT, READY_MAGIC, READY_VSOCK_PORT, STDIO_VSOCK_PORT};
use vessel_protocol::stdio::{StdioHeader, StdioStream};

/// Guest path where the rootfs share is mounted.
pub const ROOTFS: &str = "/run/vessel/rootfs0";

/// virtio-fs tag of the same directory, when virtiofsd is available.
pub const VIRTIOFS_TAG: &str = "vfs0";

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Guest {
    pub agent: AgentClient,
    pub rootfs: PathBuf,
    /// The rootfs is also shared over virtio-fs with tag [`VIRTIOFS_TAG`]
    /// (when virtiofsd is installed).
    pub virtiofs: bool,
    _procs: Procs,
    pub dir: tempfile::TempDir,
}

/// QEMU and the vsock backend; killed when the test ends (or panics).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// What the test needs from the machine, or why it cannot run.
struct Inputs {
    kernel: PathBuf,
    agent: PathBuf,
    busybox: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}

fn inputs() -> Result<Inputs, String> {
    let root = repo_root();
    let kernel = root.join("build/guest/vmlinux");
    if !kernel.is_file() {
        return Err(format!("no guest kernel at {}", kernel.display()));
    }
    let agent = std::env::var_os("VESSEL_GUEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target-agent/x86_64-unknown-linux-gnu/release/vessel-agent"));
    if !agent.is_file() {
        return Err(format!(
            "no static agent at {} (build it with crt-static, see ARCHITECTURE.md, or set VESSEL_GUEST_AGENT)",
            agent.display()
        ));
    }
    warn_if_stale(&agent, &root.join("crates/agent/src"));
    for tool in ["qemu-system-x86_64", "vhost-device-vsock"] {
        which(tool).ok_or_else(|| format!("{tool} not on PATH"))?;
    }
    let busybox = which("busybox").ok_or("busybox (busybox-static) not on PATH")?;
    Ok(Inputs {
        kernel,
        agent,
        busybox,
    })
}

/// The test runs a prebuilt static agent: say so when it predates the sources.
fn warn_if_stale(agent: &Path, src: &Path) {
    fn newest(dir: &Path) -> Option<std::time::SystemTime> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let p = e.path();
                if p.is_dir() {
                    newest(&p)
                } else {
                    e.metadata().ok()?.modified().ok()
                }
            })
            .max()
    }
    let built = std::fs::metadata(agent).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(src)) = (built, newest(src)) {
        if src > built {
            eprintln!(
                "WARNING: {} is older than crates/agent/src: rebuild the static agent",
                agent.display()
            );
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn make_rootfs(dir: &Path, busybox: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "data"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "true", "false", "id", "hostname", "mkdir", "touch", "head",
        "ls", "tty", "dd", "pwd", "env", "uname", "stty", "test", "nc", "seq", "ip",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

/// Boots a guest, or returns why the test must be skipped.
pub async fn boot() -> Result<Guest, String> {
    let inp = inputs()?;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rootfs = d.join("rootfs");
    make_rootfs(&rootfs, &inp.busybox);

    let initrd = d.join("initrd.cpio.gz");
    let st = Command::new(repo_root().join("guest/initramfs/build.sh"))
        .arg(&inp.agent)
        .arg(&initrd)
        .status()
        .unwrap();
    assert!(st.success(), "initramfs build failed");

    let vhu = d.join("vhu.sock");
    let uds = d.join("vsock.sock");
    let mut procs = Procs(Vec::new());
    let vsock = Command::new("vhost-device-vsock")
        .arg("--vm")
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhu.display(),
            uds.display()
        ))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("vhost-vsock.log")).unwrap())
        .spawn()
        .unwrap();
    procs.0.push(vsock);
    assert!(
        wait_until(Duration::from_secs(10), || vhu.exists()),
        "vhost-device-vsock did not create {}",
        vhu.display()
    );
    // The agent connects here once its API is up.
    let ready = UnixListener::bind(format!("{}_{READY_VSOCK_PORT}", uds.display())).unwrap();

    // The same rootfs over virtio-fs too, as the host runtime shares it.
    let vfs_sock = d.join("virtiofsd.sock");
    let virtiofs = match which("virtiofsd") {
        Some(bin) => {
            let child = Command::new(bin)
                .arg(format!("--socket-path={}", vfs_sock.display()))
                .arg(format!("--shared-dir={}", rootfs.display()))
                .arg("--cache=auto")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(d.join("virtiofsd.log")).unwrap())
                .spawn()
                .unwrap();
            procs.0.push(child);
            assert!(
                wait_until(Duration::from_secs(10), || vfs_sock.exists()),
                "virtiofsd did not create its socket"
            );
            true
        }
        None => {
            eprintln!("virtiofsd not installed: virtio-fs case skipped");
            false
        }
    };
    let mut vfs_args: Vec<String> = Vec::new();
    if virtiofs {
        vfs_args.extend([
            "-chardev".into(),
            format!("socket,id=vfs,path={}", vfs_sock.display()),
            "-device".into(),
            format!("vhost-user-fs-pci,chardev=vfs,tag={VIRTIOFS_TAG}"),
        ]);
    }

    let console = d.join("console.log");
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-m", "512M", "-smp", "1", "-cpu", "max"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-machine", "q35,accel=tcg,memory-backend=mem"])
        .arg("-kernel")
        .arg(&inp.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .arg("-chardev")
        .arg(format!("socket,id=vs,path={}", vhu.display()))
        .args(["-device", "vhost-user-vsock-pci,chardev=vs"])
        .arg("-fsdev")
        .arg(format!(
            "local,id=fs0,path={},security_model=passthrough",
            rootfs.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=fs0,mount_tag=rootfs0"])
        .args(&vfs_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("qemu.log")).unwrap())
        .spawn()
        .unwrap();
    procs.0.push(qemu);

    let wait_ready = async {
        let (mut s, _) = ready.accept().await?;
        let mut line = String::new();
        s.read_to_string(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let qemu_exit = async {
        loop {
            if let Ok(Some(st)) = procs.0.last_mut().expect("qemu runs").try_wait() {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let wait_ready = async {
        tokio::select! {
            r = wait_ready => r,
            st = qemu_exit => Err(std::io::Error::other(format!("QEMU exited: {st}"))),
        }
    };
    let line = match tokio::time::timeout(BOOT_TIMEOUT, wait_ready).await {
        Ok(Ok(line)) => line,
        other => panic!(
            "agent not ready ({other:?}); console:\n{}\nqemu:\n{}\nvhost-device-vsock:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default(),
            std::fs::read_to_string(d.join("qemu.log")).unwrap_or_default(),
            std::fs::read_to_string(d.join("vhost-vsock.log")).unwrap_or_default(),
        ),
    };
    assert!(line.starts_with(READY_MAGIC), "bad ready line {line:?}");
    let api = connect(&uds, AGENT_VSOCK_PORT).await;
    Ok(Guest {
        agent: AgentClient::new(ttrpc::r#async::Client::new(Socket::new(api))),
        rootfs,
        virtiofs,
        _procs: procs,
        dir,
    })
}

async fn connect(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), handshake(&mut s, port))
        .await
        .expect("hybrid vsock handshake timed out")
        .expect("hybrid vsock handshake");
    s
}

impl Guest {
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    async fn connect(&self, port: u32) -> UnixStream {
        connect(&self.dir.path().join("vsock.sock"), port).await
    }

    /// Opens a stdio stream; returns the agent's reply line and the stream.
    pub async fn stdio_raw(&self, header: &[u8]) -> (String, UnixStream) {
        let mut s = self.connect(STDIO_VSOCK_PORT).await;
        s.write_all(header).await.unwrap();
        let reply = read_line(&mut s).await;
        (reply, s)
    }

    /// Opens a stdio stream and asserts the agent accepted it.
    pub async fn stdio(
        &self,
        container: &str,
        exec: Option<&str>,
        stream: StdioStream,
    ) -> UnixStream {
        let h = StdioHeader {
            container_id: container.into(),
            exec_id: exec.map(Into::into),
            stream,
        };
        let (reply, s) = self.stdio_raw(h.to_string().as_bytes()).await;
        assert_eq!(reply, "OK", "stdio {h}");
        s
    }
}

async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), r.read(&mut b))
            .await
            .expect("reply timed out")
            .unwrap();
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8_lossy(&line).into_owned();
        }
        line.push(b[0]);
    }
}

/// Reads a stream to its end (with a timeout).
pub async fn read_all(mut s: UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut out))
        .await
        .expect("stream did not end")
        .unwrap();
    out
}
