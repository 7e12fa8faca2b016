//! The guard in front of tiny_http, which has no limits of its own: it owns the public socket,
//! admits at most `HTTP_MAX_CONNECTIONS` (closing idle ones to make room), reads each request
//! whole within its limits (`reading`), and only then passes it to tiny_http over a private
//! Unix socket (`forwarding`). What it refuses it answers itself, as any other response: with a
//! request id, a log line and the request counter.

mod admission;
mod forwarding;
mod reading;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{debug, warn};

use crate::metrics::Metrics;
use admission::{Activity, Conn, Conns};
use reading::{Outcome, Refusal};

/// The most request bodies all connections may hold at once, so slow uploads cannot exhaust
/// memory (past it: 503).
const BODY_BUDGET: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Silence allowed between requests, and time allowed for a whole request.
    pub timeout: Duration,
    pub max_body_bytes: usize,
}

/// What every connection thread shares.
struct Shared {
    upstream: PathBuf,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Bytes of request bodies being read or passed on.
    bodies: AtomicUsize,
    /// Set at shutdown: no connection starts another request.
    closing: AtomicBool,
}

impl Shared {
    fn reserve(&self, n: usize) -> bool {
        let before = self.bodies.fetch_add(n, Ordering::SeqCst);
        if n > 0 && before + n > BODY_BUDGET {
            self.bodies.fetch_sub(n, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn release(&self, n: usize) {
        self.bodies.fetch_sub(n, Ordering::SeqCst);
    }
}

pub struct Guard {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    shared: Arc<Shared>,
    conns: Arc<Conns>,
    acceptor: Option<JoinHandle<()>>,
}

impl Guard {
    pub fn start(
        listener: TcpListener,
        upstream: PathBuf,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Result<Guard> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Conns::default());
        let shared = Arc::new(Shared {
            upstream,
            limits,
            metrics,
            bodies: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        });
        let (s, c, sh) = (stopping.clone(), conns.clone(), shared.clone());
        let acceptor = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(&listener, &sh, &s, &c))
            .context("spawning the HTTP accept thread")?;
        Ok(Guard {
            addr,
            stopping,
            shared,
            conns,
            acceptor: Some(acceptor),
        })
    }

    /// Takes no new connections; those open stay until `close_all`.
    pub fn stop_accepting(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocked accept with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }

    /// Lets every connection finish the request it is answering, starts no other, and joins
    /// every connection thread. tiny_http's request threads must still be running.
    pub fn close_all(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.conns.close_all();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stopping: &AtomicBool, conns: &Conns) {
    let next_id = AtomicU64::new(0);
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                warn!("accepting an HTTP connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !conns.make_room(shared.limits.max_connections) {
            let full = Refusal {
                status: 503,
                message: "too many connections; try again".into(),
                method: None,
                path: None,
                request_id: None,
            };
            answer(client, &full, Instant::now(), &shared.metrics, false);
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = admit(id, client, shared, conns) {
            warn!("serving an HTTP connection failed: {e:#}");
        }
    }
}

fn admit(id: u64, client: TcpStream, shared: &Arc<Shared>, conns: &Conns) -> Result<()> {
    client.set_nodelay(true)?;
    client.set_write_timeout(Some(shared.limits.timeout))?;
    let activity = Activity::new();
    let stream = client.try_clone()?;
    let (thread_activity, shared) = (activity.clone(), shared.clone());
    let thread = std::thread::Builder::new()
        .name("http-conn".into())
        .spawn(move || serve(client, &shared, &thread_activity))?;
    debug!("HTTP connection {id} admitted");
    conns.add(Conn {
        id,
        stream,
        activity,
        thread,
    });
    Ok(())
}

/// Serves one client connection, request after request, each read whole and then passed on.
fn serve(client: TcpStream, shared: &Shared, activity: &Activity) {
    let (Ok(mut reader), Ok(mut writer)) = (client.try_clone(), client.try_clone()) else {
        return;
    };
    let mut buf = Vec::with_capacity(4096);
    loop {
        let started = Instant::now();
        let mut reserved = 0;
        let outcome =
            reading::read_request(&mut reader, &mut buf, &shared.limits, activity, &mut |n| {
                let ok = shared.reserve(n);
                reserved = if ok { n } else { 0 };
                ok
            });
        let request = match outcome {
            Outcome::Request(request) => request,
            Outcome::Closed => {
                shared.release(reserved);
                break;
            }
            Outcome::Refused(refusal) => {
                shared.release(reserved);
                return answer(client, &refusal, started, &shared.metrics, true);
            }
        };
        let kept = forwarding::forward(&request, &shared.upstream, &mut writer);
        shared.release(reserved);
        if shared.closing.load(Ordering::SeqCst) {
            break;
        }
        match kept {
            Ok(true) if !request.close => {}
            Ok(_) => break,
            Err(e) => {
                debug!("passing a request on failed: {e}");
                break;
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}

/// Answers with the guard's own error, as every response is answered (request id, log line,
/// counter), and closes. With `linger`, what the client is still sending (the body of a refused
/// request) is read and dropped for a moment first: closing with unread data would reset the
/// connection and lose the answer.
fn answer(
    mut client: TcpStream,
    refusal: &Refusal,
    started: Instant,
    metrics: &Metrics,
    linger: bool,
) {
    let id = super::request_id(refusal.request_id.as_deref());
    let method = refusal.method.as_deref().unwrap_or("-");
    let path = refusal.path.as_deref().unwrap_or("-");
    let status = refusal.status;
    crate::logging::set_request_id(Some(&id));
    super::record(
        metrics,
        method,
        path,
        status,
        started.elapsed(),
        Some(&refusal.message),
    );
    crate::logging::set_request_id(None);
    let body = serde_json::json!({ "error": refusal.message }).to_string();
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Request-Id: {id}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = client.write_all(response.as_bytes());
    let _ = client.shutdown(Shutdown::Write);
    if linger {
        discard_input(&mut client);
    }
    let _ = client.shutdown(Shutdown::Both);
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    }
}

/// Reads and drops input for at most a second or a few MiB, until the client closes.
fn discard_input(client: &mut TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut chunk = [0u8; 16 * 1024];
    let mut total = 0;
    while total < 4 * 1024 * 1024 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || client.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}
