//! SIGTERM and SIGINT stop the VM and end the process with [`crate::EXIT_OK`], as they
//! stop QEMU: a sandbox's ordinary stop is a SIGTERM, and it must not look like a crash
//! (nor, for a jailed VMM that is PID 1 of its own PID namespace and so ignores a signal
//! it has no handler for, wait out the stop grace for a SIGKILL).
//!
//! The handler only writes to an eventfd that the VMM's event loop watches
//! ([`watch`]); before that loop runs (set-up, restore, the pre-boot API loop) there is
//! nothing to stop cleanly and the handler ends the process at once.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The eventfd the event loop watches, or -1 before it runs.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_signal: libc::c_int) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd < 0 {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(crate::EXIT_OK) };
    }
    let one: u64 = 1;
    // SAFETY: write is async-signal-safe; the buffer is the 8 bytes of `one`, alive for
    // the call. An error (the counter is full) needs no handling: a stop is pending.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Installs the handler for SIGTERM and SIGINT (call early in `main`).
pub fn install() -> std::io::Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is valid (empty mask, no flags); we then set a
        // handler with the C ABI that touches only an atomic and async-signal-safe calls.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is initialized; the old action is not wanted (null).
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// From now on a stop signal increments `fd` instead of ending the process. `fd` must
/// stay open for the rest of the process's life (the event loop owns it until exit).
pub fn watch(fd: &EventFd) {
    STOP_FD.store(fd.as_raw_fd(), Ordering::SeqCst);
}

/// Back to ending the process at once (the event loop is over; its eventfd goes away).
pub fn unwatch() {
    STOP_FD.store(-1, Ordering::SeqCst);
}
