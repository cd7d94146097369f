//! Snapshot and restore of real sandbox VMs. The runtime's restore path sets
//! the guest clock and reseeds the guest RNG through the agent, so that clones
//! of one snapshot neither keep the snapshot's time nor share RNG state.
//!
//! QEMU (TCG here, KVM on hardware-KVM hosts and with
//! `VESSEL_TEST_HYPERVISOR=qemu-kvm`) over virtio-serial runs everywhere; the
//! built-in VMM case (jailed) needs hardware KVM: `make test` runs it in the KVM
//! lane.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{assert_nothing_left, guest_config_with, TestHypervisor};
use vessel_hypervisor::host::{detect_kvm, KvmKind};
use vessel_hypervisor::Hypervisor;
use vessel_runtime::sandbox::{hypervisor, Sandbox, SandboxSpec};
use vessel_runtime::Config;

const CLONES: usize = 10;
/// 2001-09-09: the template's clock is set here before the snapshot.
const OLD_TIME: u64 = 1_000_000_000;
/// How far a clone's clock may be from the host's (outside the probe's round trip).
const MAX_CLOCK_OFFSET_SECS: f64 = 1.0;

fn seconds_apart(a: SystemTime, b: SystemTime) -> f64 {
    match a.duration_since(b) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => e.duration().as_secs_f64(),
    }
}

/// Boots a template, sets its clock to 2001, snapshots it, restores
/// [`CLONES`] clones one after another and checks each: same guest (boot id),
/// the host's time, an RNG sample no other clone (nor the template) produced.
async fn snapshot_and_restore_clones(cfg: &Config, hv: &dyn Hypervisor, snap_dir: &Path) {
    snapshot_and_restore_clones_of(cfg, hv, snap_dir, |id| SandboxSpec::new(id, cfg)).await
}

/// [`snapshot_and_restore_clones`] of sandboxes of `spec`'s shape; devices
/// held back by the template ([`SandboxSpec::deferred_devices`]) are plugged
/// in after its snapshot and after each restore, and the agent is then on vsock.
async fn snapshot_and_restore_clones_of(
    cfg: &Config,
    hv: &dyn Hypervisor,
    snap_dir: &Path,
    spec: impl Fn(&str) -> SandboxSpec,
) {
    let deferred = spec("probe").deferred_devices;
    let mut template = Sandbox::boot(cfg, hv, spec("template")).await.unwrap();
    let mut pids = template.vm().pids();
    template
        .agent()
        .set_clock(UNIX_EPOCH + Duration::from_secs(OLD_TIME))
        .await
        .unwrap();
    let before = template.agent().probe().await.unwrap();
    assert!(
        seconds_apart(before.realtime, UNIX_EPOCH + Duration::from_secs(OLD_TIME)) < 60.0,
        "template clock was set: {:?}",
        before.realtime
    );
    template.snapshot(snap_dir).await.unwrap();
    assert!(snap_dir
        .join(vessel_hypervisor::snapshot::SNAPSHOT_INFO)
        .is_file());
    // The template runs on after its snapshot.
    let after = template.agent().probe().await.unwrap();
    assert_eq!(after.boot_id, before.boot_id);
    let mut samples = vec![before.random_sample, after.random_sample];
    template.attach_deferred(cfg).await.unwrap();
    pids.extend(template.vm().pids());
    template.stop().await.unwrap();

    for i in 0..CLONES {
        let id = format!("clone{i}");
        let clone = Sandbox::restore_with(cfg, hv, spec(&id), snap_dir)
            .await
            .unwrap_or_else(|e| panic!("restoring {id}: {e}"));
        pids.extend(clone.vm().pids());
        if deferred {
            // Plugged in: the agent is on vsock, the back ends run, and the VM
            // can no longer be snapshotted.
            assert!(
                matches!(
                    clone.vm().agent_endpoint(),
                    vessel_hypervisor::AgentEndpoint::HybridVsock { .. }
                ),
                "{id}: {:?}",
                clone.vm().agent_endpoint()
            );
            assert_eq!(
                clone.vm().pids().len(),
                3,
                "QEMU, virtiofsd, vhost-device-vsock"
            );
            let again = snap_dir.with_extension(format!("again{i}"));
            let err = vessel_runtime::chain(&clone.snapshot(&again).await.unwrap_err()).to_string();
            assert!(err.contains("plugged in"), "{err}");
            assert!(!again.exists());
        }
        let asked = SystemTime::now();
        let p = clone.agent().probe().await.unwrap();
        let answered = SystemTime::now();
        assert_eq!(p.boot_id, before.boot_id, "{id} is the template's guest");
        // The guest read its clock between `asked` and `answered`.
        let off = if p.realtime < asked {
            seconds_apart(asked, p.realtime)
        } else if p.realtime > answered {
            seconds_apart(p.realtime, answered)
        } else {
            0.0
        };
        assert!(
            off < MAX_CLOCK_OFFSET_SECS,
            "{id}: guest clock {off:.3} s away from the host's after restore"
        );
        assert!(
            !samples.contains(&p.random_sample),
            "{id}: RNG sample {:02x?} repeats an earlier clone's",
            p.random_sample
        );
        samples.push(p.random_sample);
        eprintln!(
            "{id}: clock off by {off:.3} s, rng {:02x?}",
            &p.random_sample[..4]
        );
        let exit = clone.stop().await.unwrap();
        assert!(exit.success(), "{id}: {exit}");
    }
    assert_nothing_left(cfg, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_clones_get_the_host_clock_and_distinct_rng() {
    let root = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let Some(mut cfg) = guest_config_with(root.path(), qemu()) else {
        return;
    };
    // QEMU cannot migrate vhost-user-vsock: snapshots use virtio-serial.
    cfg.channel = vessel_hypervisor::AgentChannel::Serial;
    let hv = hypervisor(&cfg).unwrap();
    let snap = snaps.path().join("snap");
    snapshot_and_restore_clones(&cfg, hv.as_ref(), &snap).await;

    // A damaged stream: QEMU refuses it, the error says so, nothing is left.
    let stream = snap.join("qemu-migration");
    let len = std::fs::metadata(&stream).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&stream)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let err = Sandbox::restore(&cfg, hv.as_ref(), "broken", &snap)
        .await
        .err()
        .expect("a truncated snapshot cannot be restored");
    let err = vessel_runtime::chain(&err).to_string();
    assert!(err.contains("loading the snapshot"), "{err}");
    assert_nothing_left(&cfg, &[]);

    // Not a snapshot at all.
    let err = Sandbox::restore(&cfg, hv.as_ref(), "none", snaps.path())
        .await
        .err()
        .unwrap();
    let err = vessel_runtime::chain(&err).to_string();
    assert!(err.contains("snapshot description"), "{err}");
    assert_nothing_left(&cfg, &[]);
}

/// A sandbox of the templates' shape: one share (`share`, tag `vessel`), its
/// devices deferred.
fn deferred_spec(id: &str, cfg: &Config, share: &Path) -> SandboxSpec {
    SandboxSpec {
        shared_dirs: vec![vessel_hypervisor::SharedDir {
            tag: "vessel".into(),
            host_path: share.to_path_buf(),
            read_only: false,
        }],
        deferred_devices: true,
        ..SandboxSpec::new(id, cfg)
    }
}

/// The templates' shape on QEMU (the default configuration: vsock channel, a
/// virtio-fs share): the VM starts without its vhost-user devices, so it can
/// be snapshotted, and they are plugged in after the snapshot and into every clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_clones_with_deferred_devices_get_the_host_clock_distinct_rng_and_vsock() {
    let root = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config_with(root.path(), qemu()) else {
        return;
    };
    assert_eq!(cfg.channel, vessel_hypervisor::AgentChannel::Vsock);
    let hv = hypervisor(&cfg).unwrap();
    let spec = |id: &str| deferred_spec(id, &cfg, share.path());
    let snap = snaps.path().join("snap");
    snapshot_and_restore_clones_of(&cfg, hv.as_ref(), &snap, spec).await;
    // The RAM is outside the stream, in a sparse file.
    let stream = std::fs::metadata(snap.join("qemu-migration"))
        .unwrap()
        .len();
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    eprintln!(
        "stream {} KiB, memory {} MiB of which {} MiB allocated",
        stream >> 10,
        memory.len() >> 20,
        (memory.blocks() * 512) >> 20
    );
    assert!(stream < 8 << 20, "device state only: {stream} bytes");
    assert_eq!(memory.len(), u64::from(cfg.default_memory_mib) << 20);
    assert!(memory.blocks() * 512 < memory.len() / 2, "sparse");
}

/// A QEMU clone whose devices cannot be plugged in (here: no virtiofsd) is not
/// handed out: the restore fails with the reason, and its VM, its back ends and
/// its run directory are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_clone_whose_devices_cannot_be_plugged_in_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config_with(root.path(), qemu()) else {
        return;
    };
    let hv = hypervisor(&cfg).unwrap();

    let template = Sandbox::boot(
        &cfg,
        hv.as_ref(),
        deferred_spec("template", &cfg, share.path()),
    )
    .await
    .unwrap();
    let pids = template.vm().pids();
    let snap = snaps.path().join("snap");
    template.snapshot(&snap).await.unwrap();
    template.stop().await.unwrap();

    let mut broken = cfg.clone();
    broken.qemu.virtiofsd_path = root.path().join("no-virtiofsd");
    let hv = hypervisor(&broken).unwrap();
    let err = Sandbox::restore_with(
        &broken,
        hv.as_ref(),
        deferred_spec("clone", &broken, share.path()),
        &snap,
    )
    .await
    .err()
    .expect("a clone without its virtio-fs back end is not handed out");
    let err = vessel_runtime::chain(&err).to_string();
    assert!(err.contains("virtiofsd not found"), "{err}");
    assert_nothing_left(&cfg, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_vsock_qemu_vm_is_refused_and_the_vm_runs_on() {
    let root = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config_with(root.path(), qemu()) else {
        return;
    };
    assert_eq!(cfg.channel, vessel_hypervisor::AgentChannel::Vsock);
    let hv = hypervisor(&cfg).unwrap();
    let sb = Sandbox::boot(&cfg, hv.as_ref(), SandboxSpec::new("vsock", &cfg))
        .await
        .unwrap();
    let pids = sb.vm().pids();
    let dir = snaps.path().join("snap");
    let err = vessel_runtime::chain(&sb.snapshot(&dir).await.unwrap_err()).to_string();
    assert!(err.contains("vhost-user-vsock"), "{err}");
    assert!(!dir.exists(), "nothing written");
    sb.agent().check(Duration::from_secs(5)).await.unwrap();
    sb.stop().await.unwrap();
    assert_nothing_left(&cfg, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_clones_get_the_host_clock_and_distinct_rng() {
    let (kvm, why) = detect_kvm();
    if !vessel_testutil::hardware_kvm(
        "builtin_clones_get_the_host_clock_and_distinct_rng",
        kvm == KvmKind::Hardware,
        &format!("this host's KVM is {kvm}: {why}"),
    ) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let snaps = tempfile::tempdir().unwrap();
    let Some(cfg) = guest_config_with(root.path(), TestHypervisor::Builtin) else {
        return;
    };
    let hv = hypervisor(&cfg).unwrap();
    snapshot_and_restore_clones(&cfg, hv.as_ref(), &snaps.path().join("snap")).await;
}

/// The QEMU tests' backend: QEMU with KVM when the run asks for it
/// (`VESSEL_TEST_HYPERVISOR=qemu-kvm`), else the configuration's default.
fn qemu() -> TestHypervisor {
    match TestHypervisor::from_env() {
        TestHypervisor::QemuKvm => TestHypervisor::QemuKvm,
        _ => TestHypervisor::Default,
    }
}
