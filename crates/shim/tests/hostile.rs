//! CRI through containerd: a hostile guest of a pod cannot grow or pin host
//! state through the pod's share (issue 12, the pod path). A container in the
//! guest's root PID namespace (CRI host PID: the VM's) with CAP_SYS_ADMIN
//! reaches the share through the agent's mount, as a compromised guest kernel
//! would, fills the host beside the rootfs (1 GiB, a deep tree, links,
//! special files) and moves every container's directory, with the staged
//! mounts beneath it, away. The writes are bounded by the share's tmpfs, the
//! pod keeps working, and removing the container and the pod leaves nothing.
//! Real QEMU/TCG guest.

mod common;

use std::path::Path;
use std::time::Duration;

use common::cri::*;
use common::Containerd;

/// Bytes used and the size of the file system at `dir` (the share's tmpfs).
fn usage(dir: &Path) -> (u64, u64) {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let block = st.fragment_size() as u64;
    let used = (st.blocks() - st.blocks_free()) as u64 * block;
    (used, st.blocks() as u64 * block)
}

const SCRIPT: &str = "S=/proc/1/root/run/vessel/shared; \
    ls -d $S/*/rootfs >/dev/null || { echo no-share; ls -l /proc/1/exe; exit 1; }; \
    dd if=/dev/zero of=$S/junk bs=1M count=1024 2>/dev/null; echo dd-exit=$?; \
    mkdir -p $S/deep/a/b/c/d/e/f/g/h; ln -s / $S/rootlink; ln -s $S $S/loop; \
    mkfifo $S/fifo; mknod $S/null c 1 3; \
    for d in $S/*/rootfs; do c=${d%/rootfs}; \
      dd if=/dev/zero of=$c/junk bs=1M count=8 2>/dev/null; echo in-dir-exit=$?; \
      mv $c $S/moved-${c##*/} && echo moved; done; \
    echo hostile-done";

#[tokio::test(flavor = "multi_thread")]
async fn pod_guest_writes_beside_the_rootfs_are_bounded_and_removal_leaves_nothing() {
    let Some(c) = Containerd::start() else { return };
    let mut rt = connect(&c.sock).await;
    let logs = c.dir.path().join("logs");
    // Host PID for the pod (CRI joins the container to the sandbox's PID
    // namespace): in a Vessel pod, the VM's root PID namespace.
    let mut cfg = pod_config("hostile", &logs);
    let sandbox_ns = cfg
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sandbox_ns.namespace_options.as_mut().unwrap().pid = NamespaceMode::Node as i32;
    let pod = run_pod(&mut rt, &cfg).await;
    let top = c.state_root.join("shared").join(&pod);
    assert!(top.is_dir(), "no pod share at {}", top.display());

    let mut config = container_config_pid("h", &["sh", "-c", SCRIPT], NamespaceMode::Node);
    let sc = config
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.capabilities = Some(Capability {
        add_capabilities: ["SYS_ADMIN", "SYS_PTRACE", "MKNOD"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    });
    let h = start(&mut rt, &pod, &cfg, config).await;
    let s = wait_exited(&mut rt, &h, Duration::from_secs(120)).await;
    let log = std::fs::read_to_string(logs.join("h.log")).unwrap_or_default();
    assert_eq!(s.exit_code, 0, "{log}\n{}", c.log_tail());
    assert!(log.contains("hostile-done"), "{log}");
    assert!(
        log.contains("dd-exit=1"),
        "the 1 GiB write must fail: {log}"
    );
    // Two containers (the pause container and this one), both moved.
    assert_eq!(log.matches("moved").count(), 2, "{log}");

    // Bounded by the share's tmpfs, wherever the guest wrote.
    let junk = std::fs::symlink_metadata(top.join("junk")).unwrap().len();
    assert!(junk <= 1024 * 1024, "junk beside the rootfs: {junk} bytes");
    let moved: Vec<_> = std::fs::read_dir(&top)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("moved-")
        })
        .collect();
    assert_eq!(moved.len(), 2, "{moved:?}");
    let (used, size) = usage(&top);
    assert_eq!(size, 1024 * 1024, "the share's top is its 1 MiB tmpfs");
    assert!(used <= size, "the share's top holds {used} bytes");

    // Removing the container unstages it by fd, wherever the guest moved
    // it: nothing of it stays mounted.
    rt.remove_container(RemoveContainerRequest {
        container_id: h.clone(),
    })
    .await
    .expect("RemoveContainer");
    let mine = top.join(format!("moved-{h}"));
    let mounted = |p: &Path| common::mounts_mentioning(&p.display().to_string());
    assert!(mounted(&mine).is_empty(), "{:?}", mounted(&mine));

    // The pod keeps working: a new container is staged and runs.
    let n = start_container(&mut rt, &pod, &cfg, "n", &["sleep", "1000"]).await;
    let (code, out) = exec(&mut rt, &n, &["echo", "still-here"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "still-here\n"),
        "{}",
        c.log_tail()
    );

    let sockets = shim_sockets(&c);
    stop_and_remove(&mut rt, &pod).await;
    assert_nothing_left(&c, &sockets);
    assert!(!top.exists(), "{} left", top.display());
}
