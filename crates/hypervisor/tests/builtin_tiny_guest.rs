//! The `builtin` backend's process handling, snapshot and restore, driven with
//! vessel-vmm and the VMM's tiny test guest (a vsock echo server). Runs on any
//! /dev/kvm, the software KVM of the development hosts included: the tiny guest
//! needs no Linux user space. The full guest on the built-in VMM is covered by
//! the hardware-KVM tests (vessel-runtime's sandbox_snapshot, vessel-vmm's
//! hardware_kvm).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{binary, echo, kvm_unusable, skip, tiny_guest, wait_for_text};
use vessel_hypervisor::builtin::{Builtin, BuiltinConfig};
use vessel_hypervisor::{AgentChannel, Hypervisor, Vm, VmConfig};

const TEST: &str = "builtin_tiny_guest";

fn vm_config(dir: &Path, guest: &Path, initramfs: &Path, id: &str) -> VmConfig {
    let run_dir = dir.join(id);
    std::fs::create_dir(&run_dir).unwrap();
    VmConfig {
        id: id.into(),
        vsock_uds: run_dir.join("vsock.sock"),
        console_log: run_dir.join("console.log"),
        log_limits: Default::default(),
        run_dir,
        kernel: guest.into(),
        initramfs: initramfs.into(),
        kernel_args: vec!["mode=vsock".into()],
        vcpus: 1,
        memory_mib: 64,
        channel: AgentChannel::Vsock,
        shared_dirs: vec![],
        nics: Vec::new(),
        netns: None,
        cgroup: None,
        deferred_devices: false,
    }
}

async fn stop(vm: Box<dyn Vm>) {
    let pids = vm.pids();
    vm.stop(Duration::from_secs(2)).await.unwrap();
    for pid in pids {
        // stop() reaped it: the pid is gone, not a zombie.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "vessel-vmm pid {pid} still exists"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_two_restores_of_a_running_guest() {
    if let Some(why) = kvm_unusable() {
        return skip(TEST, &why);
    }
    let Some(vmm) = binary("VESSEL_VMM", "vessel-vmm") else {
        return skip(
            TEST,
            "target/debug/vessel-vmm is missing: cargo build -p vessel-vmm (or set VESSEL_VMM)",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let (guest, initramfs) = tiny_guest(dir.path());
    let hv = Builtin::new(BuiltinConfig {
        vmm,
        virtiofsd: "/nonexistent/virtiofsd".into(),
        require_hardware_kvm: false,
        jailer: None,
    })
    .unwrap();
    assert!(hv.capabilities().snapshot);

    let cfg = vm_config(dir.path(), &guest, &initramfs, "template");
    let vm = hv.launch(&cfg).await.unwrap();
    wait_for_text(&cfg.console_log, "VSOCK-READY");
    echo(&cfg.vsock_uds, 1234, "before the snapshot\n");
    let snap = dir.path().join("snap");
    vm.snapshot(&snap).await.unwrap();
    for f in ["state.json", "memory", "vessel-snapshot.json"] {
        assert!(snap.join(f).is_file(), "{f} missing from the snapshot");
    }
    // The template is paused after the snapshot and runs on once resumed.
    vm.resume().await.unwrap();
    echo(&cfg.vsock_uds, 1235, "template after the snapshot\n");
    stop(vm).await;

    for i in 0..2 {
        let cfg = vm_config(dir.path(), &guest, &initramfs, &format!("clone{i}"));
        let vm = hv.restore(&snap, &cfg).await.unwrap();
        // The restored guest learns that its old connections are gone.
        wait_for_text(&cfg.console_log, "VSOCK-EVENT transport reset");
        echo(&cfg.vsock_uds, 2000 + i, &format!("clone {i}\n"));
        assert!(vm.try_exit().is_none());
        stop(vm).await;
    }

    // Bad input: a clear error, no process left behind.
    let mut bigger = vm_config(dir.path(), &guest, &initramfs, "bigger");
    bigger.memory_mib = 128;
    let e = hv.restore(&snap, &bigger).await.err().unwrap().to_string();
    assert!(e.contains("64 MiB") && e.contains("128 MiB"), "{e}");
    std::fs::remove_file(snap.join("state.json")).unwrap();
    let cfg = vm_config(dir.path(), &guest, &initramfs, "nostate");
    let e = hv.restore(&snap, &cfg).await.err().unwrap().to_string();
    assert!(e.contains("state.json"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = hv.restore(&empty, &cfg).await.err().unwrap().to_string();
    assert!(e.contains("snapshot description"), "{e}");
}
