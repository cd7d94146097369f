//! 8250 UART (vm-superio) on COM1, its output going to a log file or stdout. Guest input is
//! not wired: the console is for logs; the agent talks over vsock.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, ExitSignal};

/// COM1 port base.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1 port range length.
pub const COM1_LEN: u64 = 8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;

/// What the Linux kernel prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The serial output sink: forwards bytes and watches for a kernel panic message.
pub struct SerialOut {
    out: Box<dyn Write + Send>,
    exit: Arc<ExitSignal>,
    matched: usize,
}

impl std::fmt::Debug for SerialOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialOut").finish_non_exhaustive()
    }
}

impl SerialOut {
    /// Sends output to `out`; a panic message marks `exit` as a guest panic.
    pub fn new(out: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        SerialOut {
            out,
            exit,
            matched: 0,
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for b in buf {
            if *b == PANIC_MARKER[self.matched] {
                self.matched += 1;
                if self.matched == PANIC_MARKER.len() {
                    self.exit.note_guest_panic();
                    self.matched = 0;
                }
            } else {
                self.matched = usize::from(*b == PANIC_MARKER[0]);
            }
        }
        // Console output is best effort: a full disk must not stop the guest.
        let _ = self.out.write_all(buf);
        let _ = self.out.flush();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// COM1 as a bus device.
#[derive(Debug)]
pub struct SerialDevice {
    serial: Serial<IrqFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`, optionally from saved state.
    pub fn new(irq: EventFd, out: SerialOut, state: Option<&SerialState>) -> std::io::Result<Self> {
        let serial = match state {
            Some(s) => Serial::from_state(s, IrqFdTrigger(irq), NoEvents, out)
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
            None => Serial::new(IrqFdTrigger(irq), out),
        };
        Ok(SerialDevice { serial })
    }

    /// Register state for a snapshot.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// Serializable mirror of [`SerialState`] (vm-superio's type has no serde support).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        let r = s.regs;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_sink_and_panic_is_noticed() {
        let exit = ExitSignal::new().unwrap();
        let buf = Buf::default();
        let out = SerialOut::new(Box::new(buf.clone()), exit.clone());
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), out, None).unwrap();
        for b in b"KKernel panic - not syncing: x\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&buf.0.lock().unwrap()[..2], b"KK");
        exit.trigger(crate::EXIT_OK);
        assert_eq!(exit.code(), crate::EXIT_GUEST_PANIC);
    }

    #[test]
    fn state_round_trips() {
        let exit = ExitSignal::new().unwrap();
        let out = SerialOut::new(Box::new(std::io::sink()), exit);
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), out, None).unwrap();
        dev.write(7, &[0x5a]); // scratch register
        let snap = SerialSnapshot::from(&dev.state());
        let state = SerialState::from(&snap);
        assert_eq!(state.scratch, 0x5a);
    }
}
