//! End-to-end: sandboxes start from templates by default (docs/snapshots.md).
//!
//! On both backends (QEMU/q35 here, the built-in VMM in the KVM lane) the first
//! `vessel run` of a shape boots cold and writes the template, the second is restored
//! from it and its container sees its own rootfs, env and mounts (QEMU: its vsock and
//! virtio-fs devices plugged in after the restore), and a reinstalled kernel makes the
//! next run build a new template instead of using the old one, and a clone gets its own
//! sandbox's agent policy from a template made under another.

mod common;

use std::path::Path;

use common::{env, text, Env};

/// `vessel run` of `bundle` as `id`, logging at info level into `<id>.log`;
/// returns stdout and the log.
fn run_logged(e: &Env, bundle: &Path, id: &str) -> (String, String) {
    let log = e.dir.path().join(format!("{id}.log"));
    let o = e
        .cmd()
        .env("VESSEL_LOG", "info")
        .arg("--log")
        .arg(&log)
        .args(["run", "--bundle", bundle.to_str().unwrap(), id])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(o.status.code(), Some(0), "{}\nlog:\n{log}", text(&o));
    e.assert_clean(id);
    (String::from_utf8_lossy(&o.stdout).into_owned(), log)
}

/// This test's own templates directory (the other tests share one).
fn own_templates(e: &Env) -> std::path::PathBuf {
    e.dir.path().join("templates")
}

fn templates(e: &Env) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(own_templates(e))
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[test]
fn second_run_starts_from_the_template_and_a_new_kernel_rebuilds_it() {
    let Some(e) = env() else { return };
    // The kernel is a copy, so that the test can reinstall it.
    let kernel = e.dir.path().join("vmlinux");
    let guest = vessel_testutil::guest_dir();
    std::fs::copy(guest.join("vmlinux"), &kernel).unwrap();
    let config = std::fs::read_to_string(&e.config).unwrap();
    let config = config.replace(
        &format!("\"{}\"", guest.join("vmlinux").display()),
        &format!("\"{}\"", kernel.display()),
    );
    assert!(config.contains(kernel.to_str().unwrap()), "{config}");
    let shared = format!("\"{}\"", vessel_testutil::templates_dir().display());
    assert!(config.contains(&shared), "{config}");
    let config = config.replace(&shared, &format!("\"{}\"", own_templates(&e).display()));
    std::fs::write(&e.config, config).unwrap();
    let env_out = e.run(&["env"]);
    let env_text = String::from_utf8_lossy(&env_out.stdout).into_owned();

    let first = e.bundle("b1", &["echo", "first"], |_| {});
    let (out, log) = run_logged(&e, &first, "t1");
    assert_eq!(out, "first\n");

    assert!(env_text.contains("# templates: on"), "{env_text}");
    assert!(
        log.contains("template ") && log.contains(" written to "),
        "{log}"
    );
    assert!(!log.contains("started from template"), "{log}");
    let made = templates(&e);
    assert_eq!(made.len(), 1, "{made:?}");
    let mode = std::fs::metadata(own_templates(&e).join(&made[0]))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o700
    );

    // The second run: restored, with its own rootfs, env and mounts.
    let data = e.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("f"), "from the host\n").unwrap();
    let second = e.bundle(
        "b2",
        &["sh", "-c", "echo $MARK; cat /data/f; cat /marker"],
        |c| {
            c["process"]["env"]
                .as_array_mut()
                .unwrap()
                .push("MARK=second".into());
            c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/data", "type": "bind", "source": data, "options": ["rbind", "ro"]
            }));
        },
    );
    std::fs::write(second.join("rootfs/marker"), "b2's rootfs\n").unwrap();
    let (out, log) = run_logged(&e, &second, "t2");
    assert_eq!(out, "second\nfrom the host\nb2's rootfs\n");
    assert!(
        log.contains(&format!("started from template {}", made[0])),
        "{log}"
    );
    assert!(log.contains("restored from"), "{log}");
    if env_text.contains("hypervisor = \"qemu\"") {
        // The template has no vhost-user device; the clone got them after the restore.
        assert!(log.contains("devices plugged in, agent on vsock"), "{log}");
    }
    // And again: a template a jailed VMM restored from (its group may now read it)
    // is still used.
    let (out, log) = run_logged(&e, &first, "t2b");
    assert_eq!(out, "first\n");
    assert!(
        log.contains(&format!("started from template {}", made[0])),
        "{log}"
    );

    // A reinstalled kernel (same bytes, new file times): a new template, the old
    // one is not used.
    std::fs::copy(guest.join("vmlinux"), &kernel).unwrap();
    let (out, log) = run_logged(&e, &first, "t3");
    assert_eq!(out, "first\n");
    assert!(!log.contains("started from template"), "{log}");
    assert!(log.contains(" written to "), "{log}");
    let now = templates(&e);
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.contains(&made[0]));

    // A clone gets its own sandbox's agent policy, not the template's (the
    // template was made under the default one; the key does not name a policy).
    let policy = e.dir.path().join("policy.toml");
    std::fs::write(&policy, "version = 1\nallowed_commands = [\"echo\"]\n").unwrap();
    let mut config = std::fs::read_to_string(&e.config).unwrap();
    config.push_str(&format!(
        "[agent]\npolicy = {:?}\n",
        policy.display().to_string()
    ));
    std::fs::write(&e.config, config).unwrap();
    let log = e.dir.path().join("t4.log");
    let o = e
        .cmd()
        .env("VESSEL_LOG", "info")
        .arg("--log")
        .arg(&log)
        .args(["run", "--bundle", second.to_str().unwrap(), "t4"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!o.status.success(), "{}\nlog:\n{log}", text(&o));
    assert!(
        text(&o).contains("denied by the sandbox's agent policy"),
        "{}",
        text(&o)
    );
    assert!(log.contains("started from template"), "{log}");
    e.assert_clean("t4");
    let (out, log) = run_logged(&e, &first, "t5");
    assert_eq!(out, "first\n");
    assert!(log.contains("started from template"), "{log}");
    assert_eq!(templates(&e), now, "no template per policy");
}
