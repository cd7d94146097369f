//! The QEMU command line for a sandbox VM (pure: unit-tested without QEMU).

use std::path::{Path, PathBuf};

use crate::{Accelerator, AgentChannel, Nic, VmConfig};

/// QEMU's TCG translation cache in MiB (`-accel tcg,tb-size=`). A Linux
/// guest's kernel and a busybox user space translate to well under this.
pub const TCG_TB_SIZE_MIB: u32 = 64;

/// QEMU machine type (`q35` or `microvm` in configuration files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// PCI machine; most tested with vhost-user devices.
    Q35,
    /// Minimal machine with virtio-mmio devices and no firmware tables.
    Microvm,
}

/// Host paths a VM's command line refers to, all inside the run directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub qmp: PathBuf,
    /// vhost-user socket between QEMU and vhost-device-vsock.
    pub vhost_vsock: PathBuf,
    /// Agent virtio-serial socket (QEMU listens).
    pub agent_serial: PathBuf,
}

impl Paths {
    pub fn new(run_dir: &Path) -> Self {
        Paths {
            qmp: run_dir.join("qmp.sock"),
            vhost_vsock: run_dir.join("vhost-vsock.sock"),
            agent_serial: run_dir.join("agent.sock"),
        }
    }
}

/// Whether a VM of `cfg` on `machine` starts without its vhost-user devices
/// (see [`VmConfig::deferred_devices`]): q35 only, which has PCIe root ports to
/// plug them into; microvm has no hot-plug and starts with every device.
pub fn defers_devices(cfg: &VmConfig, machine: Machine) -> bool {
    cfg.deferred_devices && machine == Machine::Q35
}

/// The PCIe root port that takes the hot-plugged vsock device.
pub const VSOCK_PORT: &str = "vessel-rp0";

/// The PCIe root port that takes the hot-plugged virtio-fs device of share `i`.
pub fn share_port(i: usize) -> String {
    format!("vessel-rp{}", i + 1)
}

/// The PCIe root port that takes the hot-plugged network device `i` of a VM
/// with `shares` shares.
pub fn nic_port(shares: usize, i: usize) -> String {
    format!("vessel-rp{}", shares + i + 1)
}

/// QEMU's command line; the serial console goes to `console_fd`, an fd QEMU
/// inherits at that number. `ram_fd` (for a VM that [`defers_devices`]) is the
/// guest RAM, a memfd QEMU inherits at that number.
///
/// A VM that defers its devices has the shape a template needs: its RAM in that
/// file (left out of the migration stream, see `super::snapshot`), the agent on
/// virtio-serial whatever `cfg.channel` says, no vhost-user device, and one
/// empty PCIe root port for the vsock device and one per share, with native
/// PCIe hot-plug (q35's default, ACPI hot-plug, needs a guest with ACPI, which
/// ours does not have).
pub fn args(
    cfg: &VmConfig,
    accel: Accelerator,
    machine: Machine,
    paths: &Paths,
    console_fd: std::os::fd::RawFd,
    tsc_khz: Option<u32>,
    ram_fd: Option<std::os::fd::RawFd>,
) -> Vec<String> {
    let deferred = defers_devices(cfg, machine) && ram_fd.is_some();
    let channel = if deferred {
        AgentChannel::Serial
    } else {
        cfg.channel
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("vessel-{},debug-threads=on", cfg.id)]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-display",
        "none",
        "-no-reboot",
    ]);
    // QEMU's own seccomp filter: no obsolete system calls, no setuid, no
    // fork/exec, no scheduler or memory-policy changes.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    let mem = format!("{}M", cfg.memory_mib);
    // Shared memory only where vhost-user backends (vsock, virtio-fs) map
    // guest RAM. Otherwise private anonymous memory: untouched pages cost
    // nothing, even when a snapshot load reads them to check for zeroes.
    let vhost_user = cfg.channel == AgentChannel::Vsock || !cfg.shared_dirs.is_empty();
    let backend = if let (true, Some(fd)) = (deferred, ram_fd) {
        format!("memory-backend-file,id=mem,size={mem},mem-path=/proc/self/fd/{fd},share=on")
    } else if vhost_user {
        format!("memory-backend-memfd,id=mem,size={mem},share=on")
    } else {
        format!("memory-backend-ram,id=mem,size={mem}")
    };
    push(&["-object", &backend]);
    let (cpu, pci) = match (accel, machine) {
        (Accelerator::Kvm, _) => ("host", machine == Machine::Q35),
        (Accelerator::Tcg, _) => ("max", machine == Machine::Q35),
    };
    match machine {
        Machine::Q35 => push(&["-machine", "q35,memory-backend=mem"]),
        Machine::Microvm => {
            push(&[
                "-machine",
                "microvm,x-option-roms=off,acpi=off,rtc=on,memory-backend=mem",
            ]);
            push(&["-global", "virtio-mmio.force-legacy=false"]);
        }
    }
    match accel {
        Accelerator::Kvm => push(&["-accel", "kvm"]),
        // QEMU's default translation cache is up to 1 GiB, all of it host memory
        // the guest's code fills: capped, it fits the sandbox's host limits.
        Accelerator::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MIB}")]),
    }
    push(&["-cpu", cpu, "-m", &mem, "-smp", &cfg.vcpus.to_string()]);
    push(&[
        "-kernel",
        &cfg.kernel.to_string_lossy(),
        "-initrd",
        &cfg.initramfs.to_string_lossy(),
    ]);
    // `reboot=t` with `-no-reboot`: a guest reboot (the agent's way to end
    // the VM) or panic ends the QEMU process. Under TCG the guest's TSC is
    // the host's: its frequency is given, not calibrated (see
    // crate::host::tsc_khz).
    let tsc = match (accel, tsc_khz) {
        (Accelerator::Tcg, Some(khz)) => Some(format!("tsc_early_khz={khz}")),
        _ => None,
    };
    let words: Vec<&str> = std::iter::once("reboot=t").chain(tsc.as_deref()).collect();
    let mut api = cfg.clone();
    api.channel = channel;
    push(&["-append", &crate::guest_cmdline(&api, &words)]);
    push(&[
        "-chardev",
        // A pipe to the host-side bounded log (see `Qemu::start_qemu_with`).
        &format!("file,id=console,path=/proc/self/fd/{console_fd}"),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", paths.qmp.display()),
    ]);
    let dev = |pci_name: &str, mmio_name: &str| {
        if pci {
            pci_name.to_string()
        } else {
            mmio_name.to_string()
        }
    };
    match channel {
        AgentChannel::Vsock => {
            push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", paths.vhost_vsock.display()),
            ]);
            push(&[
                "-device",
                &format!(
                    "{},chardev=vsock",
                    dev("vhost-user-vsock-pci", "vhost-user-vsock-device")
                ),
            ]);
        }
        AgentChannel::Serial => {
            push(&[
                "-device",
                &format!(
                    "{},id=vser0",
                    dev("virtio-serial-pci", "virtio-serial-device")
                ),
            ]);
            push(&[
                "-chardev",
                &format!(
                    "socket,id=agent,path={},server=on,wait=off",
                    paths.agent_serial.display()
                ),
            ]);
            push(&[
                "-device",
                "virtserialport,bus=vser0.0,chardev=agent,name=vessel.agent",
            ]);
        }
    }
    push(&["-device", &dev("virtio-rng-pci", "virtio-rng-device")]);
    // Free page reporting: the guest reports free blocks (2 MiB, after ~2 s)
    // and QEMU drops them from the host (a hole punched in the memfd, or
    // MADV_DONTNEED on private RAM). A template's reported pages are holes in its
    // memory file, which its clones do not copy.
    push(&[
        "-device",
        &format!(
            "{},free-page-reporting=on",
            dev("virtio-balloon-pci", "virtio-balloon-device")
        ),
    ]);
    for (i, nic) in cfg.nics.iter().enumerate().filter(|_| !deferred) {
        match nic {
            // The fd is inherited (see Qemu::start_qemu_with); vhost=off: no
            // /dev/vhost-net is needed. QEMU reads IFF_VNET_HDR from the fd
            // and then negotiates checksum and TSO offloads with the guest
            // and sets them on the tap (TUNSETOFFLOAD).
            Nic::VirtioTap(tap) => {
                push(&[
                    "-netdev",
                    &format!("tap,id=net{i},fd={},vhost=off", tap.raw_fd()),
                ]);
                let mut device = format!(
                    "{},netdev=net{i},mac={}",
                    dev("virtio-net-pci", "virtio-net-device"),
                    tap.mac
                );
                if let Some(mtu) = tap.mtu {
                    device.push_str(&format!(",host_mtu={mtu}"));
                }
                if pci {
                    // No iPXE option ROM: the kernel is loaded directly, and SeaBIOS
                    // running iPXE's init cost seconds of boot in the KVM lane.
                    device.push_str(",romfile=");
                }
                push(&["-device", &device]);
            }
        }
    }
    if deferred {
        push(&[
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        ]);
        let shares = cfg.shared_dirs.len();
        let ports = std::iter::once(VSOCK_PORT.to_string())
            .chain((0..shares).map(share_port))
            .chain((0..cfg.nics.len()).map(|i| nic_port(shares, i)));
        for (i, id) in ports.enumerate() {
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={id},bus=pcie.0,chassis={},slot={}",
                    i + 1,
                    i + 1
                ),
            ]);
        }
        return a;
    }
    for (i, share) in cfg.shared_dirs.iter().enumerate() {
        let sock = crate::virtiofs::socket(&cfg.run_dir, i);
        push(&[
            "-chardev",
            &format!("socket,id=fs{i},path={}", sock.display()),
        ]);
        push(&[
            "-device",
            &format!(
                "{},chardev=fs{i},tag={}",
                dev("vhost-user-fs-pci", "vhost-user-fs-device"),
                share.tag
            ),
        ]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedDir;

    fn cfg(channel: AgentChannel) -> VmConfig {
        VmConfig {
            id: "sb1".into(),
            run_dir: "/run/vessel/sb1".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio.gz".into(),
            kernel_args: vec!["vessel.debug".into()],
            vcpus: 2,
            memory_mib: 384,
            channel,
            vsock_uds: "/run/vessel/sb1/vsock.sock".into(),
            console_log: "/run/vessel/sb1/console.log".into(),
            log_limits: Default::default(),
            shared_dirs: vec![SharedDir {
                tag: "rootfs".into(),
                host_path: "/b/rootfs".into(),
                read_only: false,
            }],
            nics: Vec::new(),
            netns: None,
            cgroup: None,
            deferred_devices: false,
        }
    }

    /// A tap NIC (on /dev/null) with MAC 02:00:00:00:00:0a.
    fn tap_nic(mtu: Option<u32>) -> Nic {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        Nic::VirtioTap(crate::TapNic {
            tap_name: "tap0_vessel".into(),
            fd: std::sync::Arc::new(fd),
            vnet_hdr: true,
            mac: crate::MacAddr([0x02, 0, 0, 0, 0, 0x0a]),
            mtu,
        })
    }

    /// The command line of `c`, joined, with the console on fd 9.
    fn line(
        c: &VmConfig,
        accel: Accelerator,
        machine: Machine,
        tsc_khz: Option<u32>,
        ram_fd: Option<std::os::fd::RawFd>,
    ) -> String {
        args(
            c,
            accel,
            machine,
            &Paths::new(&c.run_dir),
            9,
            tsc_khz,
            ram_fd,
        )
        .join(" ")
    }

    #[test]
    fn tap_nics_by_inherited_fd_with_the_links_mac() {
        let mut c = cfg(AgentChannel::Vsock);
        c.nics = vec![tap_nic(Some(1400))];
        let raw = crate::nic::tap_fds(&c.nics)[0];
        let q35 = line(&c, Accelerator::Tcg, Machine::Q35, None, None);
        assert!(
            q35.contains(&format!("-netdev tap,id=net0,fd={raw},vhost=off")),
            "{q35}"
        );
        // The console pipe and the taps are inherited at their own numbers.
        assert!(
            q35.contains("-chardev file,id=console,path=/proc/self/fd/9"),
            "{q35}"
        );
        assert!(
            q35.contains(
                "-device virtio-net-pci,netdev=net0,mac=02:00:00:00:00:0a,host_mtu=1400,romfile="
            ),
            "{q35}"
        );
        let mmio = line(&c, Accelerator::Tcg, Machine::Microvm, None, None);
        assert!(
            mmio.contains("-device virtio-net-device,netdev=net0"),
            "{mmio}"
        );
        assert_eq!(crate::nic::tap_fds(&c.nics), vec![raw]);
    }

    #[test]
    fn q35_tcg_vsock() {
        let c = cfg(AgentChannel::Vsock);
        let a = line(&c, Accelerator::Tcg, Machine::Q35, Some(2_100_000), None);
        assert!(a.contains("-machine q35,memory-backend=mem"), "{a}");
        assert!(a.contains(" reboot=t tsc_early_khz=2100000 "), "{a}");
        assert!(a.contains("-accel tcg,tb-size=64"), "{a}");
        assert!(a.contains("memory-backend-memfd,id=mem,size=384M,share=on"));
        assert!(a.contains("-cpu max -m 384M -smp 2"));
        assert!(a.contains("vhost-user-vsock-pci,chardev=vsock"));
        assert!(a.contains("-no-reboot"));
        assert!(a.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
        assert!(a.contains("vhost-user-fs-pci,chardev=fs0,tag=rootfs"));
        assert!(
            a.contains("-device virtio-balloon-pci,free-page-reporting=on"),
            "{a}"
        );
        assert!(a.contains("path=/run/vessel/sb1/fs0.sock"));
        assert!(!a.contains("virtserialport"));
    }

    #[test]
    fn microvm_kvm_serial() {
        let c = cfg(AgentChannel::Serial);
        let a = line(
            &c,
            Accelerator::Kvm,
            Machine::Microvm,
            Some(2_100_000),
            None,
        );
        assert!(a.contains("-machine microvm,x-option-roms"), "{a}");
        assert!(a.contains("-accel kvm"), "{a}");
        assert!(!a.contains("tsc_early_khz"), "KVM gives kvm-clock: {a}");
        assert!(a.contains("-cpu host"));
        assert!(a.contains("virtio-serial-device,id=vser0"));
        assert!(a.contains("name=vessel.agent"));
        assert!(a.contains("vhost-user-fs-device"));
        // virtio-fs needs shared memory even without vsock.
        assert!(a.contains("memory-backend-memfd"), "{a}");
    }

    #[test]
    fn deferred_devices_q35_template_shape() {
        let mut c = cfg(AgentChannel::Vsock);
        c.deferred_devices = true;
        c.nics = vec![tap_nic(None)];
        let a = line(&c, Accelerator::Tcg, Machine::Q35, None, Some(11));
        assert!(
            a.contains("memory-backend-file,id=mem,size=384M,mem-path=/proc/self/fd/11,share=on"),
            "{a}"
        );
        // The agent on virtio-serial, told so on the kernel command line.
        assert!(a.contains("vessel.channel=serial vessel.debug"), "{a}");
        assert!(
            a.contains("virtserialport,bus=vser0.0,chardev=agent"),
            "{a}"
        );
        assert!(!a.contains("vhost-user"), "{a}");
        assert!(
            a.contains("-global ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"),
            "{a}"
        );
        assert!(
            a.contains("pcie-root-port,id=vessel-rp0,bus=pcie.0,chassis=1,slot=1"),
            "{a}"
        );
        assert!(
            a.contains("pcie-root-port,id=vessel-rp1,bus=pcie.0,chassis=2,slot=2"),
            "{a}"
        );
        // The NIC comes later too: a port for it, no device yet.
        assert!(!a.contains("-netdev"), "{a}");
        assert!(
            a.contains("pcie-root-port,id=vessel-rp2,bus=pcie.0,chassis=3,slot=3"),
            "{a}"
        );
        assert!(!a.contains("vessel-rp3"), "one port per device: {a}");
        // microvm has no hot-plug: every device at start.
        let m = line(&c, Accelerator::Tcg, Machine::Microvm, None, Some(11));
        assert!(!defers_devices(&c, Machine::Microvm));
        assert!(m.contains("vhost-user-vsock-device"), "{m}");
        assert!(!m.contains("pcie-root-port"), "{m}");
    }

    #[test]
    fn private_memory_without_vhost_user() {
        let mut c = cfg(AgentChannel::Serial);
        c.shared_dirs.clear();
        let a = line(&c, Accelerator::Tcg, Machine::Q35, None, None);
        assert!(a.contains("memory-backend-ram,id=mem,size=384M"), "{a}");
        assert!(!a.contains("share=on"), "{a}");
    }
}
