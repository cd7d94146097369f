//! Boots the project's Linux guest kernel to `Run /init` with a block and a vsock device and
//! checks that both virtio-mmio devices were probed and the disk's partitions scanned.
//!
//! Slow on PVM (the software KVM of the development hosts runs guest kernel code through an
//! emulator: minutes, not milliseconds), so it is its own test binary:
//! `cargo test --test linux_boot`. It needs the kernel from guest/kernel/build.sh
//! (`build/guest/vmlinux`, or set `VESSEL_GUEST_KERNEL`), and skips loudly without it or
//! without /dev/kvm. `VESSEL_SKIP_LINUX_BOOT=1` skips it on purpose.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A newc cpio archive holding one executable file, `/init`.
fn initramfs(init: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |name: &str, mode: u32, data: &[u8]| {
        let namesize = name.len() + 1;
        out.extend_from_slice(
            format!(
                "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                1, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, namesize, 0
            )
            .as_bytes(),
        );
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    entry("init", 0o100755, init);
    entry("TRAILER!!!", 0, &[]);
    out
}

/// A 4 MiB disk with an MBR holding one Linux partition.
fn partitioned_disk() -> Vec<u8> {
    let mut d = vec![0u8; 4 << 20];
    let start: u32 = 2048;
    let sectors: u32 = (4 << 20) / 512 - start;
    let e = &mut d[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xaa;
    d
}

/// Whether this process may create a tap (root with /dev/net/tun).
fn open_tap_possible(_name: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    std::path::Path::new("/dev/net/tun").exists() && unsafe { libc::geteuid() } == 0
}

#[test]
fn linux_boots_to_init_with_virtio_devices_probed() {
    if std::env::var_os("VESSEL_SKIP_LINUX_BOOT").is_some() {
        eprintln!("\n*** SKIPPED linux boot: VESSEL_SKIP_LINUX_BOOT is set ***\n");
        return;
    }
    if !kvm_available("linux_boots_to_init_with_virtio_devices_probed") {
        return;
    }
    let kernel = std::env::var_os("VESSEL_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/guest/vmlinux")
        });
    if !kernel.exists() {
        eprintln!(
            "\n*** SKIPPED linux boot: no guest kernel at {} (build it with \
             guest/kernel/build.sh build/guest, or set VESSEL_GUEST_KERNEL) ***\n",
            kernel.display()
        );
        return;
    }
    let dir = scratch("linux");
    let log = dir.path().join("serial.log");
    let initrd = dir.path().join("initrd.cpio");
    let disk = dir.path().join("disk.img");
    let uds = dir.path().join("v.sock");
    // /init only needs to exist: the kernel announces it before executing it.
    std::fs::write(&initrd, initramfs(b"#!/bin/false\n")).unwrap();
    std::fs::write(&disk, partitioned_disk()).unwrap();
    // Optional devices whose host side may be missing: a tap (needs CAP_NET_ADMIN) and
    // virtiofsd. Each present one must be probed too.
    let tap = format!("vlb{}", std::process::id() % 100000);
    let tap_ok = open_tap_possible(&tap);
    let fs_sock = dir.path().join("fs.sock");
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let _virtiofsd = find_virtiofsd().and_then(|bin| start_virtiofsd(&bin, &fs_sock, &share));
    let mut extra: Vec<String> = vec!["--rng".into(), "--balloon-mib".into(), "0".into()];
    let mut expect_types = vec![2, 19, 4, 5];
    if tap_ok {
        extra.extend(["--net".into(), tap.clone()]);
        expect_types.push(1);
    } else {
        eprintln!("\n*** linux boot: no tap device possible here; virtio-net not tested ***\n");
    }
    if _virtiofsd.is_some() {
        extra.extend(["--fs".into(), format!("{},tag=shared", fs_sock.display())]);
        expect_types.push(26);
    } else {
        eprintln!("\n*** linux boot: no virtiofsd; virtio-fs not tested ***\n");
    }
    let start = Instant::now();
    let child = Command::new(vmm_bin())
        .env("VESSEL_VMM_LOG", "info")
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initrd.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1",
            "--mem-mib",
            "128",
            "--block",
            disk.to_str().unwrap(),
            "--vsock-uds",
            uds.to_str().unwrap(),
            "--vsock-cid",
            "3",
            "--serial-log",
            log.to_str().unwrap(),
        ])
        .args(&extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Guard(child);
    let out = wait_for_text(&log, "Run /init as init process", Duration::from_secs(600));
    eprintln!("Linux reached `Run /init` after {:?}", start.elapsed());
    for line in out.lines().filter(|l| {
        [
            "virtio",
            "vda",
            "Run /init",
            "PF_VSOCK",
            "Kernel command line",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("console: {line}");
    }
    for needle in [
        "Registering device virtio-mmio.0 at 0xd0000000-0xd0000fff, IRQ 5.",
        "Registering device virtio-mmio.1 at 0xd0001000-0xd0001fff, IRQ 6.",
        "virtio_blk virtio0: [vda] 8192 512-byte logical blocks",
        " vda: vda1",
        "NET: Registered PF_VSOCK protocol family",
    ] {
        assert!(
            out.contains(needle),
            "missing {needle:?} in console log:\n{out}"
        );
    }
    let _ = child.0.kill();
    let output = std::mem::replace(&mut child.0, Command::new("true").spawn().unwrap())
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| l.contains("activated")) {
        eprintln!("vmm: {line}");
    }
    for t in expect_types {
        let needle = format!("virtio device type {t} activated");
        assert!(
            stderr.contains(&needle),
            "missing {needle:?} in VMM log:\n{stderr}"
        );
    }
    assert!(
        !out.contains("probe of virtio"),
        "a virtio driver failed to probe:\n{out}"
    );
}
