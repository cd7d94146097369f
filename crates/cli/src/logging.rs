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
                    "time": humantime_now(),
                });
                writeln!(buf, "{line}")
            });
        }
        Format::Text => {
            b.format(|buf, record| writeln!(buf, "vessel[{}] {}", record.level(), record.args()));
        }
    }
    let _ = b.try_init();
}

/// RFC 3339 UTC time with nanoseconds, without a date-time dependency.
fn humantime_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_nanos()
    )
}
