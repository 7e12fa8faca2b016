//! Opening a connection to PostgreSQL within a deadline, its startup included: the postgres
//! crate's `connect_timeout` bounds only the TCP connect, and a server that takes the connection
//! but never answers (its postmaster stopped, a frozen VM or pooler, whose kernel still accepts
//! and acknowledges) would hold the caller for ever — a tenant thread dead-lettering, a worker,
//! a restarting replica.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{bounded, RecvTimeoutError};
use postgres::{Client, NoTls};

use super::DbSettings;

/// Connects under way, each on a thread of its own (one whose caller gave up keeps waiting for
/// the server's answer or for the connection's end).
static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);

/// Past this many connects under way (callers retrying against a server that never answers),
/// a connect fails at once instead of adding a thread.
const MAX_UNDER_WAY: usize = 256;

/// A connect given up on: the database could not be reached, as when it refuses (the API
/// answers 503).
#[derive(Debug)]
pub struct GaveUp(String);

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GaveUp {}

/// One connect under way, counted while its thread (or the closure that was to run on it)
/// lives, whether it returns, panics or never starts.
struct UnderWay;

impl UnderWay {
    fn enter() -> Option<UnderWay> {
        if UNDER_WAY.fetch_add(1, Ordering::SeqCst) < MAX_UNDER_WAY {
            return Some(UnderWay);
        }
        UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
        None
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Opens a connection: each address's TCP connect within the connect timeout, the whole of it
/// (every address the URL names, and the startup) within one timeout more than that. The error
/// names the server, never the password.
pub fn connect(settings: &DbSettings, name: &str) -> Result<Client> {
    let config = configure(settings, name)?;
    let server = describe(&config);
    let deadline =
        config.get_connect_timeout().copied().unwrap_or_default() * (addresses(&config) + 1);
    let gave_up = |why: String| {
        anyhow!(GaveUp(format!(
            "cannot connect to PostgreSQL at {server}: {why}"
        )))
    };
    let Some(under_way) = UnderWay::enter() else {
        return Err(gave_up(format!(
            "{MAX_UNDER_WAY} connects are still waiting for an answer"
        )));
    };
    let (tx, rx) = bounded(1);
    let spawned = std::thread::Builder::new()
        .name("db-connect".into())
        .spawn(move || {
            let _under_way = under_way;
            let _ = tx.send(config.connect(NoTls));
        });
    if let Err(e) = spawned {
        return Err(gave_up(format!("no thread for the connect: {e}")));
    }
    match rx.recv_timeout(deadline) {
        Ok(connected) => {
            connected.with_context(|| format!("cannot connect to PostgreSQL at {server}"))
        }
        Err(RecvTimeoutError::Timeout) => Err(gave_up(format!("no answer within {deadline:?}"))),
        Err(RecvTimeoutError::Disconnected) => Err(gave_up("the connect failed".into())),
    }
}

fn configure(settings: &DbSettings, name: &str) -> Result<postgres::Config> {
    let mut config =
        postgres::Config::from_str(&settings.url).context("DATABASE_URL is not a valid URL")?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(settings.connect_timeout);
    }
    // TCP counts keepalive times in whole seconds, and refuses zero.
    let second = Duration::from_secs(1);
    let keepalive = settings.keepalive.max(second * 2);
    config
        .application_name(name)
        .keepalives(true)
        .keepalives_idle((keepalive / 2).max(second))
        .keepalives_interval((keepalive / 6).max(second))
        .keepalives_retries(3)
        .tcp_user_timeout(keepalive);
    if !settings.statement_timeout.is_zero() {
        let ms = settings.statement_timeout.as_millis();
        config.options(&format!("-c statement_timeout={ms}"));
    }
    Ok(config)
}

/// The addresses the postgres crate tries in turn, each within the connect timeout: one per
/// host or `hostaddr` the URL names (a name that resolves to several addresses gets one more
/// at most, the extra timeout the deadline allows).
fn addresses(config: &postgres::Config) -> u32 {
    let named = config.get_hosts().len().max(config.get_hostaddrs().len());
    u32::try_from(named.max(1)).unwrap_or(u32::MAX)
}

/// `host:port[,host:port…]/dbname`, as the URL names them (its `hostaddr`s when it names no
/// host).
fn describe(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let bracketed = |h: String| match h.contains(':') {
        true => format!("[{h}]"),
        false => h,
    };
    let hosts: Vec<String> = match (config.get_hosts(), config.get_hostaddrs()) {
        ([], []) => vec![format!("localhost:{}", port(0))],
        ([], addrs) => addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}:{}", bracketed(a.to_string()), port(i)))
            .collect(),
        (hosts, _) => hosts
            .iter()
            .enumerate()
            .map(|(i, host)| match host {
                postgres::config::Host::Tcp(h) => format!("{}:{}", bracketed(h.clone()), port(i)),
                postgres::config::Host::Unix(p) => format!("{}:{}", p.display(), port(i)),
            })
            .collect(),
    };
    format!(
        "{}/{}",
        hosts.join(","),
        config.get_dbname().unwrap_or("postgres")
    )
}

#[cfg(test)]
pub mod silent;
#[cfg(test)]
mod tests;
