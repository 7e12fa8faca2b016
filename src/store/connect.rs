//! Opening a connection to PostgreSQL within a deadline, its startup included: the postgres
//! crate's `connect_timeout` bounds only the TCP connect, and a server that takes the connection
//! but never answers (its postmaster stopped, a frozen VM or pooler, whose kernel still accepts
//! and acknowledges) would hold the caller for ever — a tenant thread dead-lettering, a worker,
//! a restarting replica.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{bounded, RecvTimeoutError};
use postgres::{Client, NoTls};

use super::DbSettings;

/// Connects under way, each on a thread of its own (one whose caller gave up keeps waiting for
/// the server's answer or for the connection's end).
static UNDER_WAY: AtomicUsize = AtomicUsize::new(0);

/// Past this many connects under way (callers retrying against a server that never answers),
/// a connect fails at once instead of adding a thread.
const MAX_UNDER_WAY: usize = 256;

/// Opens a connection: the TCP connect within the connect timeout, the whole startup within
/// twice that. The error names the server, never the password.
pub fn connect(settings: &DbSettings, name: &str) -> Result<Client> {
    let config = configure(settings, name)?;
    let server = describe(&config);
    let deadline = config.get_connect_timeout().copied().unwrap_or_default() * 2;
    if UNDER_WAY.fetch_add(1, Ordering::SeqCst) >= MAX_UNDER_WAY {
        UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
        bail!("cannot connect to PostgreSQL at {server}: {MAX_UNDER_WAY} connects to it are still waiting for its answer");
    }
    let (tx, rx) = bounded(1);
    let spawned = std::thread::Builder::new()
        .name("db-connect".into())
        .spawn(move || {
            let _ = tx.send(config.connect(NoTls));
            UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        UNDER_WAY.fetch_sub(1, Ordering::SeqCst);
        return Err(anyhow!(e).context(format!("cannot connect to PostgreSQL at {server}")));
    }
    match rx.recv_timeout(deadline) {
        Ok(connected) => {
            connected.with_context(|| format!("cannot connect to PostgreSQL at {server}"))
        }
        Err(RecvTimeoutError::Timeout) => bail!(
            "cannot connect to PostgreSQL at {server}: it took the connection but did not answer within {deadline:?}"
        ),
        Err(RecvTimeoutError::Disconnected) => {
            bail!("cannot connect to PostgreSQL at {server}: the connect failed")
        }
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

fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("postgres")
    )
}

/// For tests: a server that takes connections and never answers.
#[cfg(test)]
pub mod silent {
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// A server that takes connections and never answers; closing what it holds ends them.
    pub struct Silent {
        pub url: String,
        held: Arc<Mutex<Vec<TcpStream>>>,
    }

    impl Silent {
        pub fn start() -> Silent {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("postgres://{}/silent", listener.local_addr().unwrap());
            let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
            let holder = held.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    holder.lock().unwrap().push(stream);
                }
            });
            Silent { url, held }
        }

        /// Something that closes the connections held so far (ending their connects), from
        /// another thread.
        pub fn releaser(&self) -> impl FnOnce() + Send + 'static {
            let held = self.held.clone();
            move || held.lock().unwrap().clear()
        }
    }

    impl Drop for Silent {
        fn drop(&mut self) {
            self.held.lock().unwrap().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    use super::silent::Silent;
    use super::*;

    fn settings(url: &str) -> DbSettings {
        DbSettings {
            url: url.into(),
            connect_timeout: Duration::from_millis(300),
            statement_timeout: Duration::ZERO,
            keepalive: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_server_that_takes_the_connection_and_never_answers_fails_the_connect_in_time() {
        let silent = Silent::start();
        let settings = settings(&silent.url);
        // On a thread of the test's own: a connect that never returns fails the test, not CI.
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = connect(&settings, "test").map(|_| ());
            let _ = tx.send((result, started.elapsed()));
        });
        let (result, took) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the connect is still waiting for the silent server");
        let error = format!("{:#}", result.expect_err("nothing answered"));
        assert!(error.contains("did not answer within 600ms"), "{error}");
        assert!(took >= Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn a_server_that_refuses_fails_the_connect_with_its_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("postgres://{}/gone", listener.local_addr().unwrap());
        drop(listener);
        let error = format!("{:#}", connect(&settings(&url), "test").err().unwrap());
        assert!(
            error.starts_with("cannot connect to PostgreSQL at 127.0.0.1:"),
            "{error}"
        );
        assert!(!error.contains("did not answer"), "{error}");
    }
}
