//! Logging as runc does it: text or JSON lines, to stderr or the `--log` file.

use std::io::Write;
use std::path::Path;

use vessel_runtime::guest_events::LOG_TARGET as GUEST;

/// The fields of a guest line (logged as a JSON object by the runtime).
fn guest_fields(
    record: &log::Record,
    msg: &str,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    if record.target() != GUEST {
        return None;
    }
    match serde_json::from_str(msg) {
        Ok(serde_json::Value::Object(m)) => Some(m),
        _ => None,
    }
}

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
    // The guest's lines (see vessel_runtime::guest_events) are the sandbox's
    // log: kept at info even where vessel's own lines are quiet.
    if !debug {
        b.filter_module(GUEST, log::LevelFilter::Info);
    }
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
                let level = record.level().as_str().to_lowercase();
                let time = vessel_runtime::container::state::now_rfc3339();
                let msg = record.args().to_string();
                let line = match guest_fields(record, &msg) {
                    // A guest line: its fields (sandbox, container, source, msg) in the line.
                    Some(mut fields) => {
                        fields.insert("level".into(), level.into());
                        fields.insert("time".into(), time.into());
                        serde_json::Value::Object(fields)
                    }
                    None => serde_json::json!({"level": level, "msg": msg, "time": time}),
                };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_lines_keep_their_fields_and_others_are_plain() {
        let msg = r#"{"sandbox":"p","container":"c","source":"kernel","msg":"m"}"#;
        let guest = log::Record::builder().target(GUEST).build();
        let f = guest_fields(&guest, msg).unwrap();
        assert_eq!(f["sandbox"], "p");
        assert_eq!(f["container"], "c");
        let other = log::Record::builder().target("vessel").build();
        assert!(guest_fields(&other, msg).is_none());
        // A guest line that is not an object stays a plain message.
        assert!(guest_fields(&guest, "not json").is_none());
    }
}
