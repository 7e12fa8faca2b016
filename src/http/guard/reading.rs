//! Reading one whole request from a client before anything else sees it: the head parsed once
//! (httparse), within `HTTP_TIMEOUT_MS` of its first byte and at most 16 KiB, then the body, at
//! most the body cap, within the same deadline. So a slow client only ever holds its own
//! connection thread, never one of tiny_http's or an `http-N` thread.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::admission::Activity;
use super::budget::{Budget, ClientKey, Reservation};
use super::Limits;

/// The header that tells the request threads the client's address: the guard removes any a
/// client sends, and sets it when it passes the request on.
pub const CLIENT_HEADER: &str = "X-Tenantd-Client";

/// The most a request line plus headers may take.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

/// A whole request, ready to pass on.
pub struct Request<'a> {
    /// The head as tiny_http gets it: the client's, without `Expect` (answered here) and
    /// without any `X-Tenantd-Client` (the guard's to set).
    pub head: Vec<u8>,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
    pub method: String,
    pub path: String,
    pub request_id: Option<String>,
    /// The body's place in the budget of bodies, given back with the request.
    _body: Reservation<'a>,
}

/// Why the guard answers a request itself; what it knows of the request.
pub struct Refusal {
    pub status: u16,
    pub message: String,
    pub method: Option<String>,
    pub path: Option<String>,
    pub request_id: Option<String>,
}

impl Refusal {
    pub fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            method: None,
            path: None,
            request_id: None,
        }
    }

    fn about(mut self, head: &Head) -> Refusal {
        self.method = Some(head.method.clone());
        self.path = Some(head.path.clone());
        self.request_id = head.request_id.clone();
        self
    }

    pub fn about_request(mut self, request: &Request) -> Refusal {
        self.method = Some(request.method.clone());
        self.path = Some(request.path.clone());
        self.request_id = request.request_id.clone();
        self
    }
}

pub enum Outcome<'a> {
    Request(Request<'a>),
    /// The client left, or stayed silent past the timeout, before starting a request.
    Closed,
    Refused(Refusal),
}

/// What the head says, once parsed.
struct Head {
    len: usize,
    method: String,
    path: String,
    request_id: Option<String>,
    close: bool,
    expects_continue: bool,
    body_len: usize,
    /// The head to pass on (without `Expect`).
    forward: Vec<u8>,
}

/// Where a request comes from, and the budget its body is read within.
pub struct Source<'a> {
    pub client: ClientKey,
    pub bodies: &'a Budget,
}

/// Reads the next request from `client`; `buf` keeps what arrived beyond it (a pipelined
/// request). `activity` says when a request starts: none starts on a connection claimed to
/// make room. Room for the body is taken from the budget of bodies before it is read (none
/// left for this address: 503).
pub fn read_request<'a>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    limits: &Limits,
    activity: &Activity,
    source: &Source<'a>,
) -> Outcome<'a> {
    if buf.is_empty() {
        if !activity.wait_between_requests() {
            return Outcome::Closed;
        }
        // The next request's first bytes are waited for, not taken: until it starts they are
        // in the socket, where `make_room` sees them.
        match wait_for_bytes(client, limits.timeout) {
            Ok(0) | Err(_) => return Outcome::Closed,
            Ok(_) => {}
        }
    }
    if !activity.start_request() {
        return Outcome::Closed;
    }
    let deadline = Instant::now() + limits.timeout;
    let head = match read_head(client, buf, deadline, limits.max_body_bytes) {
        Ok(head) => head,
        Err(refusal) => return Outcome::Refused(refusal),
    };
    let Some(reservation) = source.bodies.take(source.client, head.body_len) else {
        let busy = Refusal::new(
            503,
            "too many request bodies in flight from this address; try again",
        );
        return Outcome::Refused(busy.about(&head));
    };
    if head.expects_continue && buf.len() == head.len {
        // The client waits for this before sending the body (tiny_http's own would come only
        // after the body).
        if client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
            return Outcome::Closed;
        }
    }
    let body = match read_body(client, buf, &head, deadline) {
        Ok(body) => body,
        Err(refusal) => return Outcome::Refused(refusal.about(&head)),
    };
    Outcome::Request(Request {
        head: head.forward,
        body,
        close: head.close,
        method: head.method,
        path: head.path,
        request_id: head.request_id,
        _body: reservation,
    })
}

fn read_head(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    max_body: usize,
) -> Result<Head, Refusal> {
    loop {
        let window = &buf[..buf.len().min(MAX_HEAD_BYTES)];
        if let Some(head) = parse_head(window, max_body)? {
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(Refusal::new(
                431,
                format!("request headers are larger than {MAX_HEAD_BYTES} bytes"),
            ));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match read_more(client, buf, wait) {
            Ok(0) => return Err(Refusal::new(400, "the connection ended within the head")),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(Refusal::new(408, "the request head did not arrive in time"))
            }
            Err(e) => return Err(Refusal::new(400, format!("reading the head failed: {e}"))),
        }
    }
}

/// The head at the start of `bytes`, or `None` while it is incomplete.
fn parse_head(bytes: &[u8], max_body: usize) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(Refusal::new(400, format!("malformed request head: {e}"))),
    };
    let method = parsed.method.unwrap_or_default().to_string();
    let path = parsed.path.unwrap_or_default().to_string();
    let http10 = parsed.version == Some(0);
    let mut head = Head {
        len,
        method,
        path,
        request_id: None,
        close: http10,
        expects_continue: false,
        body_len: 0,
        forward: Vec::with_capacity(len),
    };
    let mut lengths: Vec<&[u8]> = Vec::new();
    let mut chunked = false;
    let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
    head.forward.extend_from_slice(&bytes[..line_end]);
    for h in parsed.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        match h.name.to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = true,
            "content-length" => lengths.push(h.value),
            "expect" => {
                head.expects_continue = value.eq_ignore_ascii_case("100-continue");
                continue;
            }
            "connection" => {
                let value = value.to_ascii_lowercase();
                if value.contains("close") {
                    head.close = true;
                } else if value.contains("keep-alive") {
                    head.close = false;
                }
            }
            "x-request-id" => head.request_id = Some(value.to_string()),
            name if name.eq_ignore_ascii_case(CLIENT_HEADER) => continue,
            _ => {}
        }
        head.forward.extend_from_slice(h.name.as_bytes());
        head.forward.extend_from_slice(b": ");
        head.forward.extend_from_slice(h.value);
        head.forward.extend_from_slice(b"\r\n");
    }
    if chunked {
        let refusal = Refusal::new(411, "send the body with a Content-Length, not chunked");
        return Err(refusal.about(&head));
    }
    head.body_len = body_length(&lengths, max_body).map_err(|r| r.about(&head))?;
    head.forward.extend_from_slice(b"\r\n");
    Ok(Some(head))
}

/// The body length the `Content-Length` headers agree on (none: no body), within `max`.
fn body_length(values: &[&[u8]], max: usize) -> Result<usize, Refusal> {
    let mut length = None;
    for value in values {
        let n: usize = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| Refusal::new(400, "Content-Length is not a number"))?;
        if length.is_some_and(|l| l != n) {
            return Err(Refusal::new(400, "conflicting Content-Length headers"));
        }
        length = Some(n);
    }
    let length = length.unwrap_or(0);
    if length > max {
        return Err(Refusal::new(
            413,
            format!("request body is larger than {max} bytes"),
        ));
    }
    Ok(length)
}

/// The body, read within `deadline`; `buf` keeps whatever follows it.
fn read_body(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &Head,
    deadline: Instant,
) -> Result<Vec<u8>, Refusal> {
    buf.drain(..head.len);
    while buf.len() < head.body_len {
        let wait = deadline.saturating_duration_since(Instant::now());
        match read_more(client, buf, wait) {
            Ok(0) => return Err(Refusal::new(400, "the connection ended within the body")),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(Refusal::new(408, "the request body did not arrive in time"))
            }
            Err(e) => return Err(Refusal::new(400, format!("reading the body failed: {e}"))),
        }
    }
    let rest = buf.split_off(head.body_len);
    Ok(std::mem::replace(buf, rest))
}

fn read_more(client: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) -> io::Result<usize> {
    set_wait(client, wait)?;
    let mut chunk = [0u8; 16 * 1024];
    let n = client.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Waits up to `wait` for bytes from the client and leaves them unread (0: it closed).
fn wait_for_bytes(client: &TcpStream, wait: Duration) -> io::Result<usize> {
    set_wait(client, wait)?;
    client.peek(&mut [0u8; 1])
}

fn set_wait(client: &TcpStream, wait: Duration) -> io::Result<()> {
    if wait.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    client.set_read_timeout(Some(wait.max(Duration::from_millis(1))))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, u16> {
        parse_head(raw.as_bytes(), 100).map_err(|r| r.status)
    }

    #[test]
    fn the_body_length_follows_content_length_and_the_rest_is_refused() {
        let len = |raw: &str| head(raw).map(|h| h.map(|h| h.body_len));
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Ok(Some(12))
        );
        assert_eq!(len("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(Some(0)));
        assert_eq!(len("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None), "incomplete");
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
        assert_eq!(len("GET\x01 / HTTP/1.1\r\n\r\n"), Err(400));
    }

    #[test]
    fn expect_and_a_claimed_client_address_are_not_passed_on() {
        let raw =
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nx-tenantd-client: 10.9.9.9\r\nA: b\r\n\r\n";
        let h = head(raw).unwrap().unwrap();
        assert!(h.expects_continue);
        assert_eq!(h.forward, b"POST / HTTP/1.1\r\nA: b\r\n\r\n");
    }

    #[test]
    fn the_head_says_when_the_connection_ends_and_who_asks() {
        let h = |raw: &str| head(raw).unwrap().unwrap();
        assert!(h("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").close);
        assert!(!h("GET / HTTP/1.1\r\nHost: x\r\n\r\n").close);
        assert!(h("GET / HTTP/1.0\r\n\r\n").close);
        assert!(!h("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").close);
        let traced = h("GET /healthz HTTP/1.1\r\nX-Request-Id: r-1\r\n\r\n");
        assert_eq!(traced.request_id.as_deref(), Some("r-1"));
        assert_eq!(
            (traced.method.as_str(), traced.path.as_str()),
            ("GET", "/healthz")
        );
    }
}
