//! `vessel-jailer`: see the library documentation and `vessel-jailer --help`.
//! Single-threaded on purpose: it forks, and the child allocates before it execs.

use anyhow::Context;
use clap::Parser;
use vessel_jailer::{Cli, JailSpec};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; usage errors exit 1 like every bad input.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(1);
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vessel-jailer: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let id = cli.id.clone();
    let spec = JailSpec::from_cli(cli).context("invalid arguments")?;
    vessel_jailer::run(&spec).with_context(|| format!("jail {id:?}"))
}
