//! The `builtin` backend with `BuiltinConfig.jailer`: vessel-vmm under vessel-jailer,
//! driven with the VMM's tiny test guest (a vsock echo server), on any /dev/kvm. Proves
//! the rewritten command line: the guest boots from the read-only bound kernel, and the
//! vsock and API sockets the jailed VMM creates appear in the sandbox's run directory.
//! Needs root, target/debug/vessel-vmm and target/debug/vessel-jailer (`cargo build -p
//! vessel-vmm -p vessel-jailer`, or VESSEL_VMM / VESSEL_JAILER); skips loudly without
//! them, fails in CI.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{binary, echo, kvm_unusable, skip, tiny_guest, wait_for_text};
use vessel_hypervisor::builtin::{Builtin, BuiltinConfig, JailerConfig};
use vessel_hypervisor::{AgentChannel, Hypervisor, VmConfig};

const TEST: &str = "builtin_jailed";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_builtin_vm_serves_vsock_through_the_run_dir() {
    if !nix::unistd::geteuid().is_root() {
        return skip(
            TEST,
            "needs root (the jailer makes namespaces, mounts and cgroups)",
        );
    }
    if let Some(why) = kvm_unusable() {
        return skip(TEST, &why);
    }
    let (Some(vmm), Some(jailer)) = (
        binary("VESSEL_VMM", "vessel-vmm"),
        binary("VESSEL_JAILER", "vessel-jailer"),
    ) else {
        return skip(TEST, "target/debug/vessel-vmm or vessel-jailer is missing: cargo build -p vessel-vmm -p vessel-jailer");
    };
    let dir = tempfile::tempdir().unwrap();
    let (guest, initramfs) = tiny_guest(dir.path());
    let jail_root = dir.path().join("jail");
    let hv = Builtin::new(BuiltinConfig {
        vmm,
        virtiofsd: "/nonexistent/virtiofsd".into(),
        require_hardware_kvm: false,
        jailer: Some(JailerConfig {
            path: jailer,
            uid: 65534,
            gid: 65534,
            jail_root: jail_root.clone(),
            cgroup_mem_mib: Some(256),
            cgroup_cpus: None,
        }),
    })
    .unwrap();
    let id = format!("hvjail-{}", std::process::id());
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let cfg = VmConfig {
        id: id.clone(),
        vsock_uds: run_dir.join("vsock.sock"),
        console_log: run_dir.join("console.log"),
        log_limits: Default::default(),
        run_dir: run_dir.clone(),
        kernel: guest,
        initramfs,
        kernel_args: vec!["mode=vsock".into()],
        vcpus: 1,
        memory_mib: 64,
        channel: AgentChannel::Vsock,
        shared_dirs: vec![],
        nics: Vec::new(),
        netns: None,
        cgroup: None,
        deferred_devices: false,
    };
    let vm = hv.launch(&cfg).await.unwrap();
    wait_for_text(&cfg.console_log, "VSOCK-READY");
    assert!(jail_root.join(&id).join("root").is_dir(), "no jail");
    // The jailed VMM, not root, created the console log in the run directory.
    assert_eq!(std::fs::metadata(&cfg.console_log).unwrap().uid(), 65534);

    echo(&cfg.vsock_uds, 1234, "through the jail\n");

    // The jailed VMM can write only its run directory: the snapshot is staged
    // there and moved out, owned by root.
    let snap = dir.path().join("snap");
    vm.snapshot(&snap).await.unwrap();
    for f in ["state.json", "memory", "vessel-snapshot.json"] {
        let m = std::fs::metadata(snap.join(f)).unwrap();
        assert_eq!(m.uid(), 0, "{f} owned by root");
    }
    assert!(!run_dir.join("snapshot.partial").exists());
    vm.resume().await.unwrap();
    echo(&cfg.vsock_uds, 1235, "template after its snapshot\n");

    let pids = vm.pids();
    // stop() sends SIGTERM, which the jailer forwards; the VMM (PID 1 of its own PID
    // namespace, with a handler) stops the VM and exits 0, and so does the jailer after
    // cleaning up; well within the grace, which ends in SIGKILL.
    let stopping = std::time::Instant::now();
    let exit = vm.stop(Duration::from_secs(5)).await.unwrap();
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "stop took {:?}",
        stopping.elapsed()
    );
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
    }
    assert!(!jail_root.join(&id).exists(), "jail directory left");
    for cg in ["vessel", "memory/vessel", "cpu/vessel"] {
        let d = Path::new("/sys/fs/cgroup").join(cg).join(&id);
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(jail_root.to_str().unwrap()));

    // A jailed clone from that snapshot (bound read-only into its jail).
    let clone_run = dir.path().join("clone-run");
    std::fs::create_dir(&clone_run).unwrap();
    let clone_id = format!("{id}-clone");
    let clone_cfg = VmConfig {
        id: clone_id.clone(),
        vsock_uds: clone_run.join("vsock.sock"),
        console_log: clone_run.join("console.log"),
        log_limits: Default::default(),
        run_dir: clone_run.clone(),
        ..cfg.clone()
    };
    let clone = hv.restore(&snap, &clone_cfg).await.unwrap();
    // Restoring into a jail opened the snapshot to the jail group, no one else.
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.permissions().mode() & 0o777),
        (0, 65534, 0o640)
    );
    assert!(jail_root.join(&clone_id).join("root").is_dir(), "no jail");
    // The restored VMM queues a vsock transport reset for the guest. A connection
    // made before the guest has handled it is reset with the guest's old ones (the
    // echo then reads end-of-file: seen under load), so wait for the guest's word,
    // as the unjailed restore test does.
    wait_for_text(&clone_cfg.console_log, "VSOCK-EVENT transport reset");
    echo(&clone_cfg.vsock_uds, 1236, "clone through its jail\n");
    let pids = clone.pids();
    clone.stop(Duration::from_secs(5)).await.unwrap();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} left"
        );
    }
    assert!(!jail_root.join(&clone_id).exists(), "jail directory left");
}
