//! Boots the project's Linux guest kernel to `Run /init` with a block and a vsock device and
//! checks that both virtio-mmio devices were probed and the disk's partitions scanned; and
//! checks the bzImage entry path as far as this host allows (into the kernel's decompressor).
//!
//! Slow on PVM (the software KVM of the development hosts runs guest kernel code through an
//! emulator: minutes, not milliseconds), so it is its own test binary:
//! `cargo test --test linux_boot`. It needs the kernel from guest/kernel/build.sh
//! (`build/guest/vmlinux`, or set `VESSEL_GUEST_KERNEL`; the bzImage beside it, or in
//! `VESSEL_GUEST_DIR`), and skips loudly without it or without /dev/kvm (in CI that fails).
//! `VESSEL_SKIP_LINUX_BOOT=1` skips the slow vmlinux boot on purpose.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vessel_vmm::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, ZERO_PAGE_START};

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

/// The kernel at `path` if this test can run (KVM usable, kernel built); else skips.
fn kernel_or_skip(test: &str, path: PathBuf) -> Option<PathBuf> {
    if !kvm_available(test) {
        return None;
    }
    if !path.exists() {
        skip(
            test,
            &format!(
                "no guest kernel at {} (build it with guest/kernel/build.sh build/guest, or set \
                 VESSEL_GUEST_KERNEL / VESSEL_GUEST_DIR)",
                path.display()
            ),
        );
        return None;
    }
    Some(path)
}

#[test]
fn linux_boots_to_init_with_virtio_devices_probed() {
    if std::env::var_os("VESSEL_SKIP_LINUX_BOOT").is_some() {
        eprintln!("\n*** SKIPPED linux boot: VESSEL_SKIP_LINUX_BOOT is set ***\n");
        return;
    }
    let test = "linux_boots_to_init_with_virtio_devices_probed";
    let Some(kernel) = kernel_or_skip(test, guest_kernel()) else {
        return;
    };
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

/// The guest-physical range a bzImage decompresses itself in: the kernel's preferred load
/// address and the memory it needs there (`pref_address`, `init_size` in the setup header,
/// Documentation/arch/x86/boot.rst). The 64-bit entry code moves the decompressor to the
/// top of this range before it runs.
fn decompressor_region(bzimage: &Path) -> Range<u64> {
    let image = std::fs::read(bzimage).unwrap();
    assert_eq!(
        &image[0x202..0x206],
        b"HdrS",
        "{} is not a bzImage",
        bzimage.display()
    );
    let pref_address = u64::from_le_bytes(image[0x258..0x260].try_into().unwrap());
    let init_size = u32::from_le_bytes(image[0x260..0x264].try_into().unwrap());
    pref_address..pref_address + u64::from(init_size)
}

/// The bzImage path up to where this host allows: the VMM loads the image, writes the zero
/// page (boot_params) and enters the 64-bit entry point. Under PVM the kernel's decompressor
/// then runs silently for over three minutes (docs/vmm.md), so the test looks at the vCPU
/// instead (`pause` + `snapshot`): in long mode, RIP inside the decompressor's region and
/// moving.
#[test]
fn bzimage_enters_64bit_entry_and_runs_the_decompressor() {
    const EFER_LMA: u64 = 1 << 10;
    const CR0_PG: u64 = 1 << 31;
    let test = "bzimage_enters_64bit_entry_and_runs_the_decompressor";
    let Some(bzimage) = kernel_or_skip(test, guest_bzimage()) else {
        return;
    };
    let region = decompressor_region(&bzimage);
    let dir = scratch("bzimage");
    let initrd = dir.path().join("initrd.cpio");
    let api_sock = dir.path().join("api.sock");
    let snap = dir.path().join("snapshot");
    let log = dir.path().join("serial.log");
    std::fs::write(&initrd, initramfs(b"#!/bin/false\n")).unwrap();
    let start = Instant::now();
    let mut vmm = Guard(spawn(&[
        "--kernel",
        bzimage.to_str().unwrap(),
        "--initramfs",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1",
        "--mem-mib",
        "128",
        "--api-sock",
        api_sock.to_str().unwrap(),
        "--serial-log",
        log.to_str().unwrap(),
    ]));
    let snapshot_request = serde_json::json!({"action": "snapshot", "dir": snap}).to_string();
    let mut rips = Vec::new();
    // Each sample stops the vCPU for ~0.1 s (the snapshot writes guest memory): let it run
    // for a while between samples, or it hardly gets anywhere.
    let mut last_sample = Instant::now();
    let moving_inside = poll(Duration::from_secs(15), || {
        if last_sample.elapsed() < Duration::from_millis(250) {
            return None;
        }
        assert_eq!(api(&api_sock, r#"{"action":"pause"}"#)["ok"], true);
        let resp = api(&api_sock, &snapshot_request);
        assert_eq!(resp["ok"], true, "{resp}");
        assert_eq!(api(&api_sock, r#"{"action":"resume"}"#)["ok"], true);
        last_sample = Instant::now();
        let state = vessel_vmm::snapshot::read_state(&snap).unwrap();
        let (regs, sregs) = (&state.vcpus[0].regs, &state.vcpus[0].sregs);
        assert!(
            sregs.efer & EFER_LMA != 0 && sregs.cr0 & CR0_PG != 0 && sregs.cs.l == 1,
            "vCPU not in 64-bit mode at RIP {:#x}: EFER {:#x} CR0 {:#x} CS.L {}",
            regs.rip,
            sregs.efer,
            sregs.cr0,
            sregs.cs.l
        );
        rips.push(regs.rip);
        let mut inside = rips.iter().filter(|rip| region.contains(rip));
        let first = inside.next()?;
        inside.any(|rip| rip != first).then_some(())
    });
    assert!(
        moving_inside.is_some(),
        "expected two different RIPs inside the decompressor's region {region:#x?}, sampled \
         {rips:#x?}"
    );
    eprintln!(
        "bzImage: RIP samples {rips:x?} (decompressor region {region:x?}) within {:?}",
        start.elapsed()
    );

    // The zero page the decompressor was handed, as it is in guest memory now.
    let memory = std::fs::read(snap.join(vessel_vmm::snapshot::MEMORY_FILE)).unwrap();
    let zero_page = &memory[ZERO_PAGE_START as usize..][..4096];
    let u32_at = |off: usize| u32::from_le_bytes(zero_page[off..off + 4].try_into().unwrap());
    assert_eq!(
        &zero_page[0x202..0x206],
        b"HdrS",
        "no setup header in the zero page"
    );
    assert_eq!(u64::from(u32_at(0x228)), CMDLINE_START, "cmd_line_ptr");
    assert_eq!(
        u64::from(u32_at(0x21c)),
        std::fs::metadata(&initrd).unwrap().len(),
        "ramdisk_size"
    );
    assert!(zero_page[0x1e8] >= 2, "e820_entries {}", zero_page[0x1e8]);
    let cmdline = &memory[CMDLINE_START as usize..][..CMDLINE_MAX_SIZE];
    let cmdline =
        String::from_utf8_lossy(&cmdline[..cmdline.iter().position(|b| *b == 0).unwrap()]);
    assert!(
        cmdline.starts_with("console=ttyS0 reboot=k panic=1"),
        "{cmdline}"
    );
    if vessel_vmm::config::host_is_pvm() {
        assert!(
            cmdline.contains("clearcpuid="),
            "PVM quirks missing: {cmdline}"
        );
    }

    assert!(vmm.0.try_wait().unwrap().is_none(), "the VMM exited");
    assert_eq!(api(&api_sock, r#"{"action":"shutdown"}"#)["ok"], true);
    let status = wait_exit(&mut vmm.0, Duration::from_secs(10));
    assert!(status.success(), "VMM exit after shutdown: {status}");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!console.contains("Kernel panic"), "{console}");
}
