//! A minimal HTTP/1.1 client: enough to send exactly the bytes a test means, malformed ones too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts an error answer: this status, a JSON body `{"error": "..."}` mentioning `needle`.
    pub fn assert_error(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let error = self.json()["error"].as_str().map(str::to_lowercase);
        let error = error.unwrap_or_else(|| panic!("no error field: {}", self.text()));
        assert!(
            error.contains(&needle.to_lowercase()),
            "{error:?} lacks {needle:?}"
        );
    }
}

pub fn request(base: &str, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
    request_with(
        base,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// A request with exactly these headers (besides Host, Content-Length and Connection).
pub fn request_with(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let timeout = Duration::from_secs(60);
    try_request_with(base, method, path, headers, body, timeout)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// A JSON request that may go unanswered: an error when tenantd refuses the connection or has
/// not answered within `timeout`.
#[allow(dead_code)] // the bench's soak calls replicas that may be down
pub fn try_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Reply> {
    let headers = [("Content-Type", "application/json")];
    try_request_with(base, method, path, &headers, body, timeout)
}

fn try_request_with(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Reply> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    // A server may answer (413) before reading a large body; a failed write is then fine.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let kind = std::io::ErrorKind::UnexpectedEof;
        let text = String::from_utf8_lossy(&raw);
        return Err(std::io::Error::new(
            kind,
            format!("no HTTP response: {text:?}"),
        ));
    }
    Ok(parse(&raw))
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status: status.expect("status code"),
        headers,
        body: raw[split + 4..].to_vec(),
    }
}
