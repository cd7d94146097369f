//! Race-free staging (issue 12): a process that swaps symlinks in the share
//! in a tight loop while the host stages 200 bind mounts cannot make any
//! mount land outside the staging tree, for a `vessel` container's share
//! ([`Staging`]) and a pod's ([`PodShare`], staged container by container
//! after the VM booted). Host-only; needs root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vessel_runtime::container::share::{self, PodShare, Staging};

fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

/// What the guest thread shares with the host side of the test.
struct Race {
    /// Index of the mount point the host works on.
    current: AtomicUsize,
    /// The index the guest last started a round on.
    seen: AtomicUsize,
    /// Both sides are running.
    ready: Barrier,
    stop: AtomicBool,
}

/// Plays the guest, in a tight loop on the mount point the host works on:
/// moves it away and plants a symlink to `outside` in its place, then
/// clears the symlink. Returns how many swaps and plants succeeded.
fn guest(top: PathBuf, outside: PathBuf, race: Arc<Race>) -> u64 {
    race.ready.wait();
    let mut hits = 0u64;
    let mut n = 0u64;
    let mut round = 0u64;
    while !race.stop.load(Ordering::Relaxed) {
        round += 1;
        let i = race.current.load(Ordering::Acquire);
        race.seen.store(i, Ordering::Release);
        let name = top.join(format!("m{i}"));
        let moved = top.join(format!("t{n}"));
        // Odd rounds: the classic swap (move the directory away, a symlink in
        // its place). Even rounds: only the symlink.
        if round.is_multiple_of(2) || std::fs::rename(&name, &moved).is_ok() {
            if round % 2 == 1 {
                hits += 1;
                n += 1;
            }
            if std::os::unix::fs::symlink(&outside, &name).is_ok() {
                hits += 1;
            }
            std::thread::yield_now();
            if name.is_symlink() {
                let _ = std::fs::remove_file(&name);
            }
        }
        // A moved directory that got a mount meanwhile stays where it is.
        let _ = std::fs::remove_dir(&moved);
    }
    hits
}

/// Detaches whatever the test mounted, even when it fails half-way.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = share::cleanup(&self.0);
    }
}

/// Runs one race: `attacker` plays the guest beneath `top` (see [`guest`], [`pod_guest`])
/// while the host stages `rounds` times with `stage(i)`, each retried until it succeeds,
/// and starts round `i` only once the guest attacks it (it keeps looping on it while the
/// host works: a real race, not turns). Returns the guest's swaps and plants, the host's
/// refused attempts and the time taken.
fn race<E>(
    top: &Path,
    outside: &Path,
    rounds: usize,
    attacker: fn(PathBuf, PathBuf, Arc<Race>) -> u64,
    mut stage: impl FnMut(usize) -> Result<(), E>,
) -> (u64, u64, Duration) {
    let race = Arc::new(Race {
        current: AtomicUsize::new(0),
        seen: AtomicUsize::new(usize::MAX),
        ready: Barrier::new(2),
        stop: AtomicBool::new(false),
    });
    let g = {
        let (top, outside, race) = (top.to_path_buf(), outside.to_path_buf(), race.clone());
        std::thread::spawn(move || attacker(top, outside, race))
    };
    race.ready.wait();
    let started = Instant::now();
    let mut refused = 0u64;
    for i in 0..rounds {
        race.current.store(i, Ordering::Release);
        while race.seen.load(Ordering::Acquire) != i {
            std::hint::spin_loop();
        }
        while stage(i).is_err() {
            refused += 1;
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the host never got a turn ({refused} attempts refused)"
            );
        }
    }
    race.stop.store(true, Ordering::Relaxed);
    let hits = g.join().unwrap();
    (hits, refused, started.elapsed())
}

/// Asserts that no mount landed outside the staging tree (nor anything in `outside`) and
/// that the tmpfs top and the 200 binds are all beneath `top`; returns the mount points.
fn assert_all_beneath(top: &Path, outside: &Path) -> Vec<PathBuf> {
    let mounts = mount_points();
    assert!(
        !mounts.iter().any(|m| m.starts_with(outside)),
        "a mount landed outside the staging tree"
    );
    assert_eq!(std::fs::read_dir(outside).unwrap().count(), 0);
    let inside = mounts.iter().filter(|m| m.starts_with(top)).count();
    assert_eq!(inside, 201, "the tmpfs top and 200 binds, all beneath it");
    mounts
}

#[test]
fn symlink_swaps_during_staging_never_move_a_mount_outside() {
    if !nix::unistd::geteuid().is_root() {
        vessel_testutil::skip("staging_race", "it needs root for mounts");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (cdir, src, outside) = (
        d.path().join("c"),
        d.path().join("src"),
        d.path().join("outside"),
    );
    for p in [&cdir, &src, &outside] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(src.join("marker"), b"x").unwrap();
    let _unmount = Unmount(cdir.clone());
    let staging = Staging::create(&cdir.join(share::STAGING_DIR)).unwrap();
    let top = staging.shared_dir().host_path;
    let (hits, refused, took) = race(&top, &outside, 200, guest, |i| {
        staging.bind(&src, Path::new(&format!("m{i}")), false, true)
    });
    eprintln!("staged 200 binds in {took:?}; guest swaps and plants {hits}, host attempts refused {refused}");
    let mounts = assert_all_beneath(&top, &outside);
    let moved = mounts
        .iter()
        .filter(|m| m.parent() == Some(top.as_path()))
        .filter(|m| {
            m.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('t'))
        })
        .count();
    eprintln!("{moved} binds landed on a mount point the guest had moved (inside the share)");
    assert!(hits > 0 && refused > 0, "the guest never raced the host");
    drop(staging);
    share::cleanup(&cdir).unwrap();
    assert!(!mount_points().iter().any(|m| m.starts_with(d.path())));
    assert!(!cdir.join(share::STAGING_DIR).exists());
}

/// Plays the guest of a pod: in a tight loop on the container the host is
/// staging, swaps its directory, its rootfs and its bind's mount point in
/// turn for a symlink to `outside` (moving the real one away first on odd
/// rounds). Returns how many swaps and plants succeeded.
fn pod_guest(top: PathBuf, outside: PathBuf, race: Arc<Race>) -> u64 {
    race.ready.wait();
    let mut hits = 0u64;
    let mut round = 0u64;
    while !race.stop.load(Ordering::Relaxed) {
        round += 1;
        let i = race.current.load(Ordering::Acquire);
        race.seen.store(i, Ordering::Release);
        let name = match round % 3 {
            0 => top.join(format!("c{i}")),
            1 => top.join(format!("c{i}/rootfs")),
            _ => top.join(format!("c{i}/m0")),
        };
        let moved = top.join(format!("t{round}"));
        let swapped = round % 2 == 1 && std::fs::rename(&name, &moved).is_ok();
        hits += u64::from(swapped);
        if std::os::unix::fs::symlink(&outside, &name).is_ok() {
            hits += 1;
        }
        std::thread::yield_now();
        if name.is_symlink() {
            let _ = std::fs::remove_file(&name);
        }
        // A moved directory with a mount (or one below it) stays where it is.
        let _ = std::fs::remove_dir(&moved);
    }
    hits
}

/// Removes a pod share the test made, even when it fails half-way.
struct RemoveShare<'a>(&'a PodShare);

impl Drop for RemoveShare<'_> {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

#[test]
fn symlink_swaps_while_a_pod_stages_never_move_a_mount_outside() {
    if !nix::unistd::geteuid().is_root() {
        vessel_testutil::skip("staging_race", "it needs root for mounts");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (rootfs, src, outside) = (
        d.path().join("rootfs"),
        d.path().join("src"),
        d.path().join("outside"),
    );
    for p in [&rootfs, &src, &outside] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(src.join("marker"), b"x").unwrap();
    std::fs::write(rootfs.join("marker"), b"r").unwrap();
    let share = PodShare::create(&d.path().join("share")).unwrap();
    let _remove = RemoveShare(&share);
    let top = share.path().to_path_buf();
    // 100 containers, each a rootfs and one bind: 200 binds.
    let (hits, refused, took) = race(&top, &outside, 100, pod_guest, |i| {
        let mut spec = serde_json::json!({"root": {"path": "rootfs", "readonly": true},
            "mounts": [{"destination": "/v", "type": "bind", "source": src,
                        "options": ["rbind", "ro"]}]});
        share.stage(&format!("c{i}"), &rootfs, &mut spec)
    });
    eprintln!(
        "staged 100 containers (200 binds) in {took:?}; guest swaps and plants {hits}, host attempts refused {refused}"
    );
    assert_all_beneath(&top, &outside);
    assert!(hits > 0 && refused > 0, "the guest never raced the host");
    // Unstaging detaches every bind by fd, wherever the guest moved it.
    for i in 0..100 {
        share.unstage(&format!("c{i}")).unwrap();
    }
    let left: Vec<_> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(d.path()))
        .collect();
    assert_eq!(left, vec![top.clone()], "only the top is left");
    share.remove().unwrap();
    assert!(!mount_points().iter().any(|m| m.starts_with(d.path())));
    assert!(!top.exists());
    assert_eq!(std::fs::read(src.join("marker")).unwrap(), b"x");
    assert_eq!(std::fs::read(rootfs.join("marker")).unwrap(), b"r");
}
