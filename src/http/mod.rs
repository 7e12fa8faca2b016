//! The HTTP front: the guard (limits) before tiny_http, and a few threads taking requests from
//! tiny_http, each with its own database connection. Bodies are capped, origins, callers and
//! rates checked and request ids given here, because tiny_http does none of it.

pub mod access;
pub mod auth;
pub mod error;
mod gate;
mod guard;
mod journal;
mod private_socket;
mod rate;
mod routes;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use log::{debug, warn};
use parking_lot::RwLock;
use socket2::{Domain, Socket, Type};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::logging;
use crate::service::Service;
use auth::{Auth, Who};
use error::ApiError;
use gate::Gate;
pub use guard::memory_budget;
use guard::{Guard, Limits};
use journal::{record, request_id};

/// Threads answering HTTP requests. Most requests take milliseconds; a pause or a DELETE waits
/// for the tenant's in-flight messages, so there are enough threads for several of those.
pub const REQUEST_THREADS: usize = 16;

/// Requests larger than this are refused with 413 before they are read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The running HTTP server: the guard on the public socket, tiny_http behind it on a private
/// Unix socket, and the request threads. Stopping it unblocks and joins every one.
pub struct HttpServer {
    guard: Guard,
    front: Arc<Front>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    socket_dir: PathBuf,
}

/// The private socket and the tiny_http server accepting on it. tiny_http's accept thread ends
/// for good on the first accept error (e.g. out of file descriptors); the front then starts a
/// new server on the same socket, so the API outlives the error.
struct Front {
    listener: UnixListener,
    server: RwLock<Arc<Server>>,
    stopping: AtomicBool,
    threads: usize,
}

impl Front {
    fn current(&self) -> Arc<Server> {
        self.server.read().clone()
    }

    /// Replaces `failed` (once, whichever thread sees it first) and wakes the threads on it.
    /// Connections arriving meanwhile wait in the socket's backlog; none is lost.
    fn replace(&self, failed: &Arc<Server>, error: &std::io::Error) {
        let mut current = self.server.write();
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        warn!("HTTP stopped accepting connections ({error}); accepting again");
        // Give whatever ran out (file descriptors) a moment to come back.
        std::thread::sleep(std::time::Duration::from_millis(100));
        match self
            .listener
            .try_clone()
            .map(|l| Server::from_listener(l, None))
        {
            Ok(Ok(server)) => *current = Arc::new(server),
            Ok(Err(e)) => warn!("restarting HTTP failed: {e}"),
            Err(e) => warn!("restarting HTTP failed: {e}"),
        }
        for _ in 0..self.threads {
            failed.unblock();
        }
    }
}

/// How the HTTP front is set up.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub addr: String,
    pub threads: usize,
    pub max_connections: usize,
    /// Silence allowed between requests, and time allowed for a whole request.
    pub timeout: std::time::Duration,
    /// Origins whose web pages may call.
    pub allowed_origins: Vec<String>,
    /// Requests a second per credential (0: no limit), and the burst beyond it.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
}

impl HttpServer {
    /// Listens on `settings.addr`, admitting callers as `auth` says.
    pub fn start(settings: &HttpSettings, auth: Auth, service: Arc<Service>) -> Result<HttpServer> {
        let public = listen(&settings.addr)?;
        let local = public.local_addr()?;
        auth.log_start(local);
        let gate = Arc::new(Gate::new(settings, auth));
        let socket_dir = private_socket::create()?;
        let socket = socket_dir.join(private_socket::SOCKET);
        let listener = UnixListener::bind(&socket).context("binding the private HTTP socket")?;
        let server = Server::from_listener(listener.try_clone()?, None)
            .map_err(|e| anyhow!("cannot serve HTTP: {e}"))?;
        let front = Arc::new(Front {
            listener,
            server: RwLock::new(Arc::new(server)),
            stopping: AtomicBool::new(false),
            threads: settings.threads,
        });
        let threads = (0..settings.threads)
            .map(|i| spawn_request_thread(i, &front, &service, &gate))
            .collect::<Result<_>>()?;
        let limits = Limits {
            max_connections: settings.max_connections,
            timeout: settings.timeout,
            max_body_bytes: MAX_BODY_BYTES,
        };
        let guard = Guard::start(public, socket, limits, service.metrics().clone())?;
        Ok(HttpServer {
            guard,
            front,
            threads,
            addr: local,
            socket_dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops taking connections, lets the requests being handled finish, then closes every
    /// connection.
    pub fn stop(mut self) {
        self.guard.stop_accepting();
        // First the connections, while the request threads still answer what they pass on:
        // a request arriving after the threads were told to stop would never be taken.
        self.guard.close_all();
        self.front.stopping.store(true, Ordering::SeqCst);
        let server = self.front.current();
        for _ in &self.threads {
            server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // tiny_http wakes its accept thread by connecting to its socket: it must go while the
        // socket is still there.
        drop(server);
        drop(self.front);
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// Binds the public address (the guard accepts on it).
fn listen(addr: &str) -> Result<TcpListener> {
    let addr: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("HTTP_ADDR={addr:?} is not an address"))?
        .next()
        .with_context(|| format!("HTTP_ADDR={addr:?} resolves to nothing"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn spawn_request_thread(
    i: usize,
    front: &Arc<Front>,
    service: &Arc<Service>,
    gate: &Arc<Gate>,
) -> Result<JoinHandle<()>> {
    let (front, service, gate) = (front.clone(), service.clone(), gate.clone());
    std::thread::Builder::new()
        .name(format!("http-{i}"))
        .spawn(move || loop {
            let server = front.current();
            match server.recv() {
                Ok(request) => handle_guarded(&service, &gate, request),
                Err(_) if front.stopping.load(Ordering::SeqCst) => return,
                Err(e) => front.replace(&server, &e),
            }
        })
        .context("spawning an HTTP thread")
}

/// A request as the routes see it: method, path, query and the (capped) body.
pub struct ApiRequest {
    pub method: tiny_http::Method,
    pub path: String,
    pub query: String,
    pub body: Vec<u8>,
    /// The caller may see every tenant's series in `/metrics` and why `/readyz` fails.
    pub operator: bool,
}

/// What a route answers: a status and a body.
pub struct ApiResponse {
    pub status: u16,
    pub body: Body,
}

pub enum Body {
    /// Serialized JSON (straight from the values: a stored payload passes through as written).
    Json(String),
    /// Prometheus text exposition.
    Metrics(String),
    Empty,
}

fn handle(service: &Service, gate: &Gate, mut request: Request) {
    let started = std::time::Instant::now();
    let request_id = request_id(header_value(&request, "X-Request-Id").as_deref());
    logging::set_request_id(Some(&request_id));
    let method = request.method().clone();
    let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
    let (path, query) = (path.to_string(), query.to_string());
    let route = routes::Route::parse(&path);
    let origin = header_value(&request, "Origin");
    let checked = gate.check_origin(origin.as_deref(), header_value(&request, "Host").as_deref());
    let allowed_origin = checked.as_ref().ok().copied().flatten().map(str::to_string);
    let result = match checked {
        Err(e) => Err(e),
        Ok(Some(_)) if method == Method::Options => access::preflight(route.as_ref()),
        Ok(_) => gate
            .admit(&request, &method, route.as_ref(), &path, &query)
            .and_then(|who| read_request(&mut request, path.clone(), query, who))
            .and_then(|r| routes::route(service, route.as_ref(), r)),
    };
    let note = note(&result, &method, &path);
    let (status, mut response) = match result {
        Ok(ok) => (ok.status, respond(ok.status, ok.body)),
        Err(e) => error_response(&e),
    };
    response.add_header(header("X-Request-Id", &request_id));
    if let Some(origin) = allowed_origin {
        for (name, value) in access::cors_headers(&origin, &method, route.as_ref()) {
            response.add_header(header(name, &value));
        }
    }
    record(
        service.metrics(),
        method.as_str(),
        &path,
        status,
        started.elapsed(),
        note.as_deref(),
    );
    if let Err(e) = request.respond(response) {
        debug!("could not send the response to {method} {path}: {e}");
    }
    logging::set_request_id(None);
}

/// What the request's log line adds: why it was refused (never the token itself), why the
/// replica is not ready.
fn note(result: &Result<ApiResponse, ApiError>, method: &Method, path: &str) -> Option<String> {
    match result {
        Err(
            e @ (ApiError::Unauthorized(_) | ApiError::Forbidden(_) | ApiError::ForeignCaller(_)),
        ) => Some(format!(
            "denied on {method} {}: {}",
            routes::label(path),
            e.message()
        )),
        Err(ApiError::TooManyRequests(whose, _)) => Some(format!("rate limited: {whose}")),
        Err(ApiError::NotReady(why)) => Some(format!("not ready: {why}")),
        _ => None,
    }
}

/// A panic while handling one request must not take an HTTP thread down: it is logged, the
/// client gets tiny_http's 500 (the database connection it held is closed, not reused).
fn handle_guarded(service: &Service, gate: &Gate, request: Request) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle(service, gate, request)
    }));
    if outcome.is_err() {
        log::error!("a request handler panicked; the thread goes on");
        logging::set_request_id(None);
    }
}

fn error_response(e: &ApiError) -> (u16, Response<std::io::Cursor<Vec<u8>>>) {
    let status = e.status();
    let body = serde_json::json!({ "error": e.message() });
    let mut response = respond(status, Body::Json(body.to_string()));
    match e {
        ApiError::MethodNotAllowed(allow) => {
            response.add_header(header("Allow", &allow.join(", ")))
        }
        // RFC 6750 3.1: no error code when the request carried no credential at all.
        ApiError::Unauthorized(None) => response.add_header(header("WWW-Authenticate", "Bearer")),
        ApiError::Unauthorized(Some(why)) => response.add_header(header(
            "WWW-Authenticate",
            &format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
        )),
        ApiError::Forbidden(_) => response.add_header(header(
            "WWW-Authenticate",
            "Bearer error=\"insufficient_scope\"",
        )),
        ApiError::TooManyRequests(_, wait) => response.add_header(header(
            "Retry-After",
            &error::retry_after_secs(*wait).to_string(),
        )),
        _ => {}
    }
    (status, response)
}

/// A body must say it is JSON: one without `Content-Type` (which a web page's form or
/// `fetch` may send cross-site without asking first) or of another type is refused.
fn check_content_type(request: &Request) -> Result<(), ApiError> {
    let Some(value) = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Content-Type"))
        .map(|h| h.value.as_str().to_ascii_lowercase())
    else {
        return Err(ApiError::UnsupportedMediaType(String::new()));
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_string();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(essence))
    }
}

fn read_request(
    request: &mut Request,
    path: String,
    query: String,
    who: Who,
) -> Result<ApiRequest, ApiError> {
    if request.body_length().is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
    }
    if !body.is_empty() {
        check_content_type(request)?;
    }
    Ok(ApiRequest {
        method: request.method().clone(),
        path,
        query,
        body,
        operator: who.is_operator(),
    })
}

fn respond(status: u16, body: Body) -> Response<std::io::Cursor<Vec<u8>>> {
    let (bytes, content_type) = match body {
        Body::Json(text) => (text.into_bytes(), Some("application/json")),
        Body::Metrics(text) => (text.into_bytes(), Some("text/plain; version=0.0.4")),
        Body::Empty => (Vec::new(), None),
    };
    // Always a Content-Length (tiny_http would switch to chunked past 32 KiB).
    let mut response = Response::from_data(bytes)
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    if let Some(content_type) = content_type {
        response.add_header(header("Content-Type", content_type));
    }
    response
}

/// The first value of a request header.
fn header_value(request: &Request, name: &'static str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_string())
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}
