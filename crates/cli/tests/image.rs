//! End-to-end: `vessel run --image` on real guests (QEMU). The images are
//! built here from Debian packages (tests/support/busybox-image.sh and
//! nginx-image.sh): busybox from an OCI archive and from a local
//! docker-registry (Debian's package, on a free loopback port with its own
//! storage), and nginx serving its page on a network namespace the test made.
//! After each run the temporary bundle is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{env, state_left, text, wait_until, Env};

const T: Duration = Duration::from_secs(90);

fn images(script: &str) -> PathBuf {
    let o = Command::new(vessel_testutil::repo().join("tests/support").join(script))
        .arg(vessel_testutil::image_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", text(&o));
    vessel_testutil::image_dir()
}

/// Kills a host helper process on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's docker-registry on 127.0.0.1:<free port>, storage in `dir`.
fn registry(dir: &Path) -> (Reap, u16) {
    let port = common::free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("docker-registry (scripts/install-deps.sh installs it)");
    let r = Reap(child);
    assert!(
        wait_until(Duration::from_secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "docker-registry did not listen on {port}: {}",
        std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
    );
    (r, port)
}

/// What `vessel run --image` leaves: nothing in the state root.
fn assert_nothing_left(e: &Env, id: &str) {
    e.assert_clean(id);
    let left = state_left(&e.root);
    assert!(left.is_empty(), "left in the state root: {left:?}");
}

/// One test, two sources (one VM boot each): the busybox image from an OCI
/// archive with the command given on the command line (its exit status is
/// `vessel run`'s), then pushed with skopeo into a local registry and pulled
/// from there with the image's own user and working directory.
#[test]
fn busybox_image_runs_from_an_oci_archive_and_from_a_local_registry() {
    let Some(e) = env() else { return };
    let archive = images("busybox-image.sh").join("busybox-oci.tar");

    let o = e.run(&[
        "run",
        "--image",
        &format!("oci-archive:{}", archive.display()),
        "img-archive",
        "sh",
        "-c",
        "echo from-archive uid=$(id -u) cwd=$(pwd) $PATH; exit 7",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    assert!(
        out.contains("from-archive uid=0 cwd=/ /usr/local/sbin:"),
        "stdout: {out}"
    );
    // Progress: per-layer lines with bytes (stderr is not a terminal here).
    assert!(
        err.contains("fetch  layer 1/1 sha256:") && err.contains("unpack layer 1/1"),
        "stderr: {err}"
    );
    assert!(err.contains(" / "), "stderr: {err}");
    assert_nothing_left(&e, "img-archive");

    let (_registry, port) = registry(e.dir.path());
    let reference = format!("127.0.0.1:{port}/busybox:latest");
    let push = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(push.status.success(), "skopeo copy: {}", text(&push));
    let o = e.run(&[
        "run",
        "--image",
        &reference,
        "img-registry",
        "sh",
        "-c",
        "echo from-registry $(hostname)",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("from-registry img-registry"),
        "{}",
        text(&o)
    );
    assert_nothing_left(&e, "img-registry");

    // A tag that is not there: a clear error, nothing left behind.
    let o = e.run(&[
        "run",
        "--image",
        &format!("127.0.0.1:{port}/busybox:nope"),
        "img-missing",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("registry"), "{}", text(&o));
    assert_nothing_left(&e, "img-missing");
}

/// A network namespace with one end of a veth pair (`<net>.2/24` inside,
/// `<net>.1/24` on the host); removed on drop.
struct TestNet {
    ns: String,
    host_veth: String,
    net: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {}: {}", args.join(" "), text(&o));
}

impl TestNet {
    fn new() -> TestNet {
        let pid = std::process::id();
        let n = TestNet {
            ns: format!("vessel-img-{pid}"),
            host_veth: format!("vi{}h", pid % 100_000),
            net: format!("10.245.{}", pid % 250),
        };
        ip(&["netns", "add", &n.ns]);
        ip(&[
            "link",
            "add",
            &n.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &n.ns,
        ]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", n.net),
            "dev",
            &n.host_veth,
        ]);
        ip(&["link", "set", &n.host_veth, "up"]);
        for args in [
            vec!["addr", "add", &format!("{}.2/24", n.net), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["-n", n.ns.as_str()];
            a.extend(args.iter().map(|s| -> &str { s }));
            ip(&a);
        }
        n
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn host_get(url: &str) -> Option<String> {
    let o = Command::new("curl")
        .args(["-gsf", "-m", "3", url])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// nginx from Debian's packages, as an OCI archive, runs with the image's
/// entrypoint and cmd (`nginx -g 'daemon off;'`) and serves its page to the
/// host; SIGTERM to `vessel run` stops it and the bundle goes.
#[test]
fn nginx_image_from_debian_packages_serves_its_page() {
    let Some(e) = env() else { return };
    let archive = images("nginx-image.sh").join("nginx-oci.tar");
    let net = TestNet::new();
    let (out, err) = (
        e.dir.path().join("nginx.out"),
        e.dir.path().join("nginx.err"),
    );
    let child = e
        .cmd()
        .args(["run", "--image"])
        .arg(&archive)
        .arg("--netns")
        .arg(format!("/var/run/netns/{}", net.ns))
        .arg("img-nginx")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut run = Reap(child);
    let url = format!("http://{}.2/", net.net);
    let mut page = None;
    let served = wait_until(T, || {
        page = host_get(&url);
        page.is_some() || run.0.try_wait().unwrap().is_some()
    });
    let logs = || {
        format!(
            "stdout: {}\nstderr: {}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        )
    };
    assert!(served && page.is_some(), "GET {url} failed; {}", logs());
    let page = page.unwrap();
    assert!(page.contains("<title>Welcome to nginx!</title>"), "{page}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut status = None;
    assert!(
        wait_until(T, || {
            status = run.0.try_wait().unwrap();
            status.is_some()
        }),
        "vessel run did not end after SIGTERM; {}",
        logs()
    );
    // nginx exits 0 on SIGTERM (fast shutdown).
    assert_eq!(status.unwrap().code(), Some(0), "{}", logs());
    assert_nothing_left(&e, "img-nginx");
}

/// SIGINT while the VM of `vessel run --image` boots: the run stops, exits
/// 130 (128 + SIGINT), and the VM, the state directory and the unpacked
/// bundle are gone.
#[test]
fn sigint_while_the_vm_boots_stops_the_run_and_leaves_nothing() {
    let Some(e) = env() else { return };
    let archive = images("busybox-image.sh").join("busybox-oci.tar");
    let id = "img-boot-int";
    let err = e.dir.path().join("boot-int.err");
    let child = e
        .cmd()
        .args(["run", "--image"])
        .arg(format!("oci-archive:{}", archive.display()))
        .args([id, "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut run = Reap(child);
    let state = e.root.join(id).join("state.json");
    let mut status = String::new();
    // The image is unpacked; `create` saved the state and the supervisor boots the VM.
    assert!(
        wait_until(T, || {
            status = std::fs::read_to_string(&state).unwrap_or_default();
            !status.is_empty() || run.0.try_wait().unwrap().is_some()
        }),
        "no state at {}",
        state.display()
    );
    let parsed: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        parsed["status"], "creating",
        "not booting any more: {status}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut exit = None;
    assert!(
        wait_until(T, || {
            exit = run.0.try_wait().unwrap();
            exit.is_some()
        }),
        "vessel run did not end after SIGINT"
    );
    let log = std::fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(exit.unwrap().code(), Some(130), "stderr: {log}");
    assert!(log.contains("while the VM booted"), "stderr: {log}");
    assert_nothing_left(&e, id);
}
