//! What the guest kernel's own lines look like when it oopses or panics: one list for
//! the agent (which reads /dev/kmsg) and the host (which reads the guest console log
//! of a VM that died).

/// Beginnings of kernel lines that report an oops, a BUG or a panic.
const CRASH_MARKERS: [&str; 6] = [
    "Oops:",
    "BUG:",
    "kernel BUG at",
    "Kernel panic",
    "general protection fault",
    "Unable to handle kernel",
];

/// Whether a kernel message (without its printk time stamp) reports an oops, a BUG
/// or a panic.
pub fn is_crash(message: &str) -> bool {
    CRASH_MARKERS.iter().any(|m| message.starts_with(m))
}

/// The guest kernel's panic when init exits: in a Vessel guest, init is the agent.
const INIT_EXIT: &str = "Kernel panic - not syncing: Attempted to kill init!";

/// Whether a kernel message (without its printk time stamp) is the panic that ends the
/// guest when its init (the agent, PID 1) exits.
pub fn is_init_exit(message: &str) -> bool {
    message.starts_with(INIT_EXIT)
}

/// A console line without its printk time stamp (`[    1.234567] `), if it has one.
pub fn console_message(line: &str) -> &str {
    let t = line.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some((stamp, msg)) = rest.split_once(']') {
            if stamp.trim().chars().all(|c| c.is_ascii_digit() || c == '.') {
                return msg.trim_start();
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_are_recognised_and_warnings_are_not() {
        for m in [
            "Oops: 0002 [#1] PREEMPT SMP",
            "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "kernel BUG at mm/slub.c:42!",
            "Kernel panic - not syncing: Fatal exception",
            "general protection fault, probably for non-canonical address",
        ] {
            assert!(is_crash(m), "{m}");
        }
        for m in [
            "WARNING: CPU: 0 PID: 1",
            "random: crng init done",
            " Oops: indented",
        ] {
            assert!(!is_crash(m), "{m}");
        }
    }

    #[test]
    fn the_panic_of_an_exiting_init_is_recognised_and_near_misses_are_not() {
        for l in [
            "[    7.123456] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009",
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
        ] {
            let m = console_message(l);
            assert!(is_init_exit(m), "{m}");
            assert!(is_crash(m), "{m}");
        }
        for m in [
            "Kernel panic - not syncing: Fatal exception",
            "Kernel panic - not syncing: Attempted to kill the idle task!",
            "---[ end Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009 ]---",
            "Attempted to kill init! exitcode=0x00000009",
        ] {
            assert!(!is_init_exit(console_message(m)), "{m}");
        }
    }

    #[test]
    fn console_lines_lose_their_time_stamp_only() {
        assert_eq!(
            console_message("[   12.345678] Kernel panic - not syncing: sysrq triggered crash"),
            "Kernel panic - not syncing: sysrq triggered crash"
        );
        assert_eq!(console_message("Kernel panic - x"), "Kernel panic - x");
        assert_eq!(console_message("[abc] Oops: x"), "[abc] Oops: x");
    }
}
