//! What the service manager hears from a running tenantd: `READY=1` once it serves, a `STATUS=`
//! line with the tenants it runs, `WATCHDOG=1` only while it is healthy — its coordinator and
//! its heart come round, it has heartbeated lately or else runs no consumer (the database is
//! unreachable and its fence has stopped them: it waits, and a restart would only add a cold
//! start), and its HTTP front answers `/healthz` through the real listening socket — and
//! `STOPPING=1` when it is told to stop. So systemd restarts a tenantd that hangs, whichever
//! part of it hangs. One named thread, `watchdog`, joined on stop.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use crate::health::Health;
use crate::manager::TenantManager;
use crate::notify::Notifier;

/// Without a watchdog, the status line is refreshed this often (as often as the unit's
/// `WatchdogSec=30s` has it fed).
const STATUS_EVERY: Duration = Duration::from_secs(15);

/// The HTTP front must answer within this (or a quarter of the watchdog's timeout, if shorter).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a running replica is healthy, as the watchdog judges it (`App::liveness`).
pub struct Liveness {
    coordinator: Arc<Health>,
    manager: Arc<TenantManager>,
    http_addr: SocketAddr,
    /// A heartbeat older than this: the replica's fence has stopped its consumers. The
    /// coordinator's loop comes round within it too.
    heartbeat_within: Duration,
    /// The heart's loop comes round within this (a beat to a silent server ends within F/2).
    heart_within: Duration,
}

/// What a healthy replica runs.
#[derive(Debug, PartialEq, Eq)]
pub struct Running {
    pub tenants: usize,
    /// Of those, how many cannot connect to the broker.
    pub failing: usize,
    /// Why the replica waits with every consumer stopped (the database is unreachable).
    pub waiting: Option<String>,
}

impl std::fmt::Display for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let noun = if self.tenants == 1 {
            "tenant"
        } else {
            "tenants"
        };
        if let Some(why) = &self.waiting {
            return write!(f, "{why}");
        }
        write!(f, "{} {noun} running here", self.tenants)?;
        match self.failing {
            0 => Ok(()),
            n => write!(f, " ({n} cannot connect to the broker)"),
        }
    }
}

impl Liveness {
    pub(crate) fn new(
        coordinator: Arc<Health>,
        manager: Arc<TenantManager>,
        http_addr: SocketAddr,
        heartbeat_within: Duration,
        heart_within: Duration,
    ) -> Liveness {
        Liveness {
            coordinator,
            manager,
            http_addr,
            heartbeat_within,
            heart_within,
        }
    }

    /// What runs here while the replica is healthy; `Err` says why it is not. Waits at most
    /// `timeout` for the HTTP front.
    pub fn check(&self, timeout: Duration) -> Result<Running, String> {
        let (coordinator, heart) = self.coordinator.turned();
        let seen = Seen {
            heartbeat: self.coordinator.heartbeat_age(),
            coordinator,
            heart,
            consumers_run: self.manager.any_running(),
        };
        let waiting = judge(&seen, self.heartbeat_within, self.heart_within).map_err(|why| {
            match self.coordinator.check() {
                Err(e) if seen.heartbeat > self.heartbeat_within => format!("{why}: {e}"),
                _ => why,
            }
        })?;
        probe_http(self.http_addr, timeout)
            .map_err(|e| format!("HTTP does not answer /healthz: {e:#}"))?;
        let (tenants, failing) = self.manager.running_and_failing();
        Ok(Running {
            tenants,
            failing,
            waiting,
        })
    }
}

/// Stuck (`Err`), waiting for the database with every consumer stopped (`Ok(Some)`), or
/// doing its share (`Ok(None)`).
fn judge(seen: &Seen, within: Duration, heart_within: Duration) -> Result<Option<String>, String> {
    let secs = |d: Duration| d.as_secs_f64();
    if seen.coordinator > within {
        return Err(format!(
            "the coordinator is stuck (its loop has not come round for {:.1} s)",
            secs(seen.coordinator)
        ));
    }
    if seen.heart > heart_within {
        return Err(format!(
            "the heart is stuck (no heartbeat tried for {:.1} s)",
            secs(seen.heart)
        ));
    }
    if seen.heartbeat <= within {
        return Ok(None);
    }
    let silent = format!("no heartbeat for {:.1} s", secs(seen.heartbeat));
    match seen.consumers_run {
        true => Err(silent),
        false => Ok(Some(format!(
            "waiting for PostgreSQL: {silent}; every consumer stopped until it answers"
        ))),
    }
}

/// What the watchdog reads of the replica's threads.
struct Seen {
    /// Since the last heartbeat that succeeded.
    heartbeat: Duration,
    /// Since the coordinator's loop came round.
    coordinator: Duration,
    /// Since the heart's loop came round.
    heart: Duration,
    /// Whether a consumer runs here that the fence has not stopped.
    consumers_run: bool,
}

/// `GET /healthz` through the listening socket, as a client would send it; 200 within
/// `timeout` or an error. The guard, tiny_http and a request thread must all answer.
pub fn probe_http(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .context("timed out")
    };
    let mut stream = TcpStream::connect_timeout(&reachable(addr), timeout)?;
    stream.set_write_timeout(Some(left()?))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = Vec::new();
    let mut buf = [0; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut buf)? {
            0 => bail!("connection closed without an answer"),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let status = String::from_utf8_lossy(&head);
    let status = status.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => bail!("answered {status:?}"),
    }
}

/// The listening address as a local client reaches it: `0.0.0.0` and `::` through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The thread that keeps the service manager informed; dropped or `stopping`, it is joined.
pub struct Watchdog {
    notifier: Arc<Notifier>,
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Tells the service manager tenantd is ready, then reports every half of its watchdog
    /// timeout (or every `STATUS_EVERY` without one), feeding the watchdog while `liveness` holds.
    pub fn start(notifier: Notifier, liveness: Liveness) -> Result<Watchdog> {
        let every = notifier.watchdog().map_or(STATUS_EVERY, |w| w / 2);
        let timeout = PROBE_TIMEOUT.min(every / 2);
        let notifier = Arc::new(notifier);
        let (stop_tx, stop) = bounded(0);
        let ready = "READY=1\nSTATUS=ready: taking this replica's share of the tenants";
        send(&notifier, ready);
        let thread_notifier = notifier.clone();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || report(&thread_notifier, &liveness, every, timeout, &stop))
            .context("spawning the watchdog thread")?;
        Ok(Watchdog {
            notifier,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Tells the service manager tenantd is stopping, and joins the thread: from now on the
    /// shutdown's own deadline (`SHUTDOWN_TIMEOUT`) bounds what follows.
    pub fn stopping(mut self) {
        send(
            &self.notifier,
            "STOPPING=1\nSTATUS=stopping: handing the tenants over",
        );
        self.join();
    }

    fn join(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.join();
    }
}

fn report(
    notifier: &Notifier,
    liveness: &Liveness,
    every: Duration,
    timeout: Duration,
    stop: &Receiver<()>,
) {
    let feeds = notifier.watchdog().is_some();
    let mut healthy = true;
    let mut next = Instant::now() + every;
    loop {
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // On time, whatever the check took; after a long check, a whole interval from now.
        next = (next + every).max(Instant::now() + every / 2);
        let state = match liveness.check(timeout) {
            Ok(running) => {
                if !healthy {
                    info!("healthy again: {running}");
                }
                healthy = true;
                let feed = if feeds { "WATCHDOG=1\n" } else { "" };
                format!("{feed}STATUS={running}")
            }
            Err(why) => {
                if healthy {
                    warn!("unhealthy, so the service manager's watchdog is not fed: {why}");
                }
                healthy = false;
                format!("STATUS=unhealthy: {why}")
            }
        };
        send(notifier, &state);
    }
}

fn send(notifier: &Notifier, state: &str) {
    if let Err(e) = notifier.send(state) {
        warn!("{e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_status_says_what_runs_here() {
        let running = |tenants, failing| {
            Running {
                tenants,
                failing,
                waiting: None,
            }
            .to_string()
        };
        assert_eq!(running(1, 0), "1 tenant running here");
        assert_eq!(
            running(3, 1),
            "3 tenants running here (1 cannot connect to the broker)"
        );
    }

    #[test]
    fn a_replica_waiting_for_the_database_with_its_consumers_stopped_is_not_stuck() {
        let (within, heart_within) = (Duration::from_secs(5), Duration::from_secs(15));
        let s = Duration::from_secs;
        let seen = |heartbeat, coordinator, heart, consumers_run| Seen {
            heartbeat: s(heartbeat),
            coordinator: s(coordinator),
            heart: s(heart),
            consumers_run,
        };
        assert_eq!(judge(&seen(1, 1, 1, true), within, heart_within), Ok(None));
        let waiting = judge(&seen(300, 1, 1, false), within, heart_within);
        assert!(
            waiting.as_ref().is_ok_and(|w| w
                .as_deref()
                .is_some_and(|w| w.starts_with("waiting for PostgreSQL"))),
            "{waiting:?}"
        );
        // Consumers the fence has not stopped yet, a wedged coordinator or heart: unhealthy.
        assert!(judge(&seen(6, 1, 1, true), within, heart_within).is_err());
        assert!(judge(&seen(1, 6, 1, false), within, heart_within).is_err());
        assert!(judge(&seen(300, 1, 16, false), within, heart_within).is_err());
    }

    #[test]
    fn a_front_that_accepts_but_never_answers_fails_the_probe_within_its_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let err = probe_http(addr, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{err:#}");
        drop(listener);
        let err = probe_http(addr, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err:#}").contains("refused"), "{err:#}");
    }

    #[test]
    fn only_a_200_passes_the_probe() {
        let listener = TcpListener::bind("0.0.0.0:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = |status: &'static str| {
            let listener = listener.try_clone().unwrap();
            std::thread::spawn(move || {
                let (mut client, _) = listener.accept().unwrap();
                let mut request = [0; 512];
                let _ = client.read(&mut request).unwrap();
                client.write_all(status.as_bytes()).unwrap();
            })
        };
        let server = answer("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        probe_http(addr, Duration::from_secs(2)).expect("200 passes, through loopback");
        server.join().unwrap();
        let server = answer("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = probe_http(addr, Duration::from_secs(2)).unwrap_err();
        assert!(format!("{err:#}").contains("503"), "{err:#}");
        server.join().unwrap();
    }
}
