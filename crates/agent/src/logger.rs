//! Minimal logger: PID 1's stderr is the guest console, which the host captures
//! into the sandbox's console log. Level from `vessel.log=<level>` via RUST_LOG
//! semantics is not needed here: the agent logs info and above unless
//! `vessel.debug` is on the kernel command line.
//!
//! Every line also goes to the [`crate::journal`], from which the host fetches
//! it over the agent channel (`GetEvents`) into the sandbox's log.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct ConsoleLogger;

impl Log for ConsoleLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // One write per line so concurrent lines do not interleave.
        let line = format!("vessel-agent[{level}] {}\n", record.args());
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        let message = record.args().to_string();
        let container = container_of(&message).to_string();
        crate::journal::get().log(record.level(), record.target(), message, &container);
    }

    fn flush(&self) {}
}

/// The container a line is about: the agent's lines about one start with
/// `container <id>:`.
fn container_of(message: &str) -> &str {
    message
        .strip_prefix("container ")
        .and_then(|rest| rest.split_once(':'))
        .map(|(id, _)| id)
        .filter(|id| vessel_protocol::id::valid_id(id))
        .unwrap_or("")
}

static LOGGER: ConsoleLogger = ConsoleLogger;

/// Installs the logger (once) and sets its level; called again by PID 1 once /proc is
/// mounted.
pub fn init() {
    let debug = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "vessel.debug"))
        .unwrap_or(false)
        || std::env::var_os("VESSEL_AGENT_DEBUG").is_some();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_about_a_container_name_it() {
        assert_eq!(super::container_of("container c1: OOM kill"), "c1");
        assert_eq!(super::container_of("container ../x: y"), "");
        assert_eq!(super::container_of("agent API ready"), "");
    }
}
