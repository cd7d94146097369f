//! End-to-end: escape monitoring and guest logs (issue 15 items 2 and 3), with
//! a real guest. One sandbox; from inside the container a probe (run by the
//! container's init, then by `vessel exec`) tries what a container should
//! never do in its VM, and each attempt must reach the host
//! as a security event (`vessel events`) and as a line of the sandbox's JSON
//! log carrying the sandbox and container ids. Then a write to
//! /proc/sysrq-trigger: stopped by the agent's tripwire and reported with the
//! container's id; and, once a privileged exec removed the tripwire, handled
//! by the guest kernel and reported from its log.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{env, text};
use vessel_testutil::wait_until;

/// Tries each forbidden thing once and prints the errnos (0: it succeeded).
const PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/syscall.h>
static int err(long r) { return r < 0 ? errno : 0; }
int main(void) {
    static char image[64];
    int init_module_ = err(syscall(SYS_init_module, image, sizeof image, ""));
    int fd = open("/probe", O_RDONLY);
    int finit_module_ = err(syscall(SYS_finit_module, fd, "", 0));
    int ptrace_ = err(syscall(SYS_ptrace, PTRACE_ATTACH, 1, 0, 0));
    int mount_ = err(mount("rootfs0", "/mnt", "virtiofs", 0, 0));
    int sethostname_ = err(sethostname("x", 1));
    int getpriority_ = err(syscall(SYS_getpriority, PRIO_PROCESS, 0));
    printf("init_module=%d finit_module=%d ptrace=%d mount=%d sethostname=%d getpriority=%d\n",
           init_module_, finit_module_, ptrace_, mount_, sethostname_, getpriority_);
    return 0;
}
"#;

#[test]
fn forbidden_attempts_in_a_container_reach_the_host_as_events_and_log_lines() {
    let Some(e) = env() else { return };
    // The probe runs twice: under the container's init, and as an `exec`'d
    // process, which gets the same filter (libcontainer 0.7 gave it none:
    // see third_party/libcontainer/VESSEL.md).
    let b = e.bundle("b", &["sh", "-c", "/probe > /probe.out; sleep 600"], |c| {
        // The VM's pid namespace: the agent is pid 1 for the probe.
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "pid");
        // The container's own profile denies sethostname with EACCES and
        // getpriority (harmless, it succeeds unfiltered) with ENOMSG.
        c["linux"]["seccomp"] = serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42}
            ]
        });
    });
    common::build_probe(&b.join("rootfs"), PROBE);
    let log = e.dir.path().join("ev.log");
    let id = "ev";
    // Files, not pipes: the supervisor keeps the container's stdio open.
    let err = e.dir.path().join("create.err");
    let st = e
        .cmd()
        .arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "create", "--bundle"])
        .arg(&b)
        .arg(id)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(e.dir.path().join("create.out")).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "create: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let o = e.run(&["start", id]);
    assert!(o.status.success(), "start: {}", text(&o));

    let mut out = String::new();
    let ran = wait_until(Duration::from_secs(30), || {
        let o = e.run(&["exec", id, "cat", "/probe.out"]);
        out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.contains('\n')
    });
    assert!(ran, "the probe did not run: {out}");
    // ptrace of the agent is denied by the agent; sethostname keeps the
    // profile's errno although the agent answered it; the rest fail in the
    // kernel (no modules, no CAP_SYS_ADMIN).
    assert!(out.contains("ptrace=1 "), "{out}");
    assert!(out.contains("sethostname=13 getpriority=42\n"), "{out}");
    for call in ["init_module", "finit_module", "mount"] {
        assert!(
            !out.contains(&format!("{call}=0 ")),
            "{call} succeeded: {out}"
        );
    }
    // An exec'd process runs under the container's filter (unfiltered, its
    // getpriority would succeed and its sethostname fail with EPERM for want
    // of CAP_SYS_ADMIN) and is monitored like init (its module loads are
    // counted below).
    let o = e.run(&["exec", id, "grep", "Seccomp:", "/proc/self/status"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Seccomp:\t2\n",
        "{}",
        text(&o)
    );
    let o = e.run(&["exec", id, "/probe"]);
    assert!(o.status.success(), "exec /probe: {}", text(&o));
    let exec_out = String::from_utf8_lossy(&o.stdout);
    assert!(exec_out.contains("ptrace=1 "), "{exec_out}");
    assert!(
        exec_out.contains("sethostname=13 getpriority=42\n"),
        "{exec_out}"
    );

    let want: BTreeSet<&str> = [
        "module_load",
        "ptrace_agent",
        "agent_path_mount",
        "seccomp_denied",
    ]
    .into();
    let mut seen = Vec::new();
    let all_seen = wait_until(Duration::from_secs(30), || {
        seen = security_events(&e, id);
        let kinds: BTreeSet<&str> = seen
            .iter()
            .filter_map(|v| v["data"]["kind"].as_str())
            .collect();
        want.is_subset(&kinds)
    });
    assert!(all_seen, "security events seen: {seen:#?}");
    for v in &seen {
        assert_eq!(v["id"], id);
        assert_eq!(v["data"]["container"], id, "{v}");
    }
    let syscalls = |kind: &str| -> BTreeSet<u64> {
        seen.iter()
            .filter(|v| v["data"]["kind"] == kind)
            .filter_map(|v| v["data"]["syscall"].as_u64())
            .collect()
    };
    // init_module 175, finit_module 313, ptrace 101, mount 165, sethostname 170.
    assert_eq!(syscalls("module_load"), [175, 313].into());
    assert_eq!(syscalls("ptrace_agent"), [101].into());
    assert_eq!(syscalls("agent_path_mount"), [165].into());
    assert!(syscalls("seccomp_denied").contains(&170), "{seen:#?}");
    let mount = seen
        .iter()
        .find(|v| v["data"]["kind"] == "agent_path_mount")
        .unwrap();
    assert!(
        mount["data"]["detail"]
            .as_str()
            .unwrap()
            .contains("virtiofs"),
        "{mount}"
    );

    // The agent's own lines about them reached the sandbox's log, as JSON
    // with the sandbox and container ids.
    let found = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["sandbox"] == id
                    && v["container"] == id
                    && v["source"] == "vessel_agent::monitor"
                    && v["msg"].as_str().unwrap_or("").contains("PTRACE_AGENT")
            })
    });
    assert!(
        found,
        "no guest line in the log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // And the sandbox's metrics socket counts them by kind and container.
    let sock = std::fs::read_dir(e.root.join(id))
        .unwrap()
        .flatten()
        .map(|d| d.path().join("metrics.sock"))
        .find(|p| p.exists())
        .expect("metrics socket in the run directory");
    let mut metrics = String::new();
    let module_loads = |metrics: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("vessel_guest_security_events_total{")
                    && l.contains("kind=\"module_load\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    // Two module loads by init's probe and two by the exec'd one.
    let counted = wait_until(Duration::from_secs(10), || {
        metrics = scrape(&sock);
        module_loads(&metrics) == Some(4.0)
            && [
                "module_load",
                "ptrace_agent",
                "agent_path_mount",
                "seccomp_denied",
            ]
            .iter()
            .all(|kind| {
                metrics.lines().any(|l| {
                    l.starts_with("vessel_guest_security_events_total{")
                        && l.contains(&format!("kind=\"{kind}\""))
                        && l.contains(&format!("container_id=\"{id}\""))
                        && l.contains(&format!("sandbox_id=\"{id}\""))
                        && !l.ends_with(" 0")
                })
            })
    });
    assert!(counted, "security event counters missing: {metrics}");

    sysrq_writes_are_stopped_by_the_tripwire_or_seen_in_the_kernel_log(&e, id, &sock);
    a_guest_kernel_crash_ends_the_vm_and_is_reported(&e, id);

    let o = e.run(&["delete", "--force", id]);
    assert!(o.status.success(), "delete: {}", text(&o));
    e.assert_clean(id);
}

/// A write to /proc/sysrq-trigger from the container (an exec'd process: the
/// tripwire is a mount, it does not depend on seccomp) reaches the host as a
/// `sysrq_trigger` event of that container, and the guest kernel never saw
/// it. A privileged process that unmounts the tripwire writes the kernel's
/// file: the kernel handles it and the event comes from its log.
fn sysrq_writes_are_stopped_by_the_tripwire_or_seen_in_the_kernel_log(
    e: &common::Env,
    id: &str,
    sock: &Path,
) {
    let o = e.run(&[
        "exec",
        id,
        "sh",
        "-c",
        "echo h > /proc/sysrq-trigger; echo \"rc=$?\"; k=$(dmesg); \
         echo \"lines=$(echo \"$k\" | wc -l) sysrq=$(echo \"$k\" | grep -c sysrq:)\"",
    ]);
    let out = text(&o);
    assert!(o.status.success(), "exec: {out}");
    // The write went into the tripwire (it succeeds, as for the real file),
    // and the kernel, whose log the container can read, logged no SysRq.
    assert!(
        out.contains("rc=0"),
        "{out} (a guest kernel without CONFIG_MAGIC_SYSRQ has no /proc/sysrq-trigger: make kernel)"
    );
    assert!(out.contains(" sysrq=0"), "{out}");
    assert!(
        !out.contains("lines=0 ") && !out.contains("lines=1 "),
        "{out}"
    );

    let sysrq = |seen: &[serde_json::Value], container: Option<&str>| -> Option<String> {
        seen.iter()
            .filter(|v| v["data"]["kind"] == "sysrq_trigger")
            .find(|v| v["data"]["container"].as_str() == container)
            .map(|v| v["data"]["detail"].as_str().unwrap_or("").to_string())
    };
    let mut seen = Vec::new();
    let found = wait_until(Duration::from_secs(30), || {
        seen = security_events(e, id);
        sysrq(&seen, Some(id)).is_some()
    });
    assert!(found, "no sysrq_trigger event: {seen:#?}");
    let detail = sysrq(&seen, Some(id)).unwrap();
    assert!(detail.contains("\"h\\n\""), "{detail}");
    assert_eq!(sysrq(&seen, None), None, "the kernel handled it: {seen:#?}");
    let mut metrics = String::new();
    let counted = wait_until(Duration::from_secs(10), || {
        metrics = scrape(sock);
        metrics.lines().any(|l| {
            l.starts_with("vessel_guest_security_events_total{")
                && l.contains("kind=\"sysrq_trigger\"")
                && l.contains(&format!("container_id=\"{id}\""))
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(1.0)
        })
    });
    assert!(counted, "sysrq_trigger not counted: {metrics}");

    // Privileged: CAP_SYS_ADMIN unmounts the tripwire; the write reaches the
    // kernel's file (the container's readonlyPaths entry was the tripwire's).
    let o = privileged_exec(
        e,
        id,
        "umount /proc/sysrq-trigger && echo h > /proc/sysrq-trigger",
    );
    assert!(o.status.success(), "privileged exec: {}", text(&o));
    let found = wait_until(Duration::from_secs(30), || {
        seen = security_events(e, id);
        sysrq(&seen, None).is_some()
    });
    assert!(
        found,
        "no sysrq_trigger event from the kernel log: {seen:#?}"
    );
    let detail = sysrq(&seen, None).unwrap();
    assert!(detail.starts_with("sysrq: HELP"), "{detail}");
}

/// The guest kernel crashing (a privileged `echo c > /proc/sysrq-trigger`; an oops
/// does the same, the guest kernel panics on one): the VM ends, the container is
/// reported stopped, and the host finds the crash on the dead VM's console and
/// reports it as a `kernel_oops` event. Last: it ends the sandbox's VM.
fn a_guest_kernel_crash_ends_the_vm_and_is_reported(e: &common::Env, id: &str) {
    // The tripwire is already unmounted (the exec above, same mount namespace). The
    // exec never gets its exit: its VM is gone.
    let _ = privileged_exec(
        e,
        id,
        "umount /proc/sysrq-trigger 2>/dev/null; echo c > /proc/sysrq-trigger",
    );
    e.wait_status(id, "stopped", Duration::from_secs(60));
    let mut seen = Vec::new();
    let oops = |seen: &[serde_json::Value]| -> Option<String> {
        seen.iter()
            .find(|v| v["data"]["kind"] == "kernel_oops")
            .map(|v| v["data"]["detail"].as_str().unwrap_or_default().to_string())
    };
    let found = wait_until(Duration::from_secs(30), || {
        seen = security_events(e, id);
        oops(&seen).is_some()
    });
    assert!(
        found,
        "no kernel_oops event for the crashed guest: {seen:#?}"
    );
    let detail = oops(&seen).unwrap();
    assert!(detail.starts_with("Kernel panic"), "{detail}");
}

/// `vessel exec` of `sh -c script` as root with CAP_SYS_ADMIN (which may unmount
/// the tripwire).
fn privileged_exec(e: &common::Env, id: &str, script: &str) -> std::process::Output {
    let process = e.dir.path().join("privileged-process.json");
    let caps = serde_json::json!(["CAP_SYS_ADMIN"]);
    std::fs::write(
        &process,
        serde_json::to_vec(&serde_json::json!({
            "args": ["sh", "-c", script],
            "cwd": "/",
            "env": ["PATH=/bin:/sbin:/usr/bin"],
            "user": {"uid": 0, "gid": 0},
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        }))
        .unwrap(),
    )
    .unwrap();
    e.run(&["exec", "--process", process.to_str().unwrap(), id])
}

/// The sandbox's security events so far (`vessel events --stats`).
fn security_events(e: &common::Env, id: &str) -> Vec<serde_json::Value> {
    vessel_testutil::security_events(&e.run(&["events", "--stats", id]).stdout)
}

/// One GET on a sandbox's metrics socket: the body.
fn scrape(sock: &Path) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}
