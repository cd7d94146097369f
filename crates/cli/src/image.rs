//! `vessel run --image`: the image becomes a temporary bundle
//! (vessel_runtime::image) before the usual `run`. Progress goes to stderr:
//! one updated line per layer on a terminal, else a line per quarter.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::Runtime;
use vessel_runtime::image::{self, ImageRef, Phase, Progress, RunOptions, TempBundle};

use crate::signals::Signals;
use crate::Ctx;

/// Reads or pulls `reference` into a new bundle under the state root. A
/// signal meanwhile stops it (crate::signals) and is returned with the result,
/// which then no longer matters; the bundle is removed on every error.
pub fn prepare(
    ctx: &Ctx,
    reference: &str,
    id: &str,
    opts: &RunOptions,
    rt: &Runtime,
    signals: &mut Signals,
) -> (anyhow::Result<TempBundle>, Option<i32>) {
    let bundle = vessel_runtime::container::validate_id(id)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(TempBundle::create(ctx.root(), id)?));
    let bundle = match bundle {
        Ok(b) => b,
        Err(e) => return (Err(e), None),
    };
    let image = ImageRef::parse(reference);
    let cancel = AtomicBool::new(false);
    let mut printer = Printer::new(std::io::stderr().is_terminal());
    let (result, sig) = signals.during(
        rt,
        || cancel.store(true, Ordering::Relaxed),
        || image::prepare(&image, &bundle, opts, &cancel, &mut |p| printer.report(p)),
    );
    printer.finish();
    (result.map(|()| bundle).map_err(Into::into), sig)
}

/// Prints layer progress to stderr.
struct Printer {
    tty: bool,
    /// (phase, layer) of the line being written and the last quarter printed.
    at: Option<(Phase, usize)>,
    quarter: u64,
}

impl Printer {
    fn new(tty: bool) -> Printer {
        Printer {
            tty,
            at: None,
            quarter: 0,
        }
    }

    fn report(&mut self, p: Progress) {
        let key = (p.phase, p.layer);
        let mut err = std::io::stderr().lock();
        let line = line(&p);
        if self.tty {
            if self.at.is_some() && self.at != Some(key) {
                let _ = writeln!(err);
            }
            let _ = write!(err, "\r\x1b[K{line}");
        } else {
            let quarter = (p.done.saturating_mul(4)).checked_div(p.total).unwrap_or(4);
            if self.at != Some(key) || quarter > self.quarter {
                self.quarter = quarter;
                let _ = writeln!(err, "{line}");
            }
        }
        self.at = Some(key);
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.tty && self.at.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn line(p: &Progress) -> String {
    let what = match p.phase {
        Phase::Fetch => "fetch ",
        Phase::Unpack => "unpack",
    };
    let short = p.digest.get(..19).unwrap_or(p.digest);
    format!(
        "{what} layer {}/{} {short} {} / {}",
        p.layer,
        p.layers,
        size(p.done),
        size(p.total)
    )
}

fn size(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_layer_and_bytes() {
        let p = Progress {
            phase: Phase::Fetch,
            layer: 1,
            layers: 2,
            digest: "sha256:0123456789abcdef0123",
            done: 3 << 20,
            total: 6 << 20,
        };
        assert_eq!(
            line(&p),
            "fetch  layer 1/2 sha256:0123456789ab 3.0 MiB / 6.0 MiB"
        );
        assert_eq!(size(512), "512 B");
    }
}
