//! The agent policy (`[agent] policy` in config.toml) with real guests: a
//! policy that forbids exec lets a container run and makes `vessel exec` fail
//! with PERMISSION_DENIED; the agent takes no second policy; a bad policy file
//! is a clear configuration error that starts nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{env, state_left, text, Env};

const T: Duration = Duration::from_secs(120);

/// Adds `[agent] policy = <file with policy_toml>` to the test config.
fn with_policy(e: &Env, policy_toml: &str) -> PathBuf {
    let policy = e.dir.path().join("policy.toml");
    std::fs::write(&policy, policy_toml).unwrap();
    let mut config = std::fs::read_to_string(&e.config).unwrap();
    config.push_str(&format!(
        "[agent]\npolicy = {:?}\n",
        policy.display().to_string()
    ));
    std::fs::write(&e.config, config).unwrap();
    policy
}

/// The agent socket of the only sandbox under `root`.
fn agent_socket(root: &Path) -> PathBuf {
    fn find(dir: &Path) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "vsock.sock") {
                return Some(p);
            }
            if e.file_type().ok()?.is_dir() && !p.ends_with("templates") {
                if let Some(f) = find(&p) {
                    return Some(f);
                }
            }
        }
        None
    }
    find(root).unwrap_or_else(|| panic!("no vsock.sock under {}", root.display()))
}

#[test]
fn a_policy_without_exec_denies_vessel_exec_and_a_second_policy() {
    let Some(e) = env() else { return };
    let policy = with_policy(&e, "version = 1\nexec = false\n");
    let b = e.bundle(
        "b",
        &["sh", "-c", "echo up; while :; do sleep 0.1; done"],
        |_| {},
    );
    let (out, _) = e.create("p1", &b);
    let o = e.run(&["start", "p1"]);
    assert!(o.status.success(), "start: {}", text(&o));
    assert!(common::wait_until(T, || std::fs::read_to_string(&out)
        .unwrap()
        .starts_with("up\n")));

    let o = e.run(&["exec", "p1", "echo", "should-not-run"]);
    let out = text(&o);
    eprintln!("vessel exec: {out}");
    assert!(!o.status.success(), "exec was allowed: {out}");
    assert!(
        out.contains("PERMISSION_DENIED: ExecProcess denied by the sandbox's agent policy"),
        "{out}"
    );
    assert!(!out.contains("should-not-run\n"), "{out}");
    assert_eq!(e.status("p1"), "running", "a denied exec harms nothing");

    // The agent took its policy at start; it refuses another one (here the
    // permissive default, as a confused or compromised host component would send).
    let run_dir = agent_socket(&e.root).parent().unwrap().to_path_buf();
    let permissive = vessel_runtime::config::load_policy(&{
        std::fs::write(&policy, "version = 1\n").unwrap();
        policy.clone()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let agent = vessel_runtime::agent::AgentClient::connect_run_dir(&run_dir)
            .await
            .expect("connect to the agent");
        agent.set_policy(&permissive).await.unwrap_err()
    });
    let msg = vessel_runtime::chain(&err).to_string();
    eprintln!("second SetPolicy: {msg}");
    assert!(
        msg.contains("PERMISSION_DENIED")
            && msg.contains("SetPolicy")
            && msg.contains("denied by the sandbox's agent policy"),
        "{msg}"
    );
    let o = e.run(&["exec", "p1", "true"]);
    assert!(
        !o.status.success(),
        "exec allowed after a second SetPolicy: {}",
        text(&o)
    );

    let o = e.run(&["delete", "--force", "p1"]);
    assert!(o.status.success(), "{}", text(&o));
    e.assert_clean("p1");
    assert_eq!(state_left(&e.root), Vec::<String>::new());
}

#[test]
fn a_bad_policy_file_is_a_config_error_that_starts_nothing() {
    let Some(e) = env() else { return };
    with_policy(&e, "version = 1\nexec = false\nmax_container = 1\n");
    let b = e.bundle("b", &["true"], |_| {});
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "bad1"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("agent.policy") && out.contains("unknown field `max_container`"),
        "{out}"
    );
    assert_eq!(state_left(&e.root), Vec::<String>::new());
}

#[test]
fn a_container_the_policy_denies_is_not_created_and_leaves_nothing() {
    let Some(e) = env() else { return };
    with_policy(&e, "version = 1\nallowed_commands = [\"echo\"]\n");
    let b = e.bundle("b", &["sh", "-c", "echo should-not-run"], |_| {});
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "d1"]);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("PERMISSION_DENIED")
            && out.contains(
                "CreateContainer process.args[0] \"sh\" denied by the sandbox's agent policy"
            ),
        "{out}"
    );
    assert!(!out.contains("should-not-run"), "{out}");
    e.assert_clean("d1");
    assert_eq!(state_left(&e.root), Vec::<String>::new());
    // What the policy allows runs.
    let b = e.bundle("b2", &["echo", "allowed"], |_| {});
    let o = e.run(&["run", "--bundle", b.to_str().unwrap(), "d2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "allowed\n");
    e.assert_clean("d2");
}
