//! Minimal logger: PID 1's stderr is the guest console, which the host captures
//! into the sandbox's console log. Level from `vessel.log=<level>` via RUST_LOG
//! semantics is not needed here: the agent logs info and above unless
//! `vessel.debug` is on the kernel command line.

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
    }

    fn flush(&self) {}
}

static LOGGER: ConsoleLogger = ConsoleLogger;

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
