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
/// (every host the URL names, and the startup) within one timeout more than that. The error
/// names the server, never the password.
pub fn connect(settings: &DbSettings, name: &str) -> Result<Client> {
    let config = configure(settings, name)?;
    let server = describe(&config);
    let hosts = config.get_hosts().len().max(1) as u32;
    let deadline = config.get_connect_timeout().copied().unwrap_or_default() * (hosts + 1);
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
        return Err(anyhow!(e).context(format!("cannot connect to PostgreSQL at {server}")));
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

/// `host:port[,host:port…]/dbname`, as the URL names them.
fn describe(config: &postgres::Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = match config.get_hosts() {
        [] => vec![format!("localhost:{}", port(0))],
        hosts => hosts
            .iter()
            .enumerate()
            .map(|(i, host)| match host {
                postgres::config::Host::Tcp(h) => format!("{h}:{}", port(i)),
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
        assert!(error.contains("no answer within 600ms"), "{error}");
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
        assert!(!error.contains("no answer"), "{error}");
    }

    /// A connect that gave up on a silent server means the server cannot be reached, as a
    /// refused one does: the API answers 503, not 500 with a "bug" logged.
    #[test]
    fn a_connect_that_gives_up_means_the_database_is_unreachable() {
        use crate::store::Failure;
        let silent = Silent::start();
        let error = connect(&settings(&silent.url), "test").err().unwrap();
        assert_eq!(Failure::of(&error), Failure::Unreachable, "{error:#}");
    }

    const PANICS_CHILD: &str = "TENANTD_TEST_CONNECT_PANICS_CHILD";

    /// A connect whose thread panics (the postgres crate unwraps its runtime's build, which
    /// fails once the process is out of file descriptors) is no longer under way: after
    /// MAX_UNDER_WAY of them, and the descriptors back, a connect must still be tried.
    /// Runs in a child process (its own counter, `ulimit -n 64`).
    #[test]
    fn a_connect_that_panics_is_no_longer_under_way() {
        if std::env::var_os(PANICS_CHILD).is_some() {
            return panicking_connects();
        }
        let name = "store::connect::tests::a_connect_that_panics_is_no_longer_under_way";
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"ulimit -n 64 && exec "$0" --exact "$1" --nocapture --test-threads=1"#)
            .arg(std::env::current_exe().unwrap())
            .arg(name)
            .env(PANICS_CHILD, "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let id = child.id();
        let (tx, rx) = bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let Ok(output) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(id.to_string())
                .status();
            panic!("the child test is still running after 60 s");
        };
        let output = output.unwrap();
        assert!(
            output.status.success(),
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn panicking_connects() {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some("db-connect") {
                hook(info);
            }
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("postgres://{}/gone", listener.local_addr().unwrap());
        drop(listener);
        let settings = settings(&url);
        let mut files = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            files.push(f);
        }
        let first = format!("{:#}", connect(&settings, "test").err().unwrap());
        let after_one = UNDER_WAY.load(Ordering::SeqCst);
        for _ in 0..MAX_UNDER_WAY {
            let _ = connect(&settings, "test");
        }
        drop(files);
        let error = format!("{:#}", connect(&settings, "test").err().unwrap());
        assert!(
            !error.contains("still waiting for an answer"),
            "out of descriptors: {first}; under way after one panicked connect: {after_one}; \
             with the descriptors back: {error}"
        );
    }

    /// A server that answers only after the caller gave up: the connection it then opens is
    /// closed (the server sees the session end), not kept by the abandoned thread.
    /// Needs PostgreSQL at 127.0.0.1:5432 (trust).
    #[test]
    fn a_connect_answered_after_its_caller_gave_up_is_closed() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "postgres://postgres@{}/postgres",
            listener.local_addr().unwrap()
        );
        let (release, released) = bounded::<()>(1);
        let (ended_tx, ended) = bounded::<()>(1);
        std::thread::spawn(move || {
            let (client, _) = listener.accept().unwrap();
            if released.recv_timeout(Duration::from_secs(30)).is_err() {
                return;
            }
            let upstream = TcpStream::connect("127.0.0.1:5432").unwrap();
            let (mut c_in, mut u_out) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut u_out);
                let _ = u_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut u_in, mut c_out) = (upstream, client);
            let mut buf = [0u8; 8192];
            loop {
                match u_in.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = ended_tx.send(());
        });
        let error = format!("{:#}", connect(&settings(&url), "test late").err().unwrap());
        assert!(error.contains("no answer"), "{error}");
        release.send(()).unwrap();
        ended
            .recv_timeout(Duration::from_secs(10))
            .expect("the server still holds the session the abandoned connect opened");
    }

    /// A URL naming several hosts (libpq's failover list): the postgres crate gives each
    /// address its own connect timeout, so two hosts that drop SYNs take 2 x 300 ms before the
    /// third, a working PostgreSQL, is tried. The whole-connect deadline (600 ms) must not cut
    /// that off. Needs PostgreSQL at 127.0.0.1:5432 (trust).
    #[test]
    fn a_url_of_three_hosts_reaches_the_third() {
        use socket2::{Domain, Socket, Type};
        // A listener whose accept queue is full: further SYNs are dropped, connects time out.
        let blackhole = || {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            socket
                .bind(
                    &"127.0.0.1:0"
                        .parse::<std::net::SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
            socket.listen(0).unwrap();
            let addr = socket.local_addr().unwrap().as_socket().unwrap();
            let filler = std::net::TcpStream::connect(addr).unwrap();
            (socket, filler, addr.port())
        };
        let (_a, _fa, pa) = blackhole();
        let (_b, _fb, pb) = blackhole();
        let url =
            format!("postgres://postgres@127.0.0.1:{pa},127.0.0.1:{pb},127.0.0.1:5432/postgres");
        let started = Instant::now();
        let result = connect(&settings(&url), "test hosts");
        let took = started.elapsed();
        assert!(
            result.is_ok(),
            "after {took:?}: {:#}",
            result.err().unwrap()
        );
    }
}
