//! Logging as runc does it: text or JSON lines, to stderr or the `--log` file.

use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// `quiet`: OCI commands log warnings and errors only (as runc), so that
/// callers parsing stderr see nothing unexpected.
pub fn init(file: Option<&Path>, format: Format, debug: bool, quiet: bool) {
    let mut b = env_logger::Builder::new();
    b.filter_level(if debug {
        log::LevelFilter::Debug
    } else if quiet {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Info
    });
    b.parse_env("VESSEL_LOG");
    if let Some(path) = file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                b.target(env_logger::Target::Pipe(Box::new(f)));
            }
            Err(e) => eprintln!(
                "vessel: cannot open log file {}: {e}; logging to stderr",
                path.display()
            ),
        }
    }
    match format {
        Format::Json => {
            b.format(|buf, record| {
                let line = serde_json::json!({
                    "level": record.level().as_str().to_lowercase(),
                    "msg": record.args().to_string(),
                    "time": vessel_runtime::container::state::now_rfc3339(),
                });
                writeln!(buf, "{line}")
            });
        }
        // logrus's text format, as runc writes it: time="..." level=... msg="...".
        Format::Text => {
            b.format(|buf, record| {
                writeln!(
                    buf,
                    "time={:?} level={} msg={:?}",
                    vessel_runtime::container::state::now_rfc3339(),
                    record.level().as_str().to_lowercase(),
                    record.args().to_string()
                )
            });
        }
    }
    let _ = b.try_init();
}
