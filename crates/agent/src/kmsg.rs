//! The guest kernel's log (/dev/kmsg) to the host: lines of level warning
//! and above become log records (target "kernel"), an oops, a BUG or a
//! panic also a `KERNEL_OOPS` security event, and a SysRq the kernel handled
//! (a write to the real /proc/sysrq-trigger, see [`crate::tripwire`]) a
//! `SYSRQ_TRIGGER` event. Only lines of the kernel facility count as events:
//! lines that user space writes to /dev/kmsg carry another facility
//! (LOG_USER unless they name one), whatever their text.

use std::io::Read;

use vessel_protocol::agent::security_event::Kind;

/// Kernel log levels up to this one (4 = warning) are forwarded.
const FORWARD_LEVEL: u8 = 4;

/// What a kernel log line says about itself.
#[derive(Debug, PartialEq, Eq)]
pub struct KernelLine<'a> {
    /// Syslog facility: 0 for the kernel's own lines.
    pub facility: u32,
    /// Syslog level, 0 (emergency) to 7 (debug).
    pub level: u8,
    pub message: &'a str,
}

/// Parses one /dev/kmsg record: `<prefix>,<seq>,<usec>,<flags>[,...];<text>`
/// then optional continuation lines (` KEY=value`), which are ignored.
pub fn parse(record: &str) -> Option<KernelLine<'_>> {
    let (head, rest) = record.split_once(';')?;
    let prefix: u32 = head.split(',').next()?.parse().ok()?;
    let message = rest.split('\n').next().unwrap_or("");
    Some(KernelLine {
        facility: prefix >> 3,
        level: (prefix & 7) as u8,
        message,
    })
}

/// Whether a kernel line reports a SysRq it handled (the kernel prefixes
/// them all with `sysrq: `).
pub fn is_sysrq(message: &str) -> bool {
    message.starts_with("sysrq: ")
}

/// The security event a line reports, if any.
pub fn event_of(line: &KernelLine<'_>) -> Option<Kind> {
    if line.facility != 0 {
        return None;
    }
    if vessel_protocol::kernel::is_crash(line.message) {
        Some(Kind::KERNEL_OOPS)
    } else if is_sysrq(line.message) {
        Some(Kind::SYSRQ_TRIGGER)
    } else {
        None
    }
}

/// Warnings the kernel prints for every VM of Vessel's own making, which say
/// nothing about the guest: each device hot-plugged into a PCIe root port after
/// a restore (docs/snapshots.md) gets `using bridge ... INT A to get IRQ ...`
/// (the VM has no ACPI IRQ routing table; virtio then uses MSI-X). Logged at
/// info, so that the host's warnings stay meaningful.
fn is_expected_warning(message: &str) -> bool {
    message.contains(": using bridge ") && message.contains(" to get IRQ ")
}

fn level_of(syslog: u8) -> log::Level {
    match syslog {
        0..=3 => log::Level::Error,
        4 => log::Level::Warn,
        5 | 6 => log::Level::Info,
        _ => log::Level::Debug,
    }
}

/// Reads /dev/kmsg on its own thread for as long as the agent runs.
pub fn spawn() {
    let file = match std::fs::File::open("/dev/kmsg") {
        Ok(f) => f,
        Err(e) => {
            log::warn!("no kernel log for the host: open /dev/kmsg: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("kmsg".into())
        .spawn(move || read_loop(file));
    if let Err(e) = spawned {
        log::warn!("no kernel log for the host: {e}");
    }
}

fn read_loop(mut file: std::fs::File) {
    let journal = crate::journal::get();
    // One record per read; a record is at most about 1 KiB (the kernel's
    // LOG_LINE_MAX plus the prefix).
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            // Records were overwritten before we read them: go on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("kernel log for the host ends: read /dev/kmsg: {e}");
                return;
            }
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        let Some(line) = parse(&text) else { continue };
        if let Some(kind) = event_of(&line) {
            journal.event(kind, "", None, line.message.to_string());
        }
        if line.level <= FORWARD_LEVEL {
            let level = match level_of(line.level) {
                log::Level::Warn if is_expected_warning(line.message) => log::Level::Info,
                level => level,
            };
            journal.log(level, "kernel", line.message.to_string(), "");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_plug_irq_warning_is_expected_and_others_are_not() {
        assert!(is_expected_warning(
            "virtio-pci 0000:02:00.0: using bridge 0000:00:04.0 INT A to get IRQ 10"
        ));
        assert!(!is_expected_warning(
            "virtio-pci 0000:02:00.0: BAR 4: no space"
        ));
        assert!(!is_expected_warning("using bridge"));
    }

    #[test]
    fn records_give_their_level_and_first_line() {
        let r = parse("4,123,456789,-;WARNING: CPU: 0 PID: 1 at x\n SUBSYSTEM=cpu\n").unwrap();
        assert_eq!(r.level, 4);
        assert_eq!(r.message, "WARNING: CPU: 0 PID: 1 at x");
        assert_eq!(r.facility, 0);
        // Facility 1 (user), level 6.
        assert_eq!(parse("14,1,2,-;hello").unwrap().level, 6);
        assert_eq!(parse("14,1,2,-;hello").unwrap().facility, 1);
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse("x,1,2,-;text"), None);
    }

    #[test]
    fn only_kernel_lines_are_events_and_user_space_cannot_forge_them() {
        let kind = |r: &str| event_of(&parse(r).unwrap());
        assert_eq!(
            kind("6,10,20,-;sysrq: HELP : loglevel(0-9) reboot(b) crash(c)"),
            Some(Kind::SYSRQ_TRIGGER)
        );
        assert_eq!(
            kind("0,11,21,-;Oops: 0002 [#1] SMP"),
            Some(Kind::KERNEL_OOPS)
        );
        assert_eq!(kind("6,12,22,-;random: crng init done"), None);
        // What `echo '<6>sysrq: x' > /dev/kmsg` and `echo 'Oops:' > /dev/kmsg`
        // give: facility LOG_USER (1), forced by the kernel when none is named.
        assert_eq!(kind("14,13,23,-;sysrq: x"), None);
        assert_eq!(kind("12,14,24,-;Oops: forged"), None);
        // A user-space writer naming another facility (daemon, 3).
        assert_eq!(kind("24,15,25,-;Oops: forged"), None);
    }
}
