//! The piece of the i8042 keyboard controller a microVM needs: the CPU reset command, which
//! is how a Linux guest (`reboot=k`) and our test guest end the VM.

use std::sync::Arc;

use super::{BusDevice, ExitSignal};

/// Port base of the i8042 (data at 0x60, command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Size of the claimed port range.
pub const I8042_LEN: u64 = 5;
const CMD_RESET_CPU: u8 = 0xfe;

/// i8042 controller that turns a reset command into a VM exit with status 0.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// A controller that signals `exit` on reset.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no data, input buffer empty; data port reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("guest reset through the i8042");
            self.exit.trigger(crate::EXIT_OK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_exits_zero() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(!exit.is_set());
        dev.write(4, &[CMD_RESET_CPU]);
        assert!(exit.is_set());
        assert_eq!(exit.code(), 0);
    }
}
