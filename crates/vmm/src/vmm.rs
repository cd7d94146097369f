//! The VMM: builds a VM from a config or a snapshot, runs the vCPU threads, and runs the
//! event loop (devices, control API) on the calling thread until the VM stops.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::api::server::{ApiEvent, ApiServer};
use crate::api::{Request, Response};
use crate::arch::{boot, layout, mptable};
use crate::config::{VmConfig, PVM_CMDLINE_QUIRKS};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::balloon::{Balloon, BalloonControl};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::net::{tap::Tap, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::transport::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{IrqTrigger, Poller, VirtioDevice};
use crate::devices::{lock, Bus, ExitSignal};
use crate::snapshot::{self, DeviceSnapshot, VmSnapshot};
use crate::vstate::vcpu::{self, RunControl, Vcpu, VcpuContext};
use crate::vstate::{memory, vm::Vm};

/// Errors while building or operating the VM.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VmmError {
    /// Invalid configuration
    Config(#[from] crate::config::ConfigError),
    /// Guest memory
    Memory(#[from] memory::MemoryError),
    /// KVM VM
    Vm(#[from] crate::vstate::vm::VmError),
    /// vCPU
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    /// Boot images
    Boot(#[from] boot::BootError),
    /// MP table
    Mptable(#[from] mptable::MptableError),
    /// Snapshot
    Snapshot(#[from] snapshot::SnapshotError),
    /// Cannot set up {0}
    Setup(&'static str, #[source] std::io::Error),
    /// Device {0}: {1}
    Device(String, String),
    /// Block device {0}
    Block(String, #[source] crate::devices::virtio::block::BlockError),
    /// virtio-fs device {0}
    Fs(String, #[source] crate::devices::virtio::fs::FsError),
    /// vsock device
    Vsock(#[source] crate::devices::virtio::vsock::VsockError),
    /// Network device {0}
    Tap(String, #[source] crate::devices::virtio::net::tap::TapError),
    /// Operation {0} is not valid while the VM is {1}
    InvalidState(&'static str, &'static str),
    /// vCPUs did not pause within {0:?}
    PauseTimeout(Duration),
}

/// Epoll owner id of the VMM itself (devices use their index).
const VMM_OWNER: u32 = u32::MAX;
const TOKEN_EXIT: u32 = 0;
const TOKEN_API_LISTENER: u32 = 1;
const TOKEN_API_CONN_BASE: u32 = 2;
/// SIGTERM or SIGINT arrived (see [`crate::stop_signal`]).
const TOKEN_STOP_SIGNAL: u32 = u32::MAX;
/// How long pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

fn vmm_data(token: u32) -> u64 {
    (u64::from(VMM_OWNER) << 32) | u64::from(token)
}

/// A running (or paused) VM.
#[derive(Debug)]
pub struct Vmm {
    config: VmConfig,
    mem: GuestMemoryMmap,
    vm: Vm,
    epoll: Arc<Epoll>,
    exit: Arc<ExitSignal>,
    control: Arc<RunControl>,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    balloon: Option<Arc<BalloonControl>>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    threads: Vec<JoinHandle<()>>,
    paused: bool,
    started: Instant,
}

/// Devices and buses shared by boot and restore.
struct Machine {
    balloon: Option<Arc<BalloonControl>>,
    io_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    cmdline_extra: Vec<String>,
}

fn open_serial_out(
    path: Option<&Path>,
    limits: crate::config::SerialLogLimits,
) -> Result<Box<dyn std::io::Write + Send>, VmmError> {
    Ok(match path {
        // Truncated, never through a link, and kept under its caps with
        // only write(2) and ftruncate(2) on the vCPU thread that writes it.
        Some(p) => Box::new(
            vessel_logcap::BoundedLog::create(p, limits.into())
                .map_err(|e| VmmError::Setup("serial log", e))?,
        ),
        None => Box::new(std::io::stdout()),
    })
}

fn eventfd(what: &'static str) -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup(what, e))
}

fn build_machine(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    vm: &Vm,
    epoll: &Arc<Epoll>,
    exit: &Arc<ExitSignal>,
    snap: Option<&VmSnapshot>,
) -> Result<Machine, VmmError> {
    let mut io_bus = Bus::default();
    let serial_irq = eventfd("serial irq")?;
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| VmmError::Setup("serial irqfd", std::io::Error::other(e)))?;
    let out = SerialOut::new(
        open_serial_out(config.serial_log.as_deref(), config.serial_log_limits)?,
        exit.clone(),
    );
    let serial_state = snap.map(|s| (&s.serial).into());
    let serial = Arc::new(Mutex::new(
        SerialDevice::new(serial_irq, out, serial_state.as_ref())
            .map_err(|e| VmmError::Setup("serial", e))?,
    ));
    io_bus.insert(COM1_BASE, COM1_LEN, serial.clone());
    io_bus.insert(
        I8042_BASE,
        I8042_LEN,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    );

    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for b in &config.block {
        let dev = Block::new(b).map_err(|e| VmmError::Block(b.path.display().to_string(), e))?;
        devices.push(Box::new(dev));
    }
    // Inherited taps first, before this process opens any tap of its own.
    let mut inherited = Vec::new();
    for n in &config.net {
        inherited.push(match n.fd {
            Some(fd) => Some(Tap::from_inherited(fd).map_err(|e| VmmError::Tap(n.describe(), e))?),
            None => None,
        });
    }
    for (i, (n, tap)) in config.net.iter().zip(inherited).enumerate() {
        let tap = match (tap, &n.tap) {
            (Some(t), _) => t,
            (None, Some(name)) => Tap::open(name).map_err(|e| VmmError::Tap(n.describe(), e))?,
            (None, None) => return Err(crate::config::ConfigError::NetSource(i).into()),
        };
        let mac = n.mac.unwrap_or([0x06, 0, 0xac, 0x10, 0, 2 + i as u8]);
        let dev = Net::new(tap, mac, n.mtu).map_err(|e| VmmError::Setup("net device", e))?;
        devices.push(Box::new(dev));
    }
    for f in &config.fs {
        let dev = Fs::new(&f.socket, &f.tag)
            .map_err(|e| VmmError::Fs(f.socket.display().to_string(), e))?;
        devices.push(Box::new(dev));
    }
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    let mut balloon = None;
    if let Some(mib) = config.balloon_mib {
        let dev = Balloon::new(mib);
        balloon = Some(dev.control());
        devices.push(Box::new(dev));
    }
    if let Some(v) = &config.vsock {
        let dev = Vsock::new(v).map_err(VmmError::Vsock)?;
        devices.push(Box::new(dev));
    }

    let mut mmio_bus = Bus::default();
    let mut virtio = Vec::new();
    let mut cmdline_extra = Vec::new();
    for (i, dev) in devices.into_iter().enumerate() {
        let i = i as u32;
        let base = layout::virtio_mmio_base(i);
        let irq = layout::IRQ_BASE + i;
        let irq_evt = eventfd("virtio irq")?;
        vm.fd()
            .register_irqfd(&irq_evt, irq)
            .map_err(|e| VmmError::Setup("virtio irqfd", std::io::Error::other(e)))?;
        let dev_type = dev.state().device_type();
        let poller = Poller::new(epoll.clone(), i);
        let mut transport =
            MmioTransport::new(dev, mem.clone(), Arc::new(IrqTrigger::new(irq_evt)), poller)
                .map_err(|e| VmmError::Setup("virtio transport", e))?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET);
            if let Err(e) = vm.fd().register_ioevent(evt, &addr, q as u32) {
                // The transport then signals the queue itself on the MMIO exit.
                log::debug!("no ioeventfd for device {i} queue {q}: {e}");
            }
        }
        if let Some(s) = snap.and_then(|s| s.devices.get(i as usize)) {
            if s.device_type != dev_type {
                return Err(VmmError::Device(
                    format!("slot {i}"),
                    format!(
                        "snapshot has device type {}, config has {dev_type}",
                        s.device_type
                    ),
                ));
            }
            transport
                .restore_state(&s.transport, &s.device)
                .map_err(|e| VmmError::Device(format!("slot {i}"), e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone());
        virtio.push(transport);
        cmdline_extra.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    Ok(Machine {
        balloon,
        io_bus,
        mmio_bus,
        serial,
        virtio,
        cmdline_extra,
    })
}

/// Gives a restored VM's devices the clone's own back ends (`new`, in device order;
/// empty: keep the snapshot's). A count other than the devices' is refused with `mismatch`.
fn attach_each<D, B>(
    devices: &mut [D],
    new: Vec<B>,
    mismatch: &'static str,
    set: impl Fn(&mut D, B),
) -> Result<(), VmmError> {
    if new.is_empty() {
        return Ok(());
    }
    if new.len() != devices.len() {
        return Err(VmmError::InvalidState("restore", mismatch));
    }
    for (d, b) in devices.iter_mut().zip(new) {
        set(d, b);
    }
    Ok(())
}

impl Vmm {
    /// Boots a fresh VM from `config`.
    pub fn boot(config: VmConfig) -> Result<Self, VmmError> {
        config.validate()?;
        let started = Instant::now();
        vcpu::install_kick_handler()?;
        // vhost-user backends map guest memory themselves: it must live in a shared memfd.
        let mem = if config.fs.is_empty() {
            memory::create(config.mem_mib)?
        } else {
            memory::create_shared(config.mem_mib)?
        };
        let vm = Vm::new(&mem)?;
        let epoll = Arc::new(Epoll::new().map_err(|e| VmmError::Setup("epoll", e))?);
        let exit = ExitSignal::new().map_err(|e| VmmError::Setup("exit eventfd", e))?;
        let machine = build_machine(&config, &mem, &vm, &epoll, &exit, None)?;

        let quirks = config.pvm_quirks.enabled();
        let mut extra = machine.cmdline_extra.clone();
        if quirks {
            log::info!("host KVM is PVM: hiding unsupported CPUID features, adding cmdline quirks");
            extra.extend(PVM_CMDLINE_QUIRKS.iter().map(|s| s.to_string()));
        }
        let cmdline = boot::build_cmdline(&config.cmdline, &extra)?;
        let entry = boot::load(&mem, &config.kernel, config.initramfs.as_deref(), &cmdline)?;
        mptable::setup(&mem, config.vcpus)?;

        let base_cpuid = vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let v = Vcpu::new(&vm, id)?;
            let boot = (id == 0).then_some((&mem, entry));
            v.configure(&base_cpuid, config.vcpus, quirks, boot)?;
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let mut vmm = Vmm {
            config,
            mem,
            vm,
            epoll,
            exit,
            control: Arc::new(RunControl::default()),
            serial: machine.serial,
            virtio: machine.virtio,
            balloon: machine.balloon,
            vcpus,
            threads: Vec::new(),
            paused: false,
            started,
        };
        vmm.start_vcpus(machine.io_bus, machine.mmio_bus)?;
        Ok(vmm)
    }

    /// Restores a VM from the snapshot in `dir`. `serial_log`, `vsock_uds` and
    /// `fs_sockets` (one per virtio-fs device, or none) override the snapshot's paths
    /// (each clone needs its own), `serial_log_limits` its log caps.
    ///
    /// A VM with virtio-fs devices gets a private copy of the snapshot's memory in a
    /// memfd (its vhost-user back ends map guest memory by fd); others map the memory
    /// file copy-on-write. The virtio-fs devices reconnect to their (new) back ends with
    /// the saved ring state: that is sound while the guest has no FUSE session on them
    /// (nothing mounted when the snapshot was taken), which is what templates ensure.
    pub fn restore(
        dir: &Path,
        serial_log: Option<PathBuf>,
        serial_log_limits: Option<crate::config::SerialLogLimits>,
        vsock_uds: Option<PathBuf>,
        fs_sockets: Vec<PathBuf>,
        net_fds: Vec<i32>,
        paused: bool,
    ) -> Result<Self, VmmError> {
        let started = Instant::now();
        vcpu::install_kick_handler()?;
        let snap = snapshot::read_state(dir)?;
        let mut config = snap.config.clone();
        if serial_log.is_some() {
            config.serial_log = serial_log;
        }
        if let Some(limits) = serial_log_limits {
            config.serial_log_limits = limits;
        }
        if let (Some(v), Some(uds)) = (config.vsock.as_mut(), vsock_uds) {
            v.uds = uds;
        }
        attach_each(
            &mut config.fs,
            fs_sockets,
            "given a different number of virtio-fs sockets than the snapshot has devices",
            |f, socket| f.socket = socket,
        )?;
        attach_each(
            &mut config.net,
            net_fds,
            "given a different number of tap fds than the snapshot has network devices",
            |n, fd| {
                n.fd = Some(fd);
                n.tap = None;
            },
        )?;
        let mem = if config.fs.is_empty() {
            memory::restore(&snapshot::memory_path(dir), snap.mem_bytes)?
        } else {
            memory::restore_shared(&snapshot::memory_path(dir), snap.mem_bytes)?
        };
        let vm = Vm::new(&mem)?;
        vm.restore_state(&snap.vm)?;
        let epoll = Arc::new(Epoll::new().map_err(|e| VmmError::Setup("epoll", e))?);
        let exit = ExitSignal::new().map_err(|e| VmmError::Setup("exit eventfd", e))?;
        let machine = build_machine(&config, &mem, &vm, &epoll, &exit, Some(&snap))?;
        let mut vcpus = Vec::new();
        for (id, state) in snap.vcpus.iter().enumerate() {
            let v = Vcpu::new(&vm, id as u8)?;
            v.restore_state(state)?;
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let control = Arc::new(RunControl::default());
        if paused {
            control.request_pause();
        }
        let mut vmm = Vmm {
            config,
            mem,
            vm,
            epoll,
            exit,
            control,
            serial: machine.serial,
            virtio: machine.virtio,
            balloon: machine.balloon,
            vcpus,
            threads: Vec::new(),
            paused,
            started,
        };
        vmm.start_vcpus(machine.io_bus, machine.mmio_bus)?;
        Ok(vmm)
    }

    fn start_vcpus(&mut self, io_bus: Bus, mmio_bus: Bus) -> Result<(), VmmError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                self.exit.eventfd().as_raw_fd(),
                EpollEvent::new(EventSet::IN, vmm_data(TOKEN_EXIT)),
            )
            .map_err(|e| VmmError::Setup("epoll exit", e))?;
        for v in &self.vcpus {
            let ctx = VcpuContext {
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                exit: self.exit.clone(),
                control: self.control.clone(),
            };
            let v = v.clone();
            let id = lock(&v).id;
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
                    vcpu::run_loop(v, ctx)
                })
                .map_err(|e| VmmError::Setup("vCPU thread", e))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    fn kick_vcpus(&self) {
        for t in &self.threads {
            // A thread that already exited cannot be signalled; that is fine.
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    /// Pauses all vCPUs (waits until each is parked).
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if self.paused {
            return Ok(());
        }
        self.control.request_pause();
        self.kick_vcpus();
        if !self.control.wait_paused(self.vcpus.len(), PAUSE_TIMEOUT) {
            self.control.resume();
            return Err(VmmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        self.paused = true;
        Ok(())
    }

    /// Resumes paused vCPUs.
    pub fn resume(&mut self) {
        self.control.resume();
        self.paused = false;
    }

    /// Writes a snapshot of the paused VM into `dir`.
    pub fn snapshot(&mut self, dir: &Path) -> Result<(), VmmError> {
        if !self.paused {
            return Err(VmmError::InvalidState(
                "snapshot",
                "running (pause it first)",
            ));
        }
        if !self.control.wait_paused(self.vcpus.len(), PAUSE_TIMEOUT) {
            return Err(VmmError::PauseTimeout(PAUSE_TIMEOUT));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let devices = self
            .virtio
            .iter()
            .map(|t| {
                let t = lock(t);
                DeviceSnapshot {
                    device_type: t.device().state().device_type(),
                    transport: t.save_state(),
                    device: t.device().save_state(),
                }
            })
            .collect();
        let snap = VmSnapshot {
            version: snapshot::SNAPSHOT_VERSION,
            config: self.config.clone(),
            mem_bytes: memory::size(&self.mem),
            vm: self.vm.save_state()?,
            vcpus,
            serial: (&lock(&self.serial).state()).into(),
            devices,
        };
        std::fs::create_dir_all(dir).map_err(|e| VmmError::Setup("snapshot dir", e))?;
        memory::save(
            &self.mem,
            &snapshot::memory_path(dir),
            !self.config.fs.is_empty(),
        )?;
        snapshot::write_state(dir, &snap)?;
        Ok(())
    }

    fn metrics(&self) -> serde_json::Value {
        let rss_kib = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * 4);
        serde_json::json!({
            "state": if self.paused { "paused" } else { "running" },
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "vcpus": self.vcpus.len(),
            "mem_mib": memory::size(&self.mem) >> 20,
            "rss_kib": rss_kib,
            "virtio_devices": self.virtio.len(),
            "balloon": self.balloon.as_ref().map(|b| {
                use std::sync::atomic::Ordering::Relaxed;
                serde_json::json!({
                    "target_pages": b.target_pages.load(Relaxed),
                    "actual_pages": b.actual_pages.load(Relaxed),
                    "inflated_bytes": b.inflated_bytes.load(Relaxed),
                    "reported_bytes": b.reported_bytes.load(Relaxed),
                })
            }),
        })
    }

    /// Acts on one API request.
    pub fn handle_request(&mut self, req: Request) -> Response {
        let result = match req {
            Request::Pause {} => self.pause().map(|_| None),
            Request::Resume {} => {
                self.resume();
                Ok(None)
            }
            Request::Shutdown {} => {
                self.exit.trigger(crate::EXIT_OK);
                Ok(None)
            }
            Request::Snapshot { dir } => self.snapshot(&dir).map(|_| None),
            Request::Metrics {} => Ok(Some(self.metrics())),
            Request::Balloon { target_mib } => match &self.balloon {
                Some(b) => {
                    b.set_target_mib(target_mib);
                    Ok(None)
                }
                None => Err(VmmError::InvalidState(
                    "balloon",
                    "without a balloon device",
                )),
            },
            Request::Configure { .. } | Request::Boot {} | Request::Restore { .. } => Err(
                VmmError::InvalidState("configure/boot/restore", "already running"),
            ),
        };
        match result {
            Ok(None) => Response::ok(),
            Ok(Some(v)) => Response::with(v),
            Err(e) => Response::err(crate::error_chain(&e)),
        }
    }

    fn watch_api(&self, api: &ApiServer) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            api.listener_fd(),
            EpollEvent::new(EventSet::IN, vmm_data(TOKEN_API_LISTENER)),
        )?;
        for (id, fd) in api.conn_fds() {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, vmm_data(TOKEN_API_CONN_BASE + id)),
            )?;
        }
        Ok(())
    }

    fn handle_api_events(&mut self, api: &mut ApiServer, events: Vec<ApiEvent>) {
        for ev in events {
            match ev {
                ApiEvent::Accepted(id, fd) => {
                    let _ = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, vmm_data(TOKEN_API_CONN_BASE + id)),
                    );
                }
                ApiEvent::Request(id, req) => {
                    let resp = self.handle_request(*req);
                    api.respond(id, &resp);
                }
                ApiEvent::Closed(_) => {}
            }
        }
    }

    /// Runs the event loop until the VM stops; returns the process exit status.
    pub fn run(mut self, mut api: Option<ApiServer>) -> i32 {
        if let Some(api) = &api {
            if let Err(e) = self.watch_api(api) {
                log::error!("cannot watch the API socket: {e}");
            }
        }
        let stop_signal = match self.watch_stop_signal() {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::error!("cannot watch for SIGTERM: {e}");
                None
            }
        };
        crate::seccomp::apply(crate::seccomp::ThreadKind::Vmm);
        let mut events = vec![EpollEvent::default(); 64];
        'outer: loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("epoll_wait failed: {e}");
                    self.exit.trigger(crate::EXIT_VMM_ERROR);
                    break;
                }
            };
            for ev in &events[..n] {
                let owner = (ev.data() >> 32) as u32;
                let token = ev.data() as u32;
                if owner == VMM_OWNER {
                    match token {
                        TOKEN_EXIT => break 'outer,
                        TOKEN_STOP_SIGNAL => {
                            log::info!("stop signal: stopping the VM");
                            self.exit.trigger(crate::EXIT_OK);
                            break 'outer;
                        }
                        TOKEN_API_LISTENER => {
                            if let Some(a) = api.as_mut() {
                                let evs = a.accept();
                                self.handle_api_events(a, evs);
                            }
                        }
                        t => {
                            if let Some(a) = api.as_mut() {
                                let evs = a.read(t - TOKEN_API_CONN_BASE);
                                self.handle_api_events(a, evs);
                            }
                        }
                    }
                } else if let Some(t) = self.virtio.get(owner as usize) {
                    lock(t).handle_event(token, ev.event_set());
                }
            }
            if self.exit.is_set() {
                break;
            }
        }
        self.stop();
        crate::stop_signal::unwatch();
        drop(stop_signal);
        self.exit.code()
    }

    /// An eventfd in the event loop that SIGTERM and SIGINT increment.
    fn watch_stop_signal(&self) -> Result<EventFd, VmmError> {
        let fd = eventfd("stop signal eventfd")?;
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, vmm_data(TOKEN_STOP_SIGNAL)),
            )
            .map_err(|e| VmmError::Setup("epoll stop signal", e))?;
        crate::stop_signal::watch(&fd);
        Ok(fd)
    }

    fn stop(&mut self) {
        self.control.stop();
        self.kick_vcpus();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Guest memory (for tests and metrics).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Serves the API before there is a VM: `configure`, then `boot`; or `restore`. Returns the
/// VM once one was created; `shutdown` exits the process.
pub fn serve_until_vm(api: &mut ApiServer) -> Result<Vmm, VmmError> {
    let mut config: Option<VmConfig> = None;
    let setup = |e| VmmError::Setup("pre-boot API loop", e);
    let epoll = Epoll::new().map_err(setup)?;
    epoll
        .ctl(
            ControlOperation::Add,
            api.listener_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .map_err(setup)?;
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(setup(e)),
        };
        for ev in &events[..n] {
            let evs = if ev.data() == 0 {
                api.accept()
            } else {
                api.read(ev.data() as u32)
            };
            for e in evs {
                match e {
                    ApiEvent::Accepted(id, fd) => epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, u64::from(id)),
                        )
                        .map_err(setup)?,
                    ApiEvent::Closed(_) => {}
                    ApiEvent::Request(id, req) => {
                        let result = match *req {
                            Request::Configure { config: c } => match c.validate() {
                                Ok(()) => {
                                    config = Some(c);
                                    Ok(None)
                                }
                                Err(e) => Err(crate::error_chain(&e)),
                            },
                            Request::Boot {} => match config.clone() {
                                Some(c) => {
                                    Vmm::boot(c).map(Some).map_err(|e| crate::error_chain(&e))
                                }
                                None => Err("boot: send configure first".to_string()),
                            },
                            Request::Restore {
                                dir,
                                serial_log,
                                serial_log_limits,
                                vsock_uds,
                                fs_sockets,
                                net_fds,
                                paused,
                            } => Vmm::restore(
                                &dir,
                                serial_log,
                                serial_log_limits,
                                vsock_uds,
                                fs_sockets,
                                net_fds,
                                paused,
                            )
                            .map(Some)
                            .map_err(|e| crate::error_chain(&e)),
                            Request::Metrics {} => Ok(None),
                            Request::Shutdown {} => std::process::exit(crate::EXIT_OK),
                            other => {
                                Err(format!("{other:?}: no VM yet (configure and boot first)"))
                            }
                        };
                        match result {
                            Ok(Some(vmm)) => {
                                api.respond(id, &Response::ok());
                                // The VMM's own epoll takes over these fds.
                                drop(epoll);
                                return Ok(vmm);
                            }
                            Ok(None) => api.respond(id, &Response::ok()),
                            Err(e) => api.respond(id, &Response::err(e)),
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_attachments_replace_in_order_or_are_refused_by_count() {
        let mut devs = vec![1, 2];
        attach_each(&mut devs, Vec::<i32>::new(), "n", |d, b| *d = b).unwrap();
        assert_eq!(devs, [1, 2], "none given: the snapshot's stay");
        attach_each(&mut devs, vec![7, 8], "n", |d, b| *d = b).unwrap();
        assert_eq!(devs, [7, 8]);
        let e = attach_each(&mut devs, vec![9], "count differs", |d, b| *d = b).unwrap_err();
        assert!(e.to_string().contains("count differs"), "{e}");
        assert_eq!(devs, [7, 8], "a refused restore changes nothing");
    }
}
