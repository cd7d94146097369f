use super::*;

/// A host with `kvm`, whose state root and templates directory are the runtime
/// user's with the modes the runtime creates.
fn host(kvm: KvmKind) -> HostFacts {
    HostFacts {
        kvm,
        kvm_why: "test".into(),
        euid: 0,
        state_root: Some(DirFacts {
            uid: 0,
            mode: 0o711,
        }),
        template_dir: Some(DirFacts {
            uid: 0,
            mode: 0o700,
        }),
        vmm_seccomp_env: None,
    }
}

fn settings(f: &[Finding]) -> Vec<&str> {
    f.iter().map(|f| f.setting.as_str()).collect()
}

fn parse(text: &str) -> Config {
    Config::parse(text).unwrap()
}

#[test]
fn the_default_config_on_hardware_kvm_has_no_findings() {
    let c = Config::default();
    assert_eq!(audit(&c, &host(KvmKind::Hardware)), vec![]);
    // Nothing created yet: nothing to flag either.
    let fresh = HostFacts {
        state_root: None,
        template_dir: None,
        ..host(KvmKind::Hardware)
    };
    assert_eq!(audit(&c, &fresh), vec![]);
    assert!(backend_line(&c, &fresh).starts_with("builtin (kvm)"));
}

#[test]
fn tcg_is_flagged_when_the_host_has_no_hardware_kvm_or_it_is_forced() {
    for kvm in [KvmKind::Pvm, KvmKind::None] {
        let f = audit(&Config::default(), &host(kvm));
        assert_eq!(settings(&f), ["qemu.accelerator"], "{kvm:?}");
        assert!(f[0].value.contains("resolves to tcg"), "{}", f[0]);
        assert!(f[0].fix.contains("hardware KVM"), "{}", f[0]);
        assert!(f[0].why.contains("JIT"), "{}", f[0]);
    }
    // With hypervisor = "auto", hardware KVM picks the built-in VMM whatever
    // qemu.accelerator says: no finding.
    let c = parse("[qemu]\naccelerator = \"tcg\"\n");
    assert_eq!(audit(&c, &host(KvmKind::Hardware)), vec![]);
    let c = parse("hypervisor = \"qemu\"\n[qemu]\naccelerator = \"tcg\"\n");
    let f = audit(&c, &host(KvmKind::Hardware));
    assert_eq!(settings(&f), ["qemu.accelerator"]);
    assert!(f[0].value.contains("forced"), "{}", f[0]);
    assert!(f[0].fix.contains("qemu.accelerator = \"auto\""), "{}", f[0]);
    // KVM forced (QEMU with KVM): not software emulation.
    let c = parse("hypervisor = \"qemu\"\n[qemu]\naccelerator = \"kvm\"\n");
    assert_eq!(audit(&c, &host(KvmKind::Pvm)), vec![]);
    // The built-in VMM where it cannot run: nothing runs, nothing emulated.
    let c = parse("hypervisor = \"builtin\"\n");
    assert_eq!(audit(&c, &host(KvmKind::Pvm)), vec![]);
    assert!(backend_line(&c, &host(KvmKind::Pvm)).starts_with("none: "));
}

#[test]
fn the_jailer_off_is_flagged_where_the_builtin_vmm_can_run() {
    let c = parse("[builtin]\njailer = false\n");
    let f = audit(&c, &host(KvmKind::Hardware));
    assert_eq!(settings(&f), ["builtin.jailer"]);
    assert!(
        f[0].value.contains("runs sandboxes on this host"),
        "{}",
        f[0]
    );
    assert!(f[0].fix.contains("jailer = true"), "{}", f[0]);
    // On a host without hardware KVM the section applies elsewhere: still flagged.
    let f = audit(&c, &host(KvmKind::Pvm));
    assert_eq!(settings(&f), ["qemu.accelerator", "builtin.jailer"]);
    assert!(f[1].value.contains("applies on hosts with hardware KVM"));
    // hypervisor = "qemu" never uses the section.
    let c = parse("hypervisor = \"qemu\"\n[builtin]\njailer = false\n");
    assert_eq!(audit(&c, &host(KvmKind::Hardware)), vec![]);
}

#[test]
fn vmm_seccomp_off_in_the_environment_is_flagged_only_without_the_jailer() {
    for mode in ["off", "log"] {
        let h = HostFacts {
            vmm_seccomp_env: Some(mode.into()),
            ..host(KvmKind::Hardware)
        };
        let off = parse("[builtin]\njailer = false\n");
        let f = audit(&off, &h);
        assert_eq!(settings(&f), ["builtin.jailer", "VESSEL_VMM_SECCOMP"]);
        assert!(f[1].value.starts_with(mode), "{}", f[1]);
        assert!(f[1].fix.contains("unset VESSEL_VMM_SECCOMP"), "{}", f[1]);
        // The jailer clears the environment: the VMM never sees it.
        assert_eq!(audit(&Config::default(), &h), vec![]);
    }
    let h = HostFacts {
        vmm_seccomp_env: Some("on".into()),
        ..host(KvmKind::Hardware)
    };
    let f = audit(&parse("[builtin]\njailer = false\n"), &h);
    assert_eq!(settings(&f), ["builtin.jailer"]);
}

#[test]
fn weakening_kernel_args_are_flagged_each_and_others_are_not() {
    let bad = [
        "nokaslr",
        "mitigations=off",
        "nopti",
        "pti=off",
        "spectre_v2=off",
        "nosmap",
        "init=/bin/sh",
        "rdinit=/bin/sh",
        "console=tty0",
        "console=hvc0",
        "kgdboc=ttyS0,115200",
        "kgdbwait",
        "sysrq_always_enabled",
        "vessel.debug",
    ];
    let good = [
        "quiet",
        "console=ttyS0",
        "loglevel=4",
        "mitigations=auto",
        "spectre_v2=on",
        "tsc_early_khz=2000000",
    ];
    let c = Config {
        kernel_args: bad
            .iter()
            .chain(good.iter())
            .map(|w| w.to_string())
            .collect(),
        ..Config::default()
    };
    let f = audit(&c, &host(KvmKind::Hardware));
    assert_eq!(f.len(), bad.len(), "{f:#?}");
    for (f, word) in f.iter().zip(bad) {
        assert_eq!(f.setting, "kernel_args");
        assert_eq!(f.value, format!("{word:?}"));
        assert!(f.fix.contains(&format!("remove {word:?}")), "{f}");
    }
    assert!(f[0].why.contains("mitigation"), "{}", f[0]);
    assert!(f[6].why.contains("replaces vessel-agent"), "{}", f[6]);
    assert!(f[8].why.contains("ttyS0"), "{}", f[8]);
    assert!(f[10].why.contains("debugger"), "{}", f[10]);
}

#[test]
fn logs_without_a_rate_cap_or_with_a_huge_size_cap_are_flagged() {
    let c = parse("[logs]\nbytes_per_sec = 0\n");
    let f = audit(&c, &host(KvmKind::Hardware));
    assert_eq!(settings(&f), ["logs.bytes_per_sec"]);
    assert!(f[0].fix.contains("bytes_per_sec"), "{}", f[0]);
    let c = parse(&format!(
        "[logs]\nmax_bytes = {}\n",
        LOG_MAX_BYTES_AUDIT + 1
    ));
    assert_eq!(
        settings(&audit(&c, &host(KvmKind::Hardware))),
        ["logs.max_bytes"]
    );
    let c = parse(&format!("[logs]\nmax_bytes = {LOG_MAX_BYTES_AUDIT}\n"));
    assert_eq!(audit(&c, &host(KvmKind::Hardware)), vec![]);
}

#[test]
fn host_limits_off_or_meaningless_are_flagged() {
    let h = host(KvmKind::Hardware);
    let f = audit(&parse("[limits]\nenabled = false\nextra_cpus = 0\n"), &h);
    // Off: the other limits keys do not matter.
    assert_eq!(settings(&f), ["limits.enabled"]);
    assert!(f[0].fix.contains("enabled = true"), "{}", f[0]);
    let f = audit(&parse("[limits]\nextra_cpus = 0\n"), &h);
    assert_eq!(settings(&f), ["limits.extra_cpus"]);
    let text = format!(
        "[limits]\nmemory_overhead_mib = {}\npids = {}\n",
        MEMORY_OVERHEAD_AUDIT_MIB + 1,
        PIDS_AUDIT + 1
    );
    let f = audit(&parse(&text), &h);
    assert_eq!(settings(&f), ["limits.memory_overhead_mib", "limits.pids"]);
    let text = format!(
        "[limits]\nmemory_overhead_mib = {MEMORY_OVERHEAD_AUDIT_MIB}\npids = {PIDS_AUDIT}\nextra_cpus = 0.5\n"
    );
    assert_eq!(audit(&parse(&text), &h), vec![]);
}

#[test]
fn state_root_and_templates_of_another_user_or_open_to_others_are_flagged() {
    let c = Config::default();
    for (uid, mode, flagged) in [
        (0, 0o700, false),
        (0, 0o711, false),
        (0, 0o755, true),
        (0, 0o733, true),
        (1000, 0o711, true),
    ] {
        let h = HostFacts {
            state_root: Some(DirFacts { uid, mode }),
            ..host(KvmKind::Hardware)
        };
        let f = audit(&c, &h);
        assert_eq!(f.len(), usize::from(flagged), "{uid} {mode:o}: {f:#?}");
        if flagged {
            assert_eq!(f[0].setting, "state_root");
            assert!(f[0].fix.contains("chmod 0711 /run/vessel"), "{}", f[0]);
        }
    }
    for (uid, mode, flagged) in [
        (0, 0o700, false),
        (0, 0o750, true),
        (0, 0o777, true),
        (1000, 0o700, true),
    ] {
        let h = HostFacts {
            template_dir: Some(DirFacts { uid, mode }),
            ..host(KvmKind::Hardware)
        };
        let f = audit(&c, &h);
        assert_eq!(f.len(), usize::from(flagged), "{uid} {mode:o}: {f:#?}");
        if flagged {
            assert_eq!(f[0].setting, "templates.dir");
            assert!(
                f[0].fix.contains("chmod 0700 /run/vessel/templates"),
                "{}",
                f[0]
            );
        }
        // Templates off: the directory is not used.
        let off = parse("[templates]\nenabled = false\n");
        assert_eq!(audit(&off, &h), vec![]);
    }
}

#[test]
fn probe_reads_directories_without_creating_them() {
    let d = tempfile::tempdir().unwrap();
    let mut c = Config {
        state_root: d.path().join("root"),
        ..Config::default()
    };
    let h = HostFacts::probe(&c);
    assert_eq!((h.state_root, h.template_dir), (None, None));
    assert!(!c.state_root.exists());
    c.state_root = d.path().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o751)).unwrap();
    let h = HostFacts::probe(&c);
    assert_eq!(
        h.state_root,
        Some(DirFacts {
            uid: h.euid,
            mode: 0o751
        })
    );
    // A symlink in place of the templates directory counts as open to all.
    std::os::unix::fs::symlink("/", d.path().join("templates")).unwrap();
    assert_eq!(HostFacts::probe(&c).template_dir.unwrap().mode, 0o777);
}

#[test]
fn always_on_names_each_safeguard_and_the_policy_in_force() {
    let c = Config::default();
    let a = always_on(&c);
    let names: Vec<_> = a.iter().map(|s| s.what).collect();
    assert_eq!(
        names,
        [
            "QEMU sandbox",
            "VMM seccomp",
            "jail user",
            "log size caps",
            "template checks",
            "shared directories",
            "agent policy"
        ]
    );
    assert!(a[0].detail.contains("-sandbox on"));
    assert!(a[6].detail.contains("built-in default"));
    let mut c = c;
    c.agent.policy = Some("/etc/vessel/policy.toml".into());
    assert!(always_on(&c)[6]
        .detail
        .starts_with("/etc/vessel/policy.toml"));
}
