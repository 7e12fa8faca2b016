//! The guard in front of tiny_http, which has no limits of its own: it owns the public socket,
//! admits at most `HTTP_MAX_CONNECTIONS` (closing idle ones to make room), reads each request
//! whole within its limits (`reading`), only then passes it to tiny_http over a private Unix
//! socket and reads the response back whole (`forwarding`), and writes it to the client at the
//! client's pace. Connections, bodies and held responses are budgets shared fairly by client
//! address (`budget`). What it refuses it answers itself, as any other response: with a request
//! id, a log line and the request counter.

mod admission;
mod budget;
mod forwarding;
mod reading;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{debug, warn};

use super::journal::{record, request_id};
use crate::metrics::Metrics;
use admission::{Activity, Conn, Conns, Full};
use budget::Budget;
pub use budget::ClientKey;
use forwarding::Answer;
pub use reading::CLIENT_HEADER;
use reading::{Outcome, Refusal, Source};

const MIB: usize = 1024 * 1024;

/// The most request bodies all connections may hold at once, so slow uploads cannot exhaust
/// memory (past it, or past an address's share of it: 503).
const BODY_BUDGET: usize = 64 * MIB;

/// The most bytes of responses larger than `FREE_RESPONSE_BYTES` held at once for clients
/// still reading them (past it, or past an address's share: 503).
const RESPONSE_BUDGET: usize = 64 * MIB;

/// A response this small is always held: every connection may hold one (so an answer to a
/// change, always smaller, is never refused for want of room).
pub const FREE_RESPONSE_BYTES: usize = 32 * 1024;

/// The largest response held (pages and looks are capped in bytes well below it): larger is a
/// bug, answered 500.
pub const MAX_RESPONSE_BYTES: usize = 16 * MIB;

/// What each open connection may hold besides the budgets: its head (16 KiB), one read beyond
/// it (16 KiB) and a small response.
const PER_CONNECTION_BYTES: usize = 2 * reading::MAX_HEAD_BYTES + FREE_RESPONSE_BYTES;

/// The kernel's send buffer of a client socket (Linux doubles it), fixed: autotuned it grows to
/// `tcp_wmem`'s 4 MiB per slow reader, memory no budget counts. The guard holds the rest.
const SEND_BUFFER_BYTES: usize = 128 * 1024;

/// The most the guard holds in memory with `connections` open: what `--help` and the README
/// say.
pub fn memory_budget(connections: usize) -> String {
    let per_connection = PER_CONNECTION_BYTES + 2 * SEND_BUFFER_BYTES;
    format!(
        "{} MiB at most: request bodies {} MiB and responses held for slow readers {} MiB\n  \
         (an address at most half of what the others leave of each), and {} KiB a connection\n  \
         with its socket's send buffer ({connections} connections: {} MiB)",
        (BODY_BUDGET + RESPONSE_BUDGET + connections * per_connection) / MIB,
        BODY_BUDGET / MIB,
        RESPONSE_BUDGET / MIB,
        per_connection / 1024,
        connections * per_connection / MIB,
    )
}

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
    bodies: Budget,
    /// Bytes of responses held until their client has read them.
    responses: Budget,
    /// Set at shutdown: no connection starts another request.
    closing: AtomicBool,
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
        let conns = Arc::new(Conns::new(metrics.http_connections.clone()));
        let held = |kind| metrics.http_held_bytes.with_label_values(&[kind]);
        let shared = Arc::new(Shared {
            upstream,
            limits,
            bodies: Budget::new(BODY_BUDGET, held("request_bodies")),
            responses: Budget::new(RESPONSE_BUDGET, held("responses")),
            metrics,
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

    /// Lets every connection finish the request it is answering (a client still reading its
    /// response after `HTTP_TIMEOUT_MS` is cut), starts no other, and joins every connection
    /// thread. tiny_http's request threads must still be running.
    pub fn close_all(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.conns.close_all(self.shared.limits.timeout);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stopping: &AtomicBool, conns: &Conns) {
    let next_id = AtomicU64::new(0);
    loop {
        let accepted = listener.accept();
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait a little instead of spinning.
                warn!("accepting an HTTP connection failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let key = ClientKey::of(peer.ip());
        if let Err(full) = conns.make_room(key, shared.limits.max_connections) {
            let message = match full {
                Full::Everyone => "too many connections; try again",
                Full::ThisAddress => {
                    "too many connections from this address; close idle ones, or try again"
                }
            };
            let full = Refusal::new(503, message);
            answer(client, &full, Instant::now(), &shared.metrics, false);
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = admit(id, key, client, shared, conns) {
            warn!("serving an HTTP connection failed: {e:#}");
        }
    }
}

fn admit(
    id: u64,
    key: ClientKey,
    client: TcpStream,
    shared: &Arc<Shared>,
    conns: &Conns,
) -> Result<()> {
    client.set_nodelay(true)?;
    client.set_write_timeout(Some(shared.limits.timeout))?;
    socket2::SockRef::from(&client).set_send_buffer_size(SEND_BUFFER_BYTES)?;
    let activity = Activity::new();
    let stream = client.try_clone()?;
    let (thread_activity, shared) = (activity.clone(), shared.clone());
    let thread = std::thread::Builder::new()
        .name("http-conn".into())
        .spawn(move || serve(client, key, &shared, &thread_activity))?;
    debug!("HTTP connection {id} from {key} admitted");
    conns.add(Conn {
        id,
        client: key,
        stream,
        activity,
        thread,
    });
    Ok(())
}

/// Serves one client connection, request after request: each read whole, passed on, its
/// response read back whole, then written to the client at the client's pace (a client that
/// takes nothing for `HTTP_TIMEOUT_MS` is dropped).
fn serve(client: TcpStream, key: ClientKey, shared: &Shared, activity: &Activity) {
    let (Ok(mut reader), Ok(mut writer)) = (client.try_clone(), client.try_clone()) else {
        return;
    };
    let source = Source {
        client: key,
        bodies: &shared.bodies,
    };
    let mut buf = Vec::with_capacity(4096);
    loop {
        let started = Instant::now();
        let outcome =
            reading::read_request(&mut reader, &mut buf, &shared.limits, activity, &source);
        let request = match outcome {
            Outcome::Request(request) => request,
            Outcome::Closed => break,
            Outcome::Refused(refusal) => {
                return answer(client, &refusal, started, &shared.metrics, true);
            }
        };
        let answered = forwarding::forward(&request, key, &shared.upstream, &shared.responses);
        let close = request.close;
        drop(request); // its body is passed on: its room goes back
        let held = match answered {
            Ok(Answer::Held(held)) => held,
            Ok(Answer::Refused(refusal)) => {
                return answer(client, &refusal, started, &shared.metrics, false);
            }
            Err(e) => {
                debug!("passing a request on failed: {e}");
                break;
            }
        };
        if let Err(e) = writer.write_all(&held.bytes) {
            debug!("the client did not take its response: {e}");
            break;
        }
        if close || !held.keep_alive || shared.closing.load(Ordering::SeqCst) {
            break;
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
    let id = request_id(refusal.request_id.as_deref());
    let method = refusal.method.as_deref().unwrap_or("-");
    let path = refusal.path.as_deref().unwrap_or("-");
    let status = refusal.status;
    crate::logging::set_request_id(Some(&id));
    record(
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
        500 => "Internal Server Error",
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
