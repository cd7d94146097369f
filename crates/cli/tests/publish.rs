//! End-to-end: podman and docker publish a container's port on the host
//! (`-p HOSTPORT:80`) with `vessel` as their runtime. Each client sets up the
//! network its own way (podman 4.3: CNI's bridge and portmap plugins in a
//! namespace it made; docker 20.10: libnetwork's bridge driver, configured by
//! its prestart hook in the namespace vessel made, and docker-proxy). vessel
//! wires the namespace's interface to the VM (tap + tc redirect) and busybox
//! httpd answers from inside the VM. After each test nothing of it is left:
//! tap, tc filter (both inside the namespace), namespace, host veth, iptables
//! rule, process, mount or state directory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{env, processes_mentioning, text, unmount_under, wait_until, Env, VESSEL};

/// TCG boot plus httpd start, under load.
const T: Duration = Duration::from_secs(90);
const IMAGE: &str = "localhost/vessel-busybox:latest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether every tool is installed; when one is missing the test does not run,
/// loudly, and fails in CI.
fn have(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    vessel_testutil::skip(
        "this test",
        &format!(
            "missing {}: run `make deps` (scripts/install-deps.sh installs Debian's podman, \
             docker.io, iptables and containernetworking-plugins)",
            missing.join(", ")
        ),
    );
    false
}

fn images() -> PathBuf {
    let o = Command::new(repo().join("tests/support/busybox-image.sh"))
        .arg(vessel_testutil::image_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "busybox-image.sh: {}", text(&o));
    vessel_testutil::image_dir().join("busybox-docker.tar")
}

/// The body of `GET /` from 127.0.0.1:`port`, if it answers with 200.
fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    (status.starts_with("HTTP/1.") && status.split(' ').nth(1) == Some("200"))
        .then(|| body.to_string())
}

/// The shell command that serves `page` as / on port 80.
fn httpd(page: &str) -> String {
    format!("mkdir -p /www && echo {page} > /www/index.html && exec httpd -f -p 80 -h /www")
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// What the test checks of the running container's network, and after it is
/// gone: its namespace (a bind-mounted nsfs file) is the VMM's, holds a
/// `tap*` device and an ingress mirred redirect on `eth0`, and eth0's peer is
/// the host veth with ifindex `host_veth`.
struct Wired {
    netns: PathBuf,
    host_veth: u32,
}

fn in_netns(netns: &Path, args: &[&str]) -> String {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .unwrap();
    ok(
        o,
        &format!("nsenter {}: {}", netns.display(), args.join(" ")),
    )
}

fn check_wired(netns: &Path, vmm_pid: u32) -> Wired {
    let ns = std::fs::metadata(netns).unwrap();
    let vmm = std::fs::metadata(format!("/proc/{vmm_pid}/ns/net")).unwrap();
    assert_eq!(
        (ns.dev(), ns.ino()),
        (vmm.dev(), vmm.ino()),
        "the task pid {vmm_pid} is not in the container's namespace {}",
        netns.display()
    );
    let host = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_ne!(ns.ino(), host.ino(), "the container got the host namespace");
    let links = in_netns(netns, &["ip", "-o", "link"]);
    assert!(links.contains(": tap"), "no tap in the namespace:\n{links}");
    let filters = in_netns(netns, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("mirred (Egress Redirect to device tap"),
        "no redirect from eth0 to the tap:\n{filters}"
    );
    // "2: eth0@if123: ..." names the host end's ifindex.
    let eth0 = in_netns(netns, &["ip", "-o", "link", "show", "eth0"]);
    let host_veth = eth0
        .split_once("eth0@if")
        .and_then(|(_, r)| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("eth0 is not a veth: {eth0}"));
    Wired {
        netns: netns.to_path_buf(),
        host_veth,
    }
}

impl Wired {
    /// Asserts the namespace is gone (with `lazy_file`, at least unmounted:
    /// libnetwork unmounts a sandbox's namespace at once but removes the
    /// empty file in a garbage collection every 60 s, as with runc), and the
    /// host veth with it.
    fn assert_gone(&self, lazy_file: bool) {
        if lazy_file {
            assert_no_mounts(&format!(" {} ", self.netns.display()));
        } else {
            assert!(
                !self.netns.exists(),
                "namespace {} left behind",
                self.netns.display()
            );
        }
        let links = ok(
            Command::new("ip").args(["-o", "link"]).output().unwrap(),
            "ip link",
        );
        let veth = format!("{}: ", self.host_veth);
        assert!(
            !links.lines().any(|l| l.starts_with(&veth)),
            "host veth {} left behind:\n{links}",
            self.host_veth
        );
    }
}

fn vmm_pid(state: &Output) -> u32 {
    let v: serde_json::Value = serde_json::from_slice(&state.stdout)
        .unwrap_or_else(|e| panic!("vessel state: {e}: {}", text(state)));
    u32::try_from(v["pid"].as_u64().unwrap()).unwrap()
}

fn assert_no_mounts(needle: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(needle)).collect();
    assert!(left.is_empty(), "mounts left:\n{}", left.join("\n"));
}

fn assert_no_processes(needle: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || processes_mentioning(needle)
            .is_empty()),
        "processes left: {:?}",
        processes_mentioning(needle)
    );
}

fn assert_no_nat_rule(port: u16) {
    let rules = ok(
        Command::new("iptables")
            .args(["-t", "nat", "-S"])
            .output()
            .unwrap(),
        "iptables -t nat -S",
    );
    let dport = format!("--dport {port} ");
    assert!(
        !rules.lines().any(|l| l.contains(&dport)),
        "iptables rule for port {port} left:\n{rules}"
    );
}

fn state_entries(root: &Path) -> Vec<String> {
    common::state_left(root)
}

struct Podman<'a> {
    e: &'a Env,
    conf: PathBuf,
    runtime: PathBuf,
}

impl Podman<'_> {
    fn new(e: &Env, conf: PathBuf) -> Podman<'_> {
        let runtime = e.runtime_script();
        Podman { e, conf, runtime }
    }

    fn run(&self, args: &[&str]) -> Output {
        let d = self.e.dir.path();
        Command::new("podman")
            .arg("--root")
            .arg(d.join("proot"))
            .arg("--runroot")
            .arg(d.join("prun"))
            .arg("--runtime")
            .arg(&self.runtime)
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// A failed test must not leave containers running (the VMs go with them).
impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["system", "prune", "--force"]);
        // containers/storage mounts its overlay home (proot/overlay) private
        // and leaves it mounted after each command.
        unmount_under(self.e.dir.path());
    }
}

#[test]
fn podman_publishes_a_port_of_a_vessel_container() {
    let Some(e) = env() else { return };
    if !have(&["podman", "skopeo", "umoci", "iptables", "nsenter"]) {
        return;
    }
    let archive = images();
    let d = e.dir.path();
    let conf = d.join("containers.conf");
    // Podman 4.3's default network: CNI (Debian has no netavark), the
    // "podman" bridge network with the portmap plugin.
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
         [network]\nnetwork_backend = \"cni\"\n",
    )
    .unwrap();
    let p = Podman::new(&e, conf);
    ok(
        p.run(&["load", "-i", archive.to_str().unwrap()]),
        "podman load",
    );

    let port = common::free_port();
    let page = format!("podman-page-{}", std::process::id());
    let id = ok(
        p.run(&[
            "run",
            "-d",
            "--name",
            "web",
            "-p",
            &format!("127.0.0.1:{port}:80"),
            IMAGE,
            "sh",
            "-c",
            &httpd(&page),
        ]),
        "podman run -p",
    );
    let netns = ok(
        p.run(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "web"]),
        "podman inspect",
    );
    let state = e.run(&["state", &id]);
    let wired = check_wired(Path::new(&netns), vmm_pid(&state));
    let mut got = None;
    assert!(
        wait_until(T, || {
            got = http_get(port);
            got.is_some()
        }),
        "127.0.0.1:{port} never answered; podman logs: {}",
        text(&p.run(&["logs", "web"]))
    );
    assert_eq!(got.unwrap().trim(), page);

    ok(p.run(&["rm", "--force", "--time", "0", "web"]), "podman rm");
    wired.assert_gone(false);
    assert!(http_get(port).is_none(), "port {port} still answers");
    assert_no_nat_rule(port);
    assert!(
        state_entries(&e.root).is_empty(),
        "vessel state left: {:?}",
        state_entries(&e.root)
    );
    e.assert_clean(&id);
    assert_no_processes(&id);
    assert_no_mounts(&id);
    drop(p);
    assert_no_processes(&format!("{}/", e.dir.path().display()));
    assert_no_mounts(&format!("{}/", e.dir.path().display()));
}

/// dockerd started by hand, private to the test: its own data and exec roots,
/// socket and bridge (no iptables: 127.0.0.1:PORT goes through docker-proxy,
/// as it does with iptables on, so the host's firewall is left alone).
struct Dockerd {
    sock: String,
    exec_root: PathBuf,
    config: PathBuf,
    child: Child,
    bridge: String,
}

impl Dockerd {
    fn start(e: &Env) -> Dockerd {
        let d = e.dir.path();
        let pid = std::process::id();
        let bridge = format!("vdk{}", pid % 100_000);
        let net = format!("10.247.{}", pid % 250);
        let ip = |args: &[&str]| {
            ok(
                Command::new("ip").args(args).output().unwrap(),
                &format!("ip {}", args.join(" ")),
            )
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut dockerd = Dockerd {
            sock: format!("unix://{}", d.join("docker.sock").display()),
            exec_root: d.join("dx"),
            config: e.config.clone(),
            // Replaced below; a placeholder that has already exited.
            child: Command::new("true").spawn().unwrap(),
            bridge,
        };
        ip(&[
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            &dockerd.bridge,
        ]);
        ip(&["link", "set", &dockerd.bridge, "up"]);
        let daemon_json = d.join("daemon.json");
        let runtime = serde_json::json!({
            "runtimes": {"vessel": {
                "path": VESSEL,
                "runtimeArgs": ["--config", e.config.to_str().unwrap()],
            }}
        });
        std::fs::write(&daemon_json, runtime.to_string()).unwrap();
        let log = std::fs::File::create(d.join("dockerd.log")).unwrap();
        let _ = dockerd.child.wait();
        dockerd.child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(d.join("dd"))
            .arg("--exec-root")
            .arg(&dockerd.exec_root)
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .args(["-H", &dockerd.sock])
            .args(["--bridge", &dockerd.bridge])
            .args(["--iptables=false", "--ip-forward=false", "--ip-masq=false"])
            .args(["--storage-driver", "overlay2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(30), || {
            dockerd.docker(&["version"]).status.success()
        });
        assert!(
            up,
            "dockerd did not come up: {}",
            std::fs::read_to_string(d.join("dockerd.log")).unwrap_or_default()
        );
        dockerd
    }

    fn docker(&self, args: &[&str]) -> Output {
        // Debian's client (a newer one elsewhere in PATH may not talk to 20.10).
        Command::new("/usr/bin/docker")
            .args(["-H", &self.sock])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// vessel's state root as containerd's runc shim passes it (`--root`).
    fn vessel_root(&self) -> PathBuf {
        self.exec_root.join("runtime-runc/moby")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.docker(&["rm", "--force", "--volumes", "web"]);
        // A failed test may leave a VM that docker lost track of.
        for id in state_entries(&self.vessel_root())
            .into_iter()
            .filter(|n| !n.contains('/'))
        {
            let _ = Command::new(VESSEL)
                .arg("--config")
                .arg(&self.config)
                .arg("--root")
                .arg(self.vessel_root())
                .args(["delete", "--force", &id])
                .output();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[test]
fn docker_publishes_a_port_of_a_vessel_container() {
    let Some(e) = env() else { return };
    if !have(&["dockerd", "/usr/bin/docker", "skopeo", "umoci", "nsenter"]) {
        return;
    }
    let archive = images();
    let dockerd = Dockerd::start(&e);
    ok(
        dockerd.docker(&["load", "-i", archive.to_str().unwrap()]),
        "docker load",
    );

    let port = common::free_port();
    let page = format!("docker-page-{}", std::process::id());
    let id = ok(
        dockerd.docker(&[
            "run",
            "-d",
            "--runtime",
            "vessel",
            "--name",
            "web",
            "-p",
            &format!("127.0.0.1:{port}:80"),
            IMAGE,
            "sh",
            "-c",
            &httpd(&page),
        ]),
        "docker run -p",
    );
    let netns = ok(
        dockerd.docker(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "web"]),
        "docker inspect",
    );
    let state = Command::new(VESSEL)
        .arg("--config")
        .arg(&e.config)
        .arg("--root")
        .arg(dockerd.vessel_root())
        .args(["state", &id])
        .output()
        .unwrap();
    let wired = check_wired(Path::new(&netns), vmm_pid(&state));
    let mut got = None;
    assert!(
        wait_until(T, || {
            got = http_get(port);
            got.is_some()
        }),
        "127.0.0.1:{port} never answered; docker logs: {}",
        text(&dockerd.docker(&["logs", "web"]))
    );
    assert_eq!(got.unwrap().trim(), page);
    // exec (containerd's runc shim: `exec --process P --detach --pid-file F`)
    // with its exit status, and with a terminal (`--console-socket`).
    let o = dockerd.docker(&["exec", "web", "sh", "-c", "cat /www/index.html; exit 4"]);
    assert_eq!(o.status.code(), Some(4), "docker exec: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), page);
    let tty = ok(
        dockerd.docker(&["exec", "-t", "web", "tty"]),
        "docker exec -t",
    );
    assert!(tty.starts_with("/dev/pts/"), "exec -t has no pty: {tty}");

    // stop: SIGTERM, then SIGKILL after the grace period; then delete.
    ok(
        dockerd.docker(&["stop", "--time", "1", "web"]),
        "docker stop",
    );
    ok(dockerd.docker(&["rm", "web"]), "docker rm");
    wired.assert_gone(true);
    assert!(http_get(port).is_none(), "port {port} still answers");
    assert!(
        state_entries(&dockerd.vessel_root()).is_empty(),
        "vessel state left: {:?}",
        state_entries(&dockerd.vessel_root())
    );
    assert!(
        !dockerd.vessel_root().join("netns").join(&id).exists(),
        "vessel's namespace for {id} left"
    );
    assert_no_processes(&id);
    assert_no_mounts(&id);

    // A foreground run's output and exit status reach the client.
    let o = dockerd.docker(&[
        "run",
        "--rm",
        "--runtime",
        "vessel",
        IMAGE,
        "sh",
        "-c",
        "echo fg; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "docker run --rm: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "fg\n");
    assert!(
        wait_until(Duration::from_secs(10), || state_entries(
            &dockerd.vessel_root()
        )
        .is_empty()),
        "vessel state left after run --rm: {:?}",
        state_entries(&dockerd.vessel_root())
    );

    drop(dockerd);
    assert_no_processes(&format!("{}/", e.dir.path().display()));
    // dockerd's data root (overlay2) and exec root (netns files) included.
    assert_no_mounts(&format!("{}/", e.dir.path().display()));
}
