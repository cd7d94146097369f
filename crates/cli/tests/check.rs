//! `vessel check` on bad input: a clear reason and a non-zero exit.

use std::path::Path;
use std::process::Command;

fn vessel(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vessel"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn missing_guest_kernel_and_initramfs_fail_with_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "state_root = \"{0}/state\"\nguest_kernel = \"{0}/nope-vmlinux\"\nguest_initramfs = \"{0}/nope.cpio.gz\"\nchannel = \"serial\"\n",
            d.path().display()
        ),
    );
    let (ok, out) = vessel(&cfg, &["check"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("guest kernel not found at") && out.contains("nope-vmlinux"),
        "{out}"
    );
    assert!(out.contains("guest initramfs not found at"), "{out}");
    assert!(out.contains("this host cannot run sandboxes"), "{out}");
    // The state root check creates it as the runtime does: 0711 (the KVM
    // lane's `check --audit` found 0755 here).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.path().join("state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o711, "state root mode {mode:o}");
}

#[test]
fn missing_qemu_fails_with_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        &format!(
            "channel = \"serial\"\n[qemu]\npath = \"{}/no-qemu\"\n",
            d.path().display()
        ),
    );
    let (ok, out) = vessel(&cfg, &["check"]);
    assert!(!ok);
    assert!(
        out.contains("QEMU not found at") && out.contains("apt-get install qemu-system-x86"),
        "{out}"
    );
}

#[test]
fn unwritable_state_root_fails_with_reason() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let cfg = write_config(
        d.path(),
        &format!("state_root = \"{}/sub\"\n", file.display()),
    );
    let (ok, out) = vessel(&cfg, &["check"]);
    assert!(!ok);
    assert!(out.contains("state root not writable"), "{out}");
}

#[test]
fn bad_config_fails_with_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "hypervisor = \"xen\"\n");
    let (ok, out) = vessel(&cfg, &["check"]);
    assert!(!ok);
    assert!(out.contains("hypervisor = \"xen\""), "{out}");
    let (ok, out) = vessel(&d.path().join("missing.toml"), &["check"]);
    assert!(!ok);
    assert!(out.contains("missing.toml"), "{out}");
}

#[test]
fn builtin_hypervisor_check_names_the_fallback_without_hardware_kvm() {
    let (kvm, _) = vessel_hypervisor::host::detect_kvm();
    if kvm == vessel_hypervisor::KvmKind::Hardware {
        eprintln!(
            "SKIPPED: this host has hardware KVM; the fallback message is for hosts without it"
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "");
    let (ok, out) = vessel(&cfg, &["check", "--hypervisor", "builtin"]);
    assert!(!ok);
    assert!(out.contains("QEMU with TCG"), "{out}");
}

#[test]
fn env_prints_effective_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(d.path(), "default_memory_mib = 512\n");
    let (ok, out) = vessel(&cfg, &["env"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("default_memory_mib = 512") && out.contains("[qemu]"),
        "{out}"
    );
}

mod common;

#[test]
fn check_boot_snapshot_restores_a_resynced_clone_and_leaves_nothing() {
    let Some(e) = common::env() else {
        return;
    };
    let (ok, out) = vessel(&e.config, &["check", "--boot", "--snapshot"]);
    assert!(ok, "{out}");
    for want in [
        "using channel = \"serial\"",
        "agent ready in:",
        "snapshot:        written in",
        "resynced in",
        "same boot id, clock within",
        "RNG output differs from the template's",
        "snapshot removed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let left: Vec<_> = std::fs::read_dir(&e.root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left: {left:?}");
    let pid_snapshots: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|d| d.file_name().to_string_lossy().starts_with("vessel-check-"))
        .map(|d| d.path())
        .collect();
    assert!(
        pid_snapshots.is_empty(),
        "snapshots left: {pid_snapshots:?}"
    );
    let root = e.root.to_string_lossy().to_string();
    assert_eq!(
        vessel_testutil::processes_mentioning(&root),
        Vec::<String>::new()
    );
}

#[test]
fn snapshot_needs_boot() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let (ok, out) = vessel(&cfg, &["check", "--snapshot"]);
    assert!(!ok);
    assert!(out.contains("--boot"), "{out}");
}

#[test]
fn create_refuses_preserve_fds_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let root = dir.path().join("root");
    let (ok, out) = vessel(
        &cfg,
        &[
            "--root",
            root.to_str().unwrap(),
            "create",
            "--preserve-fds",
            "2",
            "--bundle",
            dir.path().to_str().unwrap(),
            "pfd",
        ],
    );
    assert!(!ok);
    assert!(
        out.contains("--preserve-fds 2") && out.contains("cannot be passed"),
        "{out}"
    );
    assert!(!root.join("pfd").exists(), "state left behind");
}

#[test]
fn run_with_builtin_without_hardware_kvm_fails_before_creating_anything() {
    let (kvm, _) = vessel_hypervisor::host::detect_kvm();
    if kvm == vessel_hypervisor::KvmKind::Hardware {
        eprintln!("SKIPPED: this host has hardware KVM, where the built-in VMM runs");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let cfg = write_config(
        d.path(),
        &format!(
            "state_root = \"{}\"\nhypervisor = \"builtin\"\n",
            root.display()
        ),
    );
    let bundle = d.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::copy("/bin/true", bundle.join("rootfs/true")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","process":{"args":["/true"],"cwd":"/"},"root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    for cmd in ["run", "create"] {
        let (ok, out) = vessel(
            &cfg,
            &[
                "--root",
                root.to_str().unwrap(),
                cmd,
                "--bundle",
                bundle.to_str().unwrap(),
                "b1",
            ],
        );
        assert!(!ok, "{cmd}: {out}");
        assert!(
            out.contains("hypervisor = \"builtin\" cannot run sandboxes on this host")
                && out.contains("needs hardware KVM")
                && out.contains("hypervisor = \"qemu\""),
            "{cmd}: {out}"
        );
        let line = out.lines().find(|l| l.starts_with("vessel: ")).unwrap();
        assert_eq!(
            line.matches("needs hardware KVM").count(),
            1,
            "{cmd}: the reason is printed once: {out}"
        );
        assert!(!root.exists(), "{cmd}: state root created: {out}");
        assert_eq!(
            vessel_testutil::processes_mentioning(&root.display().to_string()),
            Vec::<String>::new()
        );
    }
}
