//! Boots real sandbox VMs through the QEMU backend (TCG on hosts without
//! hardware KVM) and checks the agent, shutdown and cleanup.

mod common;

use std::time::Duration;

use common::{assert_nothing_left, guest_config};
use vessel_runtime::sandbox::{hypervisor, Sandbox, SandboxSpec};
use vessel_runtime::{Config, Error};

async fn boot_and_check(cfg: Config, id: &str) {
    let hv = hypervisor(&cfg).unwrap();
    let sb = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new(id, &cfg))
        .await
        .unwrap();
    let pids = sb.vm().pids();
    assert!(!pids.is_empty());
    // QEMU (the first pid) runs under its seccomp filter (-sandbox on).
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).unwrap();
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "QEMU without a seccomp filter:\n{status}"
    );
    sb.agent().check(Duration::from_secs(5)).await.unwrap();
    let v = sb.agent().version().await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(v.kernel_release.starts_with("6.1."), "{}", v.kernel_release);
    assert_eq!(v.boot_id.len(), 36, "boot id {:?}", v.boot_id);
    assert_eq!(v.boot_id, sb.version().boot_id, "same VM, same boot id");
    assert!(sb.run_dir().join("console.log").is_file());
    let exit = sb.stop().await.unwrap();
    assert!(exit.success(), "QEMU exit after SIGTERM: {exit}");
    assert_nothing_left(&cfg, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_answers_and_cleans_up_over_vsock() {
    let root = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config(root.path()) else {
        return;
    };
    boot_and_check(cfg, "vsock1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_answers_and_cleans_up_over_virtio_serial() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config(root.path()) else {
        return;
    };
    cfg.channel = vessel_hypervisor::AgentChannel::Serial;
    boot_and_check(cfg, "serial1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_flight_is_reported_and_cleaned_up() {
    let root = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config(root.path()) else {
        return;
    };
    let hv = hypervisor(&cfg).unwrap();
    let sb = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("killed", &cfg))
        .await
        .unwrap();
    let pids = sb.vm().pids();
    assert!(sb.vm().try_exit().is_none());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), sb.vm().wait())
        .await
        .expect("VM exit reported");
    assert_eq!(exit.signal, Some(9), "{exit}");
    assert_eq!(sb.vm().try_exit(), Some(exit));
    // The agent is gone with the VM.
    assert!(sb.agent().check(Duration::from_secs(2)).await.is_err());
    sb.stop().await.unwrap();
    assert_nothing_left(&cfg, &pids);
}

#[tokio::test]
async fn missing_kernel_is_a_clear_error_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config(root.path()) else {
        return;
    };
    cfg.guest_kernel = root.path().join("no-such-vmlinux");
    let hv = hypervisor(&cfg).unwrap();
    let err = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("nokernel", &cfg))
        .await
        .err()
        .unwrap();
    let msg = vessel_runtime::chain(&err).to_string();
    assert!(
        msg.contains("guest kernel not found") && msg.contains("no-such-vmlinux"),
        "{msg}"
    );
    assert_nothing_left(&cfg, &[]);
}

#[tokio::test]
async fn unwritable_state_root_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config(root.path()) else {
        return;
    };
    let file = root.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    cfg.state_root = file.join("root");
    let hv = hypervisor(&cfg).unwrap();
    let err = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("x", &cfg))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::StateDir { .. }), "{err}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

#[tokio::test]
async fn missing_qemu_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config(root.path()) else {
        return;
    };
    cfg.qemu.path = root.path().join("qemu-nope");
    let err = vessel_runtime::chain(&hypervisor(&cfg).err().unwrap()).to_string();
    assert!(
        err.contains("QEMU not found") && err.contains("qemu-nope"),
        "{err}"
    );
}

#[tokio::test]
async fn a_guest_that_never_gets_ready_times_out_and_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config(root.path()) else {
        return;
    };
    // An initramfs whose /init is not our agent: the guest panics and QEMU exits.
    let other = tempfile::tempdir().unwrap();
    let bogus = other.path().join("bogus.cpio.gz");
    std::fs::write(&bogus, b"this is not a cpio archive").unwrap();
    cfg.guest_initramfs = bogus;
    cfg.boot_timeout_secs = Some(20);
    let hv = hypervisor(&cfg).unwrap();
    let err = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("bogus", &cfg))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::VmDiedEarly { .. } | Error::BootTimeout { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("Kernel panic") || err.to_string().contains("Timed out"),
        "{err}"
    );
    assert_nothing_left(&cfg, &[]);
}
