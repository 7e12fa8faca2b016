//! The `tenantd` binary: reads settings, starts, tells the service manager (when there is one),
//! waits for SIGTERM or SIGINT, shuts down; or prints its help, mints a token, or checks the
//! host before a start.

use std::process::ExitCode;

use anyhow::{bail, Result};
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tenantd::notify::Notifier;
use tenantd::watchdog::Watchdog;

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => serve(),
        Some("--help" | "-h") => {
            print!("{}", tenantd::help::help_text());
            Ok(())
        }
        Some("token") => tenantd::token::run(&args[1..]),
        Some("check") => tenantd::check::run(&args[1..]),
        Some(arg) => {
            bail!("unknown argument {arg:?}; settings come from the environment, see --help")
        }
    }
}

fn serve() -> Result<()> {
    let config = tenantd::Config::from_env()?;
    tenantd::logging::init(config.log_level, config.log_format);
    // Registered before starting, so a signal during start-up is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    // Read first: a NOTIFY_SOCKET that cannot be used is refused before anything starts.
    let notifier = Notifier::from_env()?;
    let app = tenantd::start(config)?;
    let watchdog = match notifier {
        Some(notifier) => Some(Watchdog::start(notifier, app.liveness())?),
        None => None,
    };
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    let name = if signal == SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    info!("received {name}, shutting down");
    if let Some(watchdog) = watchdog {
        watchdog.stopping();
    }
    app.shutdown()?;
    info!("shutdown complete");
    Ok(())
}
