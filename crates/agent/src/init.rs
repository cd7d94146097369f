//! Guest set-up done once by PID 1, and the way out.

use std::path::Path;

use anyhow::Context;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::unistd::sync;

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const fn m(
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
) -> Mount {
    Mount {
        source,
        target,
        fstype,
        flags,
        data,
    }
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// Mounted in order; each target directory is created first.
const MOUNTS: &[Mount] = &[
    m("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, None),
    m("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, None),
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ),
    m(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ),
    m("shm", "/dev/shm", "tmpfs", NOSUID_NODEV, Some("mode=1777")),
    m("tmpfs", "/tmp", "tmpfs", NOSUID_NODEV, Some("mode=1777")),
    m("tmpfs", "/run", "tmpfs", NOSUID_NODEV, Some("mode=0755")),
    m(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        NOSUID_NODEV_NOEXEC,
        Some("nsdelegate"),
    ),
];

/// Moves PID 1 off the initramfs onto a fresh tmpfs root.
///
/// The initramfs is the kernel's `rootfs`, which can never be unmounted, so
/// `pivot_root(2)` (what libcontainer uses to enter a container's rootfs)
/// fails with EINVAL in any mount namespace derived from it. Like
/// switch_root, mount a tmpfs, move it over `/` and chroot into it; the agent
/// binary keeps running from the initramfs (and is re-executed through
/// /proc/self/exe for the libcontainer helper).
fn leave_initramfs() -> anyhow::Result<()> {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; libc does not export it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let root = statfs("/").context("statfs /")?;
    if root.filesystem_type() != RAMFS_MAGIC && root.filesystem_type() != TMPFS_MAGIC {
        return Ok(());
    }
    const NEW_ROOT: &str = "/newroot";
    std::fs::create_dir_all(NEW_ROOT).context("create /newroot")?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mount tmpfs on /newroot")?;
    nix::unistd::chdir(NEW_ROOT).context("chdir /newroot")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move /newroot to /")?;
    nix::unistd::chroot(".").context("chroot into the new root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// Mounts the guest's pseudo file systems.
pub fn setup() -> anyhow::Result<()> {
    leave_initramfs()?;
    for mnt in MOUNTS {
        std::fs::create_dir_all(mnt.target).with_context(|| format!("create {}", mnt.target))?;
        match mount(
            Some(mnt.source),
            mnt.target,
            Some(mnt.fstype),
            mnt.flags,
            mnt.data,
        ) {
            Ok(()) => {}
            // The kernel may have mounted devtmpfs already (CONFIG_DEVTMPFS_MOUNT).
            Err(nix::errno::Errno::EBUSY) if mnt.fstype == "devtmpfs" => {}
            Err(e) => {
                return Err(e).with_context(|| format!("mount {} on {}", mnt.fstype, mnt.target))
            }
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").context("link /dev/ptmx")?;
    }
    Ok(())
}

/// Ends the VM. The guest kernel has no ACPI, so the agent reboots and the host
/// runs the VM so that a guest reboot terminates it (QEMU `-no-reboot` with
/// `reboot=t`; i8042 reset for the built-in VMM and Firecracker).
pub fn power_off() -> ! {
    sync();
    log::info!("vessel-agent: ending the VM");
    let err = reboot(RebootMode::RB_AUTOBOOT);
    log::error!("reboot failed: {err:?}; halting");
    loop {
        std::thread::park();
    }
}
