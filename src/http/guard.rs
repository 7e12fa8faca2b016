//! The guard in front of tiny_http, which has no limits of its own: it owns the public socket,
//! bounds the open connections (evicting idle ones first), caps request heads and bodies, times
//! out silent and slow clients, and passes each connection on to tiny_http over a private Unix
//! socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{debug, warn};
use parking_lot::Mutex;

/// The most a request line plus headers may take.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    /// Silence allowed between requests, and time allowed for a whole request head.
    pub timeout: Duration,
    pub max_body_bytes: usize,
}

/// One open client connection, as the guard tracks it.
struct Conn {
    id: u64,
    /// A clone of the client socket, to close it from outside (eviction, shutdown).
    stream: TcpStream,
    /// True between requests: the connection may be closed without cutting a request.
    idle: Arc<AtomicBool>,
    /// Closed to make room; its thread is ending.
    closing: AtomicBool,
    thread: JoinHandle<()>,
}

pub struct Guard {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Guard {
    pub fn start(listener: TcpListener, upstream: PathBuf, limits: Limits) -> Result<Guard> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (s, c) = (stopping.clone(), conns.clone());
        let acceptor = std::thread::Builder::new()
            .name("http-accept".into())
            .spawn(move || accept_loop(&listener, &upstream, limits, &s, &c))
            .context("spawning the HTTP accept thread")?;
        Ok(Guard {
            addr,
            stopping,
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

    /// Ends every open connection and joins its thread. Only the reading side is shut: a
    /// response still being copied reaches its client, then the connection ends.
    pub fn close_all(&mut self) {
        let conns: Vec<Conn> = std::mem::take(&mut *self.conns.lock());
        for conn in &conns {
            let _ = conn.stream.shutdown(Shutdown::Read);
        }
        for conn in conns {
            let _ = conn.thread.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    upstream: &Path,
    limits: Limits,
    stopping: &AtomicBool,
    conns: &Arc<Mutex<Vec<Conn>>>,
) {
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
        if !make_room(conns, limits.max_connections) {
            debug!("HTTP connection refused: every slot is busy");
            refuse(client, 503, "too many connections; try again", false);
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        debug!("HTTP connection {id} admitted");
        if let Err(e) = admit(id, client, upstream, limits, conns) {
            warn!("serving an HTTP connection failed: {e:#}");
        }
    }
}

/// Below the limit, or making room by closing an idle connection: true. Closed connections
/// stay listed until their thread has ended, so every thread is either joined here (ended) or
/// at shutdown.
fn make_room(conns: &Mutex<Vec<Conn>>, max: usize) -> bool {
    let mut conns = conns.lock();
    conns.retain(|c| !c.thread.is_finished());
    let open = conns
        .iter()
        .filter(|c| !c.closing.load(Ordering::SeqCst))
        .count();
    if open < max {
        return true;
    }
    let idle = conns
        .iter()
        .find(|c| c.idle.load(Ordering::SeqCst) && !c.closing.load(Ordering::SeqCst));
    match idle {
        Some(conn) => {
            debug!("closing idle HTTP connection {} to make room", conn.id);
            conn.closing.store(true, Ordering::SeqCst);
            let _ = conn.stream.shutdown(Shutdown::Both);
            true
        }
        None => false,
    }
}

fn admit(
    id: u64,
    client: TcpStream,
    upstream: &Path,
    limits: Limits,
    conns: &Mutex<Vec<Conn>>,
) -> Result<()> {
    client.set_nodelay(true)?;
    client.set_write_timeout(Some(limits.timeout))?;
    let idle = Arc::new(AtomicBool::new(true));
    let stream = client.try_clone()?;
    let (flag, upstream) = (idle.clone(), upstream.to_path_buf());
    let thread = std::thread::Builder::new()
        .name("http-conn".into())
        .spawn(move || {
            if let Err(e) = serve(client, &upstream, limits, &flag) {
                debug!("HTTP connection {id} ended: {e}");
            }
        })?;
    conns.lock().push(Conn {
        id,
        stream,
        idle,
        closing: AtomicBool::new(false),
        thread,
    });
    Ok(())
}

/// Why the guard answers a request itself instead of passing it on.
struct Refusal(u16, String);

/// Serves one client connection: request after request, each passed to tiny_http on a
/// connection of its own that ends with the response. So a tiny_http thread is busy only while a
/// request is, never for an idle keep-alive connection.
fn serve(client: TcpStream, upstream: &Path, limits: Limits, idle: &AtomicBool) -> io::Result<()> {
    let mut reader = client.try_clone()?;
    let mut writer = client.try_clone()?;
    let mut buf = Vec::with_capacity(4096);
    let outcome = loop {
        idle.store(buf.is_empty(), Ordering::SeqCst);
        let head_len = match read_head(&mut reader, &mut buf, limits.timeout, idle) {
            Ok(Some(n)) => n,
            Ok(None) => break Ok(()),
            Err(refusal) => break Err(refusal),
        };
        let body_len = match body_length(&buf[..head_len], limits.max_body_bytes) {
            Ok(n) => n,
            Err(refusal) => break Err(refusal),
        };
        let (head, expects_continue) = without_expect(&buf[..head_len]);
        buf.drain(..head_len);
        if expects_continue {
            // Answered here: tiny_http's own would reach the client only after the body.
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let request = Request {
            head: &head,
            body_len,
        };
        if !pass_on(
            &request,
            &mut reader,
            &mut writer,
            &mut buf,
            upstream,
            limits.timeout,
        )? {
            break Ok(());
        }
        if wants_close(&head) {
            break Ok(());
        }
    };
    match outcome {
        Ok(()) => {
            let _ = client.shutdown(Shutdown::Both);
        }
        Err(Refusal(status, message)) => refuse(client, status, &message, true),
    }
    Ok(())
}

struct Request<'a> {
    head: &'a [u8],
    body_len: usize,
}

/// Sends one request to tiny_http and its response back; false when the connection is over
/// (the client left mid-body, or the response closes it).
fn pass_on(
    request: &Request,
    client: &mut TcpStream,
    writer: &mut TcpStream,
    buf: &mut Vec<u8>,
    upstream: &Path,
    timeout: Duration,
) -> io::Result<bool> {
    let mut server = UnixStream::connect(upstream)?;
    server.write_all(request.head)?;
    let mut left = request.body_len;
    while left > 0 {
        if buf.is_empty() && read_more(client, buf, timeout)? == 0 {
            return Ok(false);
        }
        let n = left.min(buf.len());
        server.write_all(&buf[..n])?;
        buf.drain(..n);
        left -= n;
    }
    // The end of this connection tells tiny_http there is no other request on it: it answers
    // this one and closes, which ends the copy.
    server.shutdown(Shutdown::Write)?;
    copy_response(&mut server, writer)
}

/// Copies the response to the client; false when its head says the connection closes.
fn copy_response(server: &mut UnixStream, client: &mut TcpStream) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut keep_alive = true;
    loop {
        let n = server.read(&mut chunk)?;
        if n == 0 {
            return Ok(keep_alive);
        }
        if head.len() < MAX_HEAD_BYTES && find_head_end(&head).is_none() {
            head.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_head_end(&head) {
                keep_alive = !wants_close(&head[..end]);
            }
        }
        client.write_all(&chunk[..n])?;
    }
}

/// Whether a head (request or response) ends its connection: `Connection: close`, or HTTP/1.0
/// without `keep-alive`.
fn wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let connection = text
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim() == "connection")
        .map(|(_, value)| value.trim().to_string());
    let http10 = text
        .split("\r\n")
        .next()
        .is_some_and(|l| l.contains("http/1.0"));
    match connection.as_deref() {
        Some(v) if v.contains("close") => true,
        Some(v) if v.contains("keep-alive") => false,
        _ => http10,
    }
}

/// The head without its `Expect` header, and whether it asked for `100-continue`.
fn without_expect(head: &[u8]) -> (Vec<u8>, bool) {
    let text = String::from_utf8_lossy(head);
    let mut expects = false;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive("\r\n") {
        let is_expect = line
            .split_once(':')
            .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("expect"));
        if is_expect {
            expects |= line.to_ascii_lowercase().contains("100-continue");
        } else {
            out.push_str(line);
        }
    }
    match expects {
        true => (out.into_bytes(), true),
        false => (head.to_vec(), false),
    }
}

/// Reads until `buf` holds a whole request head; its length, or `None` when the client left or
/// stayed silent before starting one.
fn read_head(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
    idle: &AtomicBool,
) -> Result<Option<usize>, Refusal> {
    let mut deadline = (!buf.is_empty()).then(|| Instant::now() + timeout);
    loop {
        let end = find_head_end(&buf[..buf.len().min(MAX_HEAD_BYTES + 4)]);
        if let Some(end) = end {
            return Ok(Some(end));
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(Refusal(
                431,
                format!("request headers are larger than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => timeout,
        };
        if wait.is_zero() {
            return Err(Refusal(
                408,
                "the request head did not arrive in time".into(),
            ));
        }
        match read_more(client, buf, wait) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                idle.store(false, Ordering::SeqCst);
                deadline.get_or_insert_with(|| Instant::now() + timeout);
            }
            Err(e) if is_timeout(&e) && deadline.is_some() => {
                return Err(Refusal(
                    408,
                    "the request head did not arrive in time".into(),
                ))
            }
            Err(_) => return Ok(None),
        }
    }
}

fn read_more(client: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) -> io::Result<usize> {
    client.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
    let mut chunk = [0u8; 8192];
    let n = client.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The body length a head announces; refuses what tenantd would not read anyway.
fn body_length(head: &[u8], max_body: usize) -> Result<usize, Refusal> {
    let text = String::from_utf8_lossy(head);
    let mut length = None;
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if name == "transfer-encoding" {
            return Err(Refusal(
                411,
                "send the body with a Content-Length, not chunked".into(),
            ));
        }
        if name == "content-length" {
            let n: usize = value
                .trim()
                .parse()
                .map_err(|_| Refusal(400, "Content-Length is not a number".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal(400, "conflicting Content-Length headers".into()));
            }
            length = Some(n);
        }
    }
    let length = length.unwrap_or(0);
    if length > max_body {
        return Err(Refusal(
            413,
            format!("request body is larger than {max_body} bytes"),
        ));
    }
    Ok(length)
}

/// Answers with an error of the guard's own and closes (status 0: just close). With `linger`,
/// what the client is still sending (the body of a refused request) is read and dropped for a
/// moment before closing: closing with unread data would reset the connection and lose the
/// answer.
fn refuse(mut client: TcpStream, status: u16, message: &str, linger: bool) {
    if status != 0 {
        let body = serde_json::json!({ "error": message }).to_string();
        let reason = match status {
            400 => "Bad Request",
            408 => "Request Timeout",
            411 => "Length Required",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
        let _ = client.write_all(response.as_bytes());
    }
    let _ = client.shutdown(Shutdown::Write);
    if linger {
        discard_input(&mut client);
    }
    let _ = client.shutdown(Shutdown::Both);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_length_follows_content_length_and_refuses_the_rest() {
        let len = |h: &str| body_length(h.as_bytes(), 100).map_err(|r| r.0);
        assert_eq!(len("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"), Ok(12));
        assert_eq!(len("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(0));
        assert_eq!(
            len("POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n"),
            Err(413)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(411)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(400)
        );
        let twice = "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(len(twice), Err(400));
    }

    #[test]
    fn drops_expect_and_says_so() {
        let (head, expects) =
            without_expect(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nA: b\r\n\r\n");
        assert!(expects);
        assert_eq!(head, b"POST / HTTP/1.1\r\nA: b\r\n\r\n");
        let plain = b"GET / HTTP/1.1\r\nA: b\r\n\r\n";
        assert_eq!(without_expect(plain), (plain.to_vec(), false));
    }

    #[test]
    fn knows_when_a_connection_ends() {
        assert!(wants_close(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!wants_close(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(wants_close(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!wants_close(
            b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        ));
        assert!(wants_close(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn finds_the_end_of_a_head() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
