//! vessel-jailer with the real vessel-vmm and the tiny test guest of crates/vmm on /dev/kvm:
//! confinement seen from the host's /proc, exit codes, signals, the API socket through the
//! read-write run directory, cleanup, bad inputs and stale jails.
//!
//! Needs root, a usable /dev/kvm, gcc/binutils (the guest) and a built vessel-vmm
//! (`cargo build -p vessel-vmm`, or `VESSEL_VMM=/path`). Without them the tests print
//! why and skip; with `CI` set they fail instead.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vessel_testutil::{pid_alive, processes_mentioning, wait_until};

const T: Duration = Duration::from_secs(20);
/// The unprivileged ids the VMM runs as (nobody/nogroup).
const NOBODY: u32 = 65534;
const MEM_MIB: u64 = 256;

struct Env {
    vmm: PathBuf,
    guest: PathBuf,
}

/// The prerequisites, or None after saying loudly why the test is skipped.
fn env(test: &str) -> Option<Env> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        missing.push(format!("a usable /dev/kvm ({e})"));
    }
    let vmm = vmm_binary();
    if !vmm.is_file() {
        missing.push(format!(
            "vessel-vmm at {} (run `cargo build -p vessel-vmm` or set VESSEL_VMM)",
            vmm.display()
        ));
    }
    if missing.is_empty() {
        return Some(Env {
            vmm,
            guest: tiny_guest().to_owned(),
        });
    }
    vessel_testutil::skip(test, &format!("needs {}", missing.join(", ")));
    None
}

/// `VESSEL_VMM`, else vessel-vmm beside this test's target directory (target/<profile>/).
fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VESSEL_VMM") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/jail_tiny_guest-<hash>
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("vessel-vmm"))
        .unwrap_or_default()
}

/// Builds the tiny guest once with crates/vmm's own script.
fn tiny_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("jailer-tiny-guest-{}.elf", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm/tests/guest/build.sh");
        let status = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run crates/vmm/tests/guest/build.sh (needs gcc and binutils)");
        assert!(status.success(), "building the tiny guest failed");
        out
    })
}

/// One jail's places: a private jail root and a run directory per test.
struct Scratch {
    _dir: tempfile::TempDir,
    id: String,
    jail_root: PathBuf,
    run: PathBuf,
}

fn scratch(name: &str) -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix(&format!("jailer-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    Scratch {
        id: format!("jt-{}-{name}", std::process::id()),
        jail_root: dir.path().join("jail"),
        run,
        _dir: dir,
    }
}

impl Scratch {
    /// The jailer command for a tiny guest in `mode`; `extra` jailer flags go first.
    fn command(&self, env: &Env, mode: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"));
        c.args(["--id", &self.id, "--exec"])
            .arg(&env.vmm)
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .arg("--jail-root")
            .arg(&self.jail_root)
            .arg("--ro-bind")
            .arg(format!("{}:/boot/guest.elf", env.guest.display()))
            .arg("--rw-bind")
            .arg(format!("{}:/run", self.run.display()))
            .args(["--rlimit-nofile", "1024"]);
        if !extra.contains(&"--no-cgroup") {
            c.args([
                "--cgroup-mem-mib",
                &MEM_MIB.to_string(),
                "--cgroup-cpus",
                "1",
            ]);
        }
        c.args(extra)
            .args(["--", "--kernel", "/boot/guest.elf", "--mem-mib", "32"])
            .args(["--cmdline", &format!("mode={mode}")])
            .args([
                "--serial-log",
                "/run/serial.log",
                "--api-sock",
                "/run/api.sock",
            ]);
        c
    }

    fn spawn(&self, env: &Env, mode: &str, extra: &[&str]) -> Jailer {
        let child = self
            .command(env, mode, extra)
            .env("VESSEL_VMM_LOG", "warn")
            .env("JAILER_TEST_SECRET", "must-not-reach-the-vmm")
            .spawn()
            .expect("spawn vessel-jailer");
        Jailer(Some(child))
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.run.join("serial.log")).unwrap_or_default()
    }

    fn wait_serial(&self, needle: &str) {
        assert!(
            wait_until(T, || self.serial().contains(needle)),
            "{needle:?} not in the serial log within {T:?}:\n{}",
            self.serial()
        );
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ["vessel", "memory/vessel", "cpu/vessel"]
            .iter()
            .map(|p| Path::new("/sys/fs/cgroup").join(p).join(&self.id))
            .collect()
    }

    /// Nothing of this jail is left: directory, cgroup, mounts, processes.
    fn assert_clean(&self) {
        assert!(
            !self.jail_root.join(&self.id).exists(),
            "jail directory left behind"
        );
        for d in self.cgroup_dirs() {
            assert!(!d.exists(), "cgroup {} left behind", d.display());
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = self.jail_root.to_string_lossy();
        assert!(
            !mountinfo.contains(root.as_ref()),
            "host mount table mentions {root}"
        );
        let left = processes_mentioning(&self.id);
        assert!(left.is_empty(), "processes left: {left:?}");
    }
}

/// A running jailer; killed on drop so a failing test leaves no VMM behind.
struct Jailer(Option<Child>);

impl Jailer {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    fn wait(&mut self) -> i32 {
        let child = self.0.as_mut().unwrap();
        let mut status = None;
        let exited = wait_until(T, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(exited, "vessel-jailer did not exit within {T:?}");
        self.0 = None;
        status
            .unwrap()
            .code()
            .expect("the jailer exits, it is not killed")
    }

    /// Its only child: the VMM under a jailer (or the jailer under a shell).
    fn child_pid(&self) -> u32 {
        let parent = self.pid();
        let mut found = None;
        assert!(
            wait_until(T, || {
                found = children_of(parent).first().copied();
                found.is_some()
            }),
            "the jailer has no child"
        );
        found.unwrap()
    }
}

impl Drop for Jailer {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn api(sock: &Path, request: &str) -> serde_json::Value {
    let mut s = None;
    assert!(
        wait_until(T, || {
            s = UnixStream::connect(sock).ok();
            s.is_some()
        }),
        "API socket {} never accepted",
        sock.display()
    );
    let mut s = s.unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad API response {line:?}: {e}"))
}

#[test]
fn hello_guest_runs_jailed_and_leaves_nothing() {
    let Some(env) = env("hello_guest_runs_jailed_and_leaves_nothing") else {
        return;
    };
    let s = scratch("hello");
    let mut j = s.spawn(&env, "hello", &[]);
    assert_eq!(j.wait(), 0, "i8042 reset exits 0");
    assert!(s.serial().contains("Hello from the vessel tiny guest"));
    // The VMM created its files in the run directory as the unprivileged user.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(s.run.join("serial.log")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    s.assert_clean();
}

#[test]
fn guest_crash_exit_code_is_forwarded() {
    let Some(env) = env("guest_crash_exit_code_is_forwarded") else {
        return;
    };
    let s = scratch("panic");
    let code = s.spawn(&env, "panic", &[]).wait();
    // Triple fault: 2 on hardware KVM, 4 (internal error) under PVM; see crates/vmm.
    assert!(matches!(code, 2 | 4), "exit code {code}");
    s.assert_clean();
}

#[test]
fn running_vmm_is_confined_and_its_api_answers() {
    let Some(env) = env("running_vmm_is_confined_and_its_api_answers") else {
        return;
    };
    let s = scratch("idle");
    let mut j = s.spawn(&env, "idle", &["--new-pid-ns"]);
    s.wait_serial("IDLE");
    let vmm = j.child_pid();

    assert_eq!(status_field(vmm, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(vmm, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(vmm, "Groups"), "");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    for caps in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(vmm, caps), "0000000000000000", "{caps}");
    }
    let pid = vmm.to_string();
    assert_ne!(ns(&pid, "mnt"), ns("self", "mnt"), "same mount namespace");
    assert_ne!(ns(&pid, "pid"), ns("self", "pid"), "same PID namespace");
    // Its root is the jail: the VMM binary, /dev and the binds, nothing of the host.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    for present in [
        "vessel-vmm",
        "dev/kvm",
        "dev/urandom",
        "boot/guest.elf",
        "run",
    ] {
        assert!(root.join(present).exists(), "{present} missing in the jail");
    }
    for absent in ["etc", "home", "proc", "dev/net/tun", "dev/null"] {
        assert!(!root.join(absent).exists(), "{absent} visible in the jail");
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    assert!(
        cgroups.contains(&format!("vessel/{}", s.id)),
        "not in vessel/{}: {cgroups}",
        s.id
    );
    let limit = [
        "vessel/{}/memory.max",
        "memory/vessel/{}/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| {
        let p = format!("/sys/fs/cgroup/{}", p.replace("{}", &s.id));
        std::fs::read_to_string(p).ok()
    })
    .expect("a memory limit file");
    assert_eq!(limit.trim(), (MEM_MIB << 20).to_string());
    let environ = std::fs::read(format!("/proc/{vmm}/environ")).unwrap();
    assert_eq!(String::from_utf8_lossy(&environ), "VESSEL_VMM_LOG=warn\0");
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );

    // The API socket the VMM made inside the jail is reachable from the host.
    let sock = s.run.join("api.sock");
    let m = api(&sock, r#"{"action":"metrics"}"#);
    assert_eq!(m["ok"], true, "{m}");
    assert_eq!(m["result"]["state"], "running", "{m}");
    assert_eq!(api(&sock, r#"{"action":"shutdown"}"#)["ok"], true);
    assert_eq!(j.wait(), 0);
    assert!(!pid_alive(vmm), "VMM still alive");
    s.assert_clean();
}

/// As vessel-runtime runs it: started inside the sandbox's host cgroup (joined before
/// exec) with `--no-cgroup`, the jailer makes no cgroup of its own and its VMM stays in
/// the caller's, under its limits.
#[test]
fn with_no_cgroup_the_vmm_stays_in_the_cgroup_it_was_started_in() {
    let Some(env) = env("with_no_cgroup_the_vmm_stays_in_the_cgroup_it_was_started_in") else {
        return;
    };
    use std::os::unix::process::CommandExt;
    use vessel_jailer::cgroup::{join_in_child, raw_fds, Cgroup, Limits, CGROUP_ROOT};
    let s = scratch("nocg");
    let name = format!("{}-sandbox", s.id);
    let limits = Limits {
        mem_mib: Some(MEM_MIB),
        ..Limits::default()
    };
    let sandbox = Cgroup::create(Path::new(CGROUP_ROOT), &name, limits).unwrap();
    let procs = sandbox.procs_files().unwrap();
    let fds = raw_fds(&procs);
    let mut c = s.command(&env, "idle", &["--no-cgroup"]);
    // SAFETY: join_in_child only calls write(2) on fds `procs` keeps open until spawn.
    unsafe {
        c.pre_exec(move || join_in_child(&fds));
    }
    let mut j = Jailer(Some(c.env("VESSEL_VMM_LOG", "warn").spawn().unwrap()));
    drop(procs);
    s.wait_serial("IDLE");
    let vmm = j.child_pid();
    let inside = sandbox.procs();
    assert!(
        inside.contains(&(j.pid() as i32)) && inside.contains(&(vmm as i32)),
        "jailer {} and VMM {vmm} not both in {name}: {inside:?}",
        j.pid()
    );
    for d in s.cgroup_dirs() {
        assert!(!d.exists(), "the jailer made {}", d.display());
    }
    signal(j.pid(), Signal::SIGTERM);
    assert_eq!(j.wait(), 0);
    s.assert_clean();
    assert!(sandbox.procs().is_empty(), "{:?}", sandbox.procs());
    sandbox.remove().unwrap();
}

#[test]
fn sigterm_to_the_jailer_ends_the_vmm_and_cleans_up() {
    let Some(env) = env("sigterm_to_the_jailer_ends_the_vmm_and_cleans_up") else {
        return;
    };
    // The jailer forwards the SIGTERM; the VMM stops the VM and exits 0, also as PID 1
    // of its own PID namespace (it has a handler, so the signal reaches it there too).
    for (extra, code) in [(&[][..], 0), (&["--new-pid-ns"][..], 0)] {
        let s = scratch("term");
        let mut j = s.spawn(&env, "idle", extra);
        s.wait_serial("IDLE");
        let vmm = j.child_pid();
        signal(j.pid(), Signal::SIGTERM);
        assert_eq!(j.wait(), code, "{extra:?}");
        assert!(!pid_alive(vmm), "VMM still alive");
        s.assert_clean();
    }
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

fn run_to_end(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().expect("run vessel-jailer")
}

#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    let Some(env) = env("bad_inputs_fail_clearly_and_leave_nothing") else {
        return;
    };
    let s = scratch("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--id".into(), "../escape".into()], "invalid id"),
        (
            vec!["--uid".into(), "0".into()],
            "refusing to run the VMM as uid 0",
        ),
        (
            vec!["--exec".into(), "/nonexistent/vessel-vmm".into()],
            "/nonexistent/vessel-vmm",
        ),
        (
            vec!["--ro-bind".into(), "/nonexistent-kernel:/k".into()],
            "/nonexistent-kernel",
        ),
    ];
    for (override_args, message) in cases {
        // Later flags win over the defaults for --id/--uid/--exec: build the list by hand.
        let mut c = Command::new(env!("CARGO_BIN_EXE_vessel-jailer"));
        let mut args: Vec<String> = vec![
            "--jail-root".into(),
            s.jail_root.display().to_string(),
            "--gid".into(),
            NOBODY.to_string(),
        ];
        for flag in ["--id", "--uid", "--exec"] {
            if !override_args.iter().any(|a| a == flag) {
                args.push(flag.into());
                args.push(match flag {
                    "--id" => s.id.clone(),
                    "--uid" => NOBODY.to_string(),
                    _ => env.vmm.display().to_string(),
                });
            }
        }
        args.extend(override_args.iter().cloned());
        c.args(&args).args(["--", "--kernel", "/k"]);
        let out = run_to_end(c);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        s.assert_clean();
    }

    // A live jail with the same id: refused, and the running one is untouched.
    let mut live = s.spawn(&env, "idle", &[]);
    s.wait_serial("IDLE");
    let out = run_to_end(s.command(&env, "hello", &[]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is running"), "{stderr}");
    let m = api(&s.run.join("api.sock"), r#"{"action":"metrics"}"#);
    assert_eq!(m["result"]["state"], "running", "{m}");
    api(&s.run.join("api.sock"), r#"{"action":"shutdown"}"#);
    assert_eq!(live.wait(), 0);
    s.assert_clean();
}

#[test]
fn a_sigkilled_jailer_is_cleaned_up_by_the_next_start() {
    let Some(env) = env("a_sigkilled_jailer_is_cleaned_up_by_the_next_start") else {
        return;
    };
    let s = scratch("stale");
    let mut j = s.spawn(&env, "idle", &[]);
    s.wait_serial("IDLE");
    let vmm = j.child_pid();
    signal(j.pid(), Signal::SIGKILL);
    let _ = j.0.take().unwrap().wait();
    // The VMM dies with its jailer (PR_SET_PDEATHSIG); the jail and cgroup stay.
    assert!(wait_until(T, || !pid_alive(vmm)), "VMM outlived its jailer");
    assert!(s.jail_root.join(&s.id).join("root").exists());
    assert!(s.cgroup_dirs().iter().any(|d| d.exists()));

    std::fs::remove_file(s.run.join("serial.log")).unwrap();
    std::fs::remove_file(s.run.join("api.sock")).unwrap();
    assert_eq!(s.spawn(&env, "hello", &[]).wait(), 0);
    assert!(s.serial().contains("Hello from the vessel tiny guest"));
    s.assert_clean();
}

#[test]
fn with_die_with_parent_the_jailer_stops_the_vmm_when_its_parent_dies() {
    let Some(env) = env("with_die_with_parent_the_jailer_stops_the_vmm_when_its_parent_dies")
    else {
        return;
    };
    let s = scratch("orphan");
    // A parent that can die without waiting: sh runs the jailer in the background.
    let jailer = s.command(&env, "idle", &["--die-with-parent"]);
    let mut parent = Command::new("sh");
    parent
        .args(["-c", "\"$0\" \"$@\" & wait"])
        .arg(jailer.get_program())
        .args(jailer.get_args());
    let mut parent = Jailer(Some(parent.spawn().unwrap()));
    s.wait_serial("IDLE");
    let jailer_pid = parent.child_pid();
    let vmm = children_of(jailer_pid)[0];
    signal(parent.pid(), Signal::SIGKILL);
    let _ = parent.0.take().unwrap().wait();
    assert!(
        wait_until(T, || !pid_alive(vmm) && !pid_alive(jailer_pid)),
        "the VMM or the jailer outlived the jailer's parent"
    );
    s.assert_clean();
}

/// A network namespace bound at `path` (what `ip netns add` makes), made from a thread
/// that unshares its own: no `ip` needed, the test process stays in the host's.
struct NetNs(PathBuf);

impl NetNs {
    fn new(path: PathBuf) -> NetNs {
        std::fs::write(&path, "").unwrap();
        let target = path.clone();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap();
        })
        .join()
        .unwrap();
        NetNs(path)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn netns_tun_and_fsize_limit() {
    let Some(env) = env("netns_tun_and_fsize_limit") else {
        return;
    };
    let s = scratch("netns");
    let netns = NetNs::new(s.jail_root.with_file_name("netns"));
    let netns_arg = netns.0.display().to_string();
    let mut j = s.spawn(
        &env,
        "idle",
        &["--netns", &netns_arg, "--tun", "--rlimit-fsize", "1000000"],
    );
    s.wait_serial("IDLE");
    let vmm = j.child_pid();
    use std::os::unix::fs::MetadataExt;
    let want = format!("net:[{}]", std::fs::metadata(&netns.0).unwrap().ino());
    assert_eq!(ns(&vmm.to_string(), "net").to_string_lossy(), want);
    let tun = std::fs::metadata(format!("/proc/{vmm}/root/dev/net/tun")).unwrap();
    assert_eq!(
        (tun.uid(), tun.rdev()),
        (NOBODY, std::fs::metadata("/dev/net/tun").unwrap().rdev())
    );
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains(" 1000000 ")),
        "{limits}"
    );
    signal(j.pid(), Signal::SIGTERM);
    assert_eq!(j.wait(), 0);
    s.assert_clean();
}
