//! Against the host's real cgroup file system (v2, or v1/hybrid as on the development
//! machines): limits are written and enforced, a child joins before it execs, the
//! caller can enter and leave, removal kills what is left and leaves nothing.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;

use vessel_cgroup::{join_in_child, raw_fds, Cgroup, Limits, CGROUP_ROOT};

fn root() -> Option<&'static Path> {
    let root = Path::new(CGROUP_ROOT);
    if !nix::unistd::geteuid().is_root() {
        vessel_testutil::skip("the cgroup host tests", "they need root");
        return None;
    }
    Some(root)
}

/// Tests that move this process take turns: each compares /proc/self/cgroup before and
/// after.
static MOVES_SELF: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn own_cgroups() -> String {
    std::fs::read_to_string("/proc/self/cgroup").unwrap()
}

#[test]
fn a_child_runs_inside_from_exec_and_the_memory_limit_is_enforced() {
    let Some(root) = root() else { return };
    let name = format!("cgtest-{}-mem", std::process::id());
    let limits = Limits {
        mem_mib: Some(32),
        cpus: Some(0.5),
        pids: Some(16),
    };
    let cg = Cgroup::create(root, &name, limits).unwrap();
    assert_eq!(cg.memory_limit(), Some(32 << 20));
    let procs = cg.procs_files().unwrap();
    let fds = raw_fds(&procs);
    // dd allocates its 128 MiB block at once: over the limit, the kernel kills it.
    let mut cmd = Command::new("dd");
    cmd.args(["if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"]);
    // SAFETY: join_in_child only calls write(2) on fds `procs` keeps open until spawn.
    unsafe {
        cmd.pre_exec(move || join_in_child(&fds));
    }
    let status = cmd.status().unwrap();
    assert_eq!(status.signal(), Some(9), "dd: {status:?}");
    assert!(cg.memory_peak().unwrap() <= 32 << 20);
    // A child that stays: it is listed from the start, and removal kills it.
    let fds = raw_fds(&procs);
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(move || join_in_child(&fds));
    }
    let mut child = cmd.spawn().unwrap();
    drop(procs);
    assert_eq!(cg.procs(), vec![child.id() as i32]);
    let dirs = cg.dirs().to_vec();
    cg.remove().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    for d in dirs {
        assert!(!d.exists(), "{} left", d.display());
    }
}

#[test]
fn the_caller_enters_and_goes_back_before_removal() {
    let Some(root) = root() else { return };
    let _turn = MOVES_SELF.lock().unwrap_or_else(|p| p.into_inner());
    let name = format!("cgtest-{}-self", std::process::id());
    let before = own_cgroups();
    let cg = Cgroup::create(root, &name, Limits::default()).unwrap();
    cg.enter_self().unwrap();
    assert!(cg.procs().contains(&(std::process::id() as i32)));
    assert!(own_cgroups().contains(&name), "{}", own_cgroups());
    // Removal never kills the caller: it moves back where it was first.
    cg.remove().unwrap();
    assert_eq!(own_cgroups(), before);
    assert!(Cgroup::open(root, &name).is_none());
}

/// The cgroup v2 code paths (one directory, `0::` origin, `cgroup.kill`) on a host whose
/// root is v1: its unified hierarchy, without controllers (they are bound to v1 there).
/// Where the root is v2 itself, the tests above take these paths.
#[test]
fn v2_paths_on_the_unified_hierarchy_of_a_hybrid_host() {
    let Some(_) = root() else { return };
    let unified = Path::new(CGROUP_ROOT).join("unified");
    if !unified.join("cgroup.controllers").is_file() {
        return;
    }
    let name = format!("cgtest-{}-v2", std::process::id());
    let cg = Cgroup::create(&unified, &name, Limits::default()).unwrap();
    assert_eq!(cg.dirs(), [unified.join("vessel").join(&name)]);
    let procs = cg.procs_files().unwrap();
    let fds = raw_fds(&procs);
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    // SAFETY: join_in_child only calls write(2) on fds `procs` keeps open until spawn.
    unsafe {
        cmd.pre_exec(move || join_in_child(&fds));
    }
    let mut child = cmd.spawn().unwrap();
    drop(procs);
    let _turn = MOVES_SELF.lock().unwrap_or_else(|p| p.into_inner());
    let before = own_cgroups();
    cg.enter_self().unwrap();
    let mut want = vec![std::process::id() as i32, child.id() as i32];
    want.sort_unstable();
    assert_eq!(cg.procs(), want);
    // The caller moves back; the child is killed (cgroup.kill, or SIGKILL per process).
    cg.remove().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    assert_eq!(own_cgroups(), before);
    assert!(Cgroup::open(&unified, &name).is_none());
}
