//! vCPUs: configuration at boot, the run loop (one thread each), pausing through a signal
//! that makes `KVM_RUN` return, and state save/restore for snapshots.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run,
    kvm_sregs, kvm_vcpu_events, CpuId, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::vm::Vm;
use crate::arch::boot::KernelEntry;
use crate::arch::{cpuid, msr, regs};
use crate::devices::{lock, Bus, ExitSignal};

/// Errors while configuring or saving a vCPU.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum VcpuError {
    /// KVM call {0} on a vCPU failed: {1}
    Kvm(&'static str, kvm_ioctls::Error),
    /// Cannot write boot registers
    Regs(#[from] regs::RegsError),
    /// KVM accepted only {0} of {1} MSRs
    Msrs(usize, usize),
    /// Too many MSRs: {0} (KVM takes at most 256)
    TooManyMsrs(usize),
    /// Cannot install the vCPU kick signal handler: {0}
    Signal(vmm_sys_util::errno::Error),
}

thread_local! {
    /// The `kvm_run` page of the vCPU on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's `kvm_run` mapping,
        // which lives as long as the thread holds the vCPU. Setting `immediate_exit` makes
        // the current or the next `KVM_RUN` return EINTR, so a kick is never lost.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(VcpuError::Signal)
}

/// Serializable copy of `kvm_fpu` (kvm-bindings has no serde impl for it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FpuState {
    fpr: Vec<[u8; 16]>,
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: Vec<[u8; 16]>,
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// Everything KVM keeps about one vCPU that a restore needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// MSRs (only those this host's KVM could read).
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Multiprocessing state (halted, runnable, waiting for SIPI, ...).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    /// vCPU index (also its APIC id).
    pub id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` on `vm`.
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Kvm("KVM_CREATE_VCPU", e))?;
        Ok(Vcpu { id, fd })
    }

    /// Sets CPUID, MSRs and the LAPIC; the boot vCPU also gets the kernel entry registers.
    pub fn configure(
        &self,
        base_cpuid: &CpuId,
        count: u8,
        hide_pvm_unsupported: bool,
        boot: Option<(&GuestMemoryMmap, KernelEntry)>,
    ) -> Result<(), VcpuError> {
        let mut cpuid = base_cpuid.clone();
        cpuid::filter(&mut cpuid, self.id, count, hide_pvm_unsupported);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| VcpuError::Kvm("KVM_SET_CPUID2", e))?;
        let entries = msr::boot_msr_entries();
        let set = self
            .fd
            .set_msrs(&msr::to_msrs(&entries).ok_or(VcpuError::TooManyMsrs(entries.len()))?)
            .map_err(|e| VcpuError::Kvm("KVM_SET_MSRS", e))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs(set, entries.len()));
        }
        if let Some((mem, entry)) = boot {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|e| VcpuError::Kvm("KVM_GET_SREGS", e))?;
            let sregs = regs::boot_sregs(mem, entry.mode, sregs)?;
            self.fd
                .set_sregs(&sregs)
                .map_err(|e| VcpuError::Kvm("KVM_SET_SREGS", e))?;
            self.fd
                .set_regs(&regs::boot_regs(entry.mode, entry.entry, entry.boot_info))
                .map_err(|e| VcpuError::Kvm("KVM_SET_REGS", e))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(|e| VcpuError::Kvm("KVM_SET_FPU", e))?;
        }
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Kvm("KVM_GET_LAPIC", e))?;
        regs::set_lint(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Kvm("KVM_SET_LAPIC", e))?;
        Ok(())
    }

    /// Saves the vCPU's state. The vCPU must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let k = |what| move |e| VcpuError::Kvm(what, e);
        let cpuid = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(k("KVM_GET_CPUID2"))?;
        // Read MSRs one at a time so that one unknown to this host does not lose the rest.
        let mut msrs = Vec::new();
        for index in msr::SNAPSHOT_MSRS {
            let Some(mut one) = msr::to_msrs(&[kvm_msr_entry {
                index: *index,
                ..Default::default()
            }]) else {
                continue;
            };
            if matches!(self.fd.get_msrs(&mut one), Ok(1)) {
                msrs.push(one.as_slice()[0]);
            }
        }
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            msrs,
            regs: self.fd.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            fpu: FpuState::from(&self.fd.get_fpu().map_err(k("KVM_GET_FPU"))?),
            lapic: self.fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(k("KVM_GET_VCPU_EVENTS"))?,
            debugregs: self.fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Restores state saved by [`Vcpu::save_state`] into a fresh vCPU.
    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        let k = |what| move |e| VcpuError::Kvm(what, e);
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| {
            VcpuError::Kvm("CpuId::from_entries", kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        self.fd.set_cpuid2(&cpuid).map_err(k("KVM_SET_CPUID2"))?;
        // Order matters: sregs before MSRs (EFER), LAPIC before events and mp_state.
        self.fd.set_sregs(&s.sregs).map_err(k("KVM_SET_SREGS"))?;
        self.fd.set_regs(&s.regs).map_err(k("KVM_SET_REGS"))?;
        self.fd.set_fpu(&s.fpu.to_kvm()).map_err(k("KVM_SET_FPU"))?;
        let set = self
            .fd
            .set_msrs(&msr::to_msrs(&s.msrs).ok_or(VcpuError::TooManyMsrs(s.msrs.len()))?)
            .map_err(k("KVM_SET_MSRS"))?;
        if set != s.msrs.len() {
            return Err(VcpuError::Msrs(set, s.msrs.len()));
        }
        self.fd.set_lapic(&s.lapic).map_err(k("KVM_SET_LAPIC"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(k("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(k("KVM_SET_MP_STATE"))?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// What the VMM wants the vCPU threads to do.
#[derive(Debug, Default)]
struct RunState {
    pause: bool,
    stop: bool,
    paused: usize,
}

/// Shared pause/stop control for all vCPU threads.
#[derive(Debug, Default)]
pub struct RunControl {
    state: Mutex<RunState>,
    cv: Condvar,
}

impl RunControl {
    /// Asks vCPUs to pause. Callers kick the threads, then [`RunControl::wait_paused`].
    pub fn request_pause(&self) {
        lock(&self.state).pause = true;
    }

    /// Waits until `count` vCPU threads are parked, or the timeout passes.
    pub fn wait_paused(&self, count: usize, timeout: std::time::Duration) -> bool {
        let st = lock(&self.state);
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |s| s.paused < count && !s.stop)
            .unwrap_or_else(|e| e.into_inner());
        st.paused >= count
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        lock(&self.state).pause = false;
        self.cv.notify_all();
    }

    /// Tells vCPU threads to exit.
    pub fn stop(&self) {
        lock(&self.state).stop = true;
        self.cv.notify_all();
    }

    /// Returns true if the thread should exit; parks while paused. `before_park` runs
    /// (without the lock) before the thread parks.
    fn checkpoint(&self, before_park: impl FnOnce()) -> bool {
        let wants_park = {
            let st = lock(&self.state);
            st.pause && !st.stop
        };
        if wants_park {
            before_park();
        }
        let mut st = lock(&self.state);
        if st.pause && !st.stop {
            st.paused += 1;
            self.cv.notify_all();
            while st.pause && !st.stop {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.paused -= 1;
        }
        st.stop
    }
}

/// The buses and signals a vCPU thread works with.
#[derive(Debug, Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub io_bus: Bus,
    /// MMIO devices.
    pub mmio_bus: Bus,
    /// Where the VM's exit is reported.
    pub exit: Arc<ExitSignal>,
    /// Pause/stop control.
    pub control: Arc<RunControl>,
}

/// The vCPU thread body: runs until the VM stops.
pub fn run_loop(vcpu: Arc<Mutex<Vcpu>>, ctx: VcpuContext) {
    {
        let mut v = lock(&vcpu);
        let run: *mut kvm_run = v.fd.get_kvm_run();
        KVM_RUN.with(|p| p.set(run));
    }
    loop {
        let settle = || {
            // KVM finishes an I/O or MMIO instruction (e.g. stores the value of an `in`
            // into a register) only on the next KVM_RUN. Enter once with immediate_exit so
            // that the state a snapshot saves is consistent.
            let mut v = lock(&vcpu);
            v.fd.set_kvm_immediate_exit(1);
            let _ = v.fd.run();
            v.fd.set_kvm_immediate_exit(0);
        };
        if ctx.control.checkpoint(settle) || ctx.exit.is_set() {
            break;
        }
        let mut v = lock(&vcpu);
        let id = v.id;
        let code = match v.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.io_bus.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.io_bus.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio_bus.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio_bus.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                log::info!("vCPU {id} halted");
                Some(crate::EXIT_OK)
            }
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN)");
                Some(crate::EXIT_TRIPLE_FAULT)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Some(crate::EXIT_OK),
                KVM_SYSTEM_EVENT_CRASH => Some(crate::EXIT_GUEST_PANIC),
                other => {
                    log::warn!("vCPU {id}: unknown system event {other}");
                    Some(crate::EXIT_KVM_INTERNAL)
                }
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                log::error!("vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})");
                Some(crate::EXIT_KVM_INTERNAL)
            }
            Ok(VcpuExit::InternalError) => {
                let run = v.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union for this exit.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let regs = v.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                log::error!(
                    "vCPU {id}: KVM internal error, suberror {} at rip {regs:#x} (on PVM this is \
                     an instruction the emulator cannot run; see docs/vmm.md)",
                    internal.suberror
                );
                Some(crate::EXIT_KVM_INTERNAL)
            }
            Ok(other) => {
                log::debug!("vCPU {id}: ignored exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                log::error!("vCPU {id}: KVM_RUN failed: {e}");
                Some(crate::EXIT_KVM_INTERNAL)
            }
        };
        drop(v);
        if let Some(code) = code {
            ctx.exit.trigger(code);
            break;
        }
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}
