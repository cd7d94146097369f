//! `vessel check --audit`: the real binary flags each weakened setting of a
//! configuration with its fix and fails; on a default configuration it flags only
//! what the host imposes (TCG without hardware KVM). Nothing boots and nothing is
//! created.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use vessel_hypervisor::host::{detect_kvm, KvmKind};

/// Runs `vessel --config CONFIG check ARGS` with `VESSEL_VMM_SECCOMP` set to
/// `seccomp` (or unset): (success, exit code, stdout + stderr).
fn vessel(config: &Path, args: &[&str], seccomp: Option<&str>) -> (bool, Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vessel"));
    cmd.arg("--config").arg(config).arg("check").args(args);
    match seccomp {
        Some(v) => cmd.env("VESSEL_VMM_SECCOMP", v),
        None => cmd.env_remove("VESSEL_VMM_SECCOMP"),
    };
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), out.status.code(), text)
}

fn flagged(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("FLAGGED"))
        .map(|l| l.trim_start().split(" = ").next().unwrap().to_string())
        .collect()
}

fn dir(path: &Path, mode: u32) {
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn entries(path: &Path) -> usize {
    std::fs::read_dir(path).unwrap().count()
}

#[test]
fn audit_flags_each_weakened_setting_with_its_fix() {
    let d = tempfile::tempdir().unwrap();
    let (state, templates) = (d.path().join("state"), d.path().join("templates"));
    dir(&state, 0o755);
    dir(&templates, 0o755);
    let cfg = d.path().join("weak.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_root = {state:?}\n\
             kernel_args = [\"nokaslr\", \"mitigations=off\", \"init=/bin/sh\", \"console=tty0\", \"vessel.debug\"]\n\
             [builtin]\njailer = false\n\
             [logs]\nbytes_per_sec = 0\nmax_bytes = 1073741824\n\
             [limits]\nextra_cpus = 0\nmemory_overhead_mib = 100000\npids = 100000\n\
             [templates]\ndir = {templates:?}\n"
        ),
    )
    .unwrap();
    let (ok, code, out) = vessel(&cfg, &["--audit"], Some("off"));
    assert!(!ok && code == Some(1), "{out}");
    let mut want = vec![
        ("builtin.jailer", "set [builtin] jailer = true"),
        ("VESSEL_VMM_SECCOMP", "unset VESSEL_VMM_SECCOMP"),
        ("kernel_args", "remove \"nokaslr\" from kernel_args"),
        ("kernel_args", "remove \"mitigations=off\" from kernel_args"),
        ("kernel_args", "remove \"init=/bin/sh\" from kernel_args"),
        ("kernel_args", "remove \"console=tty0\" from kernel_args"),
        ("kernel_args", "remove \"vessel.debug\" from kernel_args"),
        (
            "logs.bytes_per_sec",
            "set [logs] bytes_per_sec to a positive rate",
        ),
        ("logs.max_bytes", "set [logs] max_bytes to at most"),
        ("limits.extra_cpus", "set [limits] extra_cpus to a positive"),
        ("limits.memory_overhead_mib", "or set at most 4096"),
        ("limits.pids", "or set at most 8192"),
        ("state_root", "chmod 0711"),
        ("templates.dir", "chmod 0700"),
    ];
    if detect_kvm().0 != KvmKind::Hardware {
        want.insert(0, ("qemu.accelerator", "hardware KVM"));
    }
    let settings: Vec<&str> = want.iter().map(|(s, _)| *s).collect();
    assert_eq!(flagged(&out), settings, "{out}");
    for (setting, fix) in &want {
        assert!(
            out.contains(&format!("FLAGGED          {setting} = ")),
            "{setting}: {out}"
        );
        assert!(
            out.contains(fix),
            "fix {fix:?} of {setting} missing:\n{out}"
        );
    }
    assert!(
        out.contains(&format!(
            "result:          {} settings weaken isolation: ",
            want.len()
        )),
        "{out}"
    );
    // Nothing booted, nothing created.
    assert_eq!((entries(&state), entries(&templates)), (0, 0), "{out}");

    // Without the environment variable, it is not flagged.
    let (_, _, out) = vessel(&cfg, &["--audit"], None);
    assert!(
        !flagged(&out).contains(&"VESSEL_VMM_SECCOMP".to_string()),
        "{out}"
    );

    // TCG forced, and host limits off, on any host.
    std::fs::write(
        &cfg,
        format!(
            "state_root = {:?}\nhypervisor = \"qemu\"\n[qemu]\naccelerator = \"tcg\"\n[limits]\nenabled = false\n",
            d.path().join("absent")
        ),
    )
    .unwrap();
    let (ok, code, out) = vessel(&cfg, &["--audit"], None);
    assert!(!ok && code == Some(1), "{out}");
    assert_eq!(
        flagged(&out),
        ["qemu.accelerator", "limits.enabled"],
        "{out}"
    );
    assert!(out.contains("\"tcg\" (forced;"), "{out}");
    assert!(out.contains("set qemu.accelerator = \"auto\""), "{out}");
    assert!(out.contains("set [limits] enabled = true"), "{out}");
    assert!(out.contains("2 settings weaken isolation"), "{out}");
    assert!(!d.path().join("absent").exists());
}

#[test]
fn audit_of_a_default_config_flags_only_what_the_host_imposes() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("r");
    let cfg = d.path().join("config.toml");
    let guest = vessel_testutil::guest_dir();
    std::fs::write(
        &cfg,
        format!(
            "state_root = {root:?}\nguest_kernel = {:?}\nguest_initramfs = {:?}\n",
            guest.join("vmlinux"),
            guest.join("initramfs.cpio.gz")
        ),
    )
    .unwrap();
    let (ok, code, out) = vessel(&cfg, &["--audit"], None);
    for always in [
        "ok (always on)   QEMU sandbox: QEMU always runs with -sandbox on,",
        "ok (always on)   VMM seccomp: ",
        "ok (always on)   jail user: ",
        "ok (always on)   log size caps: ",
        "ok (always on)   template checks: ",
        "ok (always on)   shared directories: no configuration key shares a host directory",
        "ok (always on)   agent policy: the built-in default",
    ] {
        assert!(out.contains(always), "{always:?} missing:\n{out}");
    }
    let (kvm, why) = detect_kvm();
    if kvm == KvmKind::Hardware {
        // The KVM lane: the default configuration passes.
        assert!(ok, "{out}");
        assert_eq!(flagged(&out), Vec::<String>::new(), "{out}");
        assert!(out.contains("hypervisor:      builtin (kvm)"), "{out}");
        assert!(out.contains("result:          ok: no setting weakens isolation"));
    } else {
        // This host (PVM or none): QEMU with TCG, and nothing else.
        assert!(!ok && code == Some(1), "{why}: {out}");
        assert_eq!(flagged(&out), ["qemu.accelerator"], "{out}");
        assert!(out.contains("resolves to tcg"), "{out}");
        assert!(
            out.contains("result:          1 setting weakens isolation: qemu.accelerator"),
            "{out}"
        );
    }
    // Nothing booted: not even the state root was made.
    assert!(!root.exists(), "{out}");
    // --audit boots nothing, so it refuses --boot.
    let (ok, _, out) = vessel(&cfg, &["--audit", "--boot"], None);
    assert!(!ok && out.contains("cannot be used with"), "{out}");
}
