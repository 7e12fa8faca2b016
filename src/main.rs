//! The `tenantd` binary: reads settings, starts, waits for SIGTERM or SIGINT, shuts down.

use std::process::ExitCode;

use anyhow::{bail, Result};
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenantd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    if let Some(arg) = std::env::args().nth(1) {
        if arg == "--help" || arg == "-h" {
            print!("{}", tenantd::config::help_text());
            return Ok(());
        }
        bail!("unknown argument {arg:?}; settings come from the environment, see --help");
    }
    let config = tenantd::Config::from_env()?;
    tenantd::logging::init(config.log_level, config.log_format);
    // Registered before starting, so a signal during start-up is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let app = tenantd::start(config)?;
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    let name = if signal == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    info!("received {name}, shutting down");
    app.shutdown()?;
    info!("shutdown complete");
    Ok(())
}
