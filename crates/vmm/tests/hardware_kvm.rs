//! Boot to the vessel agent and restore from a snapshot taken after agent-ready. Needs
//! hardware KVM: under PVM (the software KVM of the development hosts) Linux user space
//! cannot run, so these tests do not run there (loudly); `make test` runs them in the KVM
//! lane (scripts/kvm-lane.sh), where they must run. Inputs:
//! - `VESSEL_AGENT_INITRAMFS`: an initramfs with vessel-agent as /init; default the guest's
//!   `initramfs.cpio.gz` (in `VESSEL_GUEST_DIR` or build/guest);
//! - the kernel at `build/guest/vmlinux` or `VESSEL_GUEST_KERNEL`, and its bzImage beside it
//!   (or in `VESSEL_GUEST_DIR`).
//!
//! The agent announces itself on host vsock port 1025 (`<uds>_1025`, a line starting with
//! `VESSEL-AGENT-READY`) and serves ttrpc on guest port 1024. These tests check the VMM's
//! part: boot to ready and `CONNECT 1024` answered, from the vmlinux (PVH) and from the
//! bzImage, and the same on 10 restores of one snapshot. The ttrpc `Health.Check` and RNG
//! reseeding belong to the runtime's tests.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const AGENT_PORT: u32 = 1024;
const READY_PORT: u32 = 1025;
const T: Duration = Duration::from_secs(120);

fn wait_ready(listener: &UnixListener) -> String {
    listener.set_nonblocking(true).unwrap();
    let (s, _) = poll(T, || listener.accept().ok()).expect("agent never connected to port 1025");
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("VESSEL-AGENT-READY"),
        "ready line {line:?}"
    );
    line
}

fn connect_agent(uds: &Path) {
    // The socket file appears at bind(), a moment before listen(): until then a connect
    // is refused. A connection the VMM closes without "OK" means the guest did not answer
    // within the VMM's handshake limit (3 s, HANDSHAKE_TIMEOUT): under emulation a guest
    // just restored can take longer to run its vsock driver; a client tries again, as the
    // runtime's agent client does. What matters is an answer within T.
    let mut attempts = 0;
    let mut last = String::new();
    let answered = poll(T, || {
        let mut s = UnixStream::connect(uds).ok()?;
        attempts += 1;
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
            .ok()?;
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        if line.starts_with("OK ") {
            return Some(());
        }
        last = line;
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    assert!(
        answered.is_some(),
        "agent port not answered within {T:?} ({attempts} attempts, last answer {last:?})"
    );
    if attempts > 1 {
        eprintln!(
            "{}: agent port answered on attempt {attempts}",
            uds.display()
        );
    }
}

/// The agent initramfs (`VESSEL_AGENT_INITRAMFS`, else the guest's from `make guest`) if
/// this host can boot to the agent (hardware KVM); otherwise says loudly why `test` does not
/// run here (PVM cannot run Linux user space: the first syscall of /init faults). `make
/// test` runs these tests in the KVM lane, where they must run.
fn agent_initramfs(test: &str) -> Option<PathBuf> {
    let why = match kvm_error() {
        Some(e) => Some(format!("/dev/kvm is not usable ({e})")),
        None if vessel_vmm::config::host_is_pvm() => {
            Some("this host's KVM is kvm_pvm (software)".to_string())
        }
        None => None,
    };
    if !vessel_testutil::hardware_kvm(test, why.is_none(), why.as_deref().unwrap_or("")) {
        return None;
    }
    let initramfs = std::env::var_os("VESSEL_AGENT_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| vessel_testutil::guest_dir().join("initramfs.cpio.gz"));
    if !initramfs.is_file() {
        skip(
            test,
            &format!(
                "no agent initramfs at {} (make guest, or set VESSEL_AGENT_INITRAMFS)",
                initramfs.display()
            ),
        );
        return None;
    }
    Some(initramfs)
}

/// Boots `kernel` (vmlinux or bzImage) with the agent, waits for its ready announcement and
/// checks that the agent's port answers. Returns the running VMM.
fn boot_to_agent(kernel: &Path, initramfs: &Path, dir: &Path) -> Guard {
    let uds = dir.join("v.sock");
    let ready = UnixListener::bind(format!("{}_{READY_PORT}", uds.display())).unwrap();
    let child = spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1 vessel.channel=vsock",
        "--mem-mib",
        "256",
        "--vcpus",
        "2",
        "--rng",
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--vsock-cid",
        "3",
        "--api-sock",
        dir.join("api.sock").to_str().unwrap(),
        "--serial-log",
        dir.join("serial.log").to_str().unwrap(),
    ]);
    let child = Guard(child);
    eprintln!(
        "{}: agent ready: {}",
        kernel.display(),
        wait_ready(&ready).trim()
    );
    connect_agent(&uds);
    child
}

#[test]
fn boots_to_agent_and_restores_answer() {
    let Some(initramfs) = agent_initramfs("boots_to_agent_and_restores_answer") else {
        return;
    };
    let dir = scratch("agent");
    let api_sock = dir.path().join("api.sock");
    let snap = dir.path().join("snapshot");
    let mut child = boot_to_agent(&guest_kernel(), &initramfs, dir.path());
    assert_eq!(api(&api_sock, r#"{"action":"pause"}"#)["ok"], true);
    let resp = api(
        &api_sock,
        &serde_json::json!({"action": "snapshot", "dir": snap}).to_string(),
    );
    assert_eq!(resp["ok"], true, "{resp}");
    terminate(&mut child);

    for i in 0..10 {
        let cuds = dir.path().join(format!("v{i}.sock"));
        let c = spawn(&[
            "--restore",
            snap.to_str().unwrap(),
            "--vsock-uds",
            cuds.to_str().unwrap(),
            "--serial-log",
            dir.path().join(format!("serial-{i}.log")).to_str().unwrap(),
        ]);
        let mut c = Guard(c);
        poll(T, || cuds.exists().then_some(())).expect("restored VMM did not listen");
        connect_agent(&cuds);
        terminate(&mut c);
    }
}

/// Stops a VMM the way the runtime does: SIGTERM (its vCPUs leave KVM_RUN and are joined
/// before it exits 0), bounded by T.
fn terminate(vmm: &mut Guard) {
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
    let rc = unsafe { libc::kill(vmm.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "SIGTERM to the VMM");
    let status = wait_exit(&mut vmm.0, T);
    assert!(status.success(), "VMM exit after SIGTERM: {status}");
}

/// The bzImage entry (zero page, 64-bit entry, in-guest decompression) all the way to the
/// agent; on PVM the decompressor alone takes minutes (see linux_boot.rs).
#[test]
fn bzimage_boots_to_agent() {
    let Some(initramfs) = agent_initramfs("bzimage_boots_to_agent") else {
        return;
    };
    let dir = scratch("agent-bzimage");
    let api_sock = dir.path().join("api.sock");
    let mut child = boot_to_agent(&guest_bzimage(), &initramfs, dir.path());
    assert_eq!(api(&api_sock, r#"{"action":"shutdown"}"#)["ok"], true);
    let status = wait_exit(&mut child.0, T);
    assert!(status.success(), "VMM exit after shutdown: {status}");
}
