//! Passing a whole request to tiny_http on a private Unix connection of its own, and its
//! response back to the client. The connection ends with the response, so no tiny_http thread
//! ever waits on a client.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::reading::{Request, MAX_HEAD_BYTES};

/// Sends the request and copies the response; whether the response lets the connection live.
pub fn forward(request: &Request, upstream: &Path, client: &mut TcpStream) -> io::Result<bool> {
    let mut server = UnixStream::connect(upstream)?;
    server.write_all(&request.head)?;
    server.write_all(&request.body)?;
    // The end of this connection tells tiny_http there is no other request on it: it answers
    // this one and closes, which ends the copy.
    server.shutdown(Shutdown::Write)?;
    copy_response(&mut server, client)
}

fn copy_response(server: &mut UnixStream, client: &mut TcpStream) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let mut head = Vec::new();
    let mut keep_alive = None;
    loop {
        let n = server.read(&mut chunk)?;
        if n == 0 {
            return Ok(keep_alive.unwrap_or(false));
        }
        if keep_alive.is_none() && head.len() < MAX_HEAD_BYTES {
            head.extend_from_slice(&chunk[..n]);
            keep_alive = response_keeps_alive(&head);
        }
        client.write_all(&chunk[..n])?;
    }
}

/// Whether a complete response head lets the connection live; `None` while incomplete.
fn response_keeps_alive(bytes: &[u8]) -> Option<bool> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(false),
    }
    let close = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("connection")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("close")
    });
    Some(!close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_that_closes_ends_the_connection() {
        assert_eq!(
            response_keeps_alive(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
            Some(false)
        );
        assert_eq!(
            response_keeps_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Some(true)
        );
        assert_eq!(response_keeps_alive(b"HTTP/1.1 200 OK\r\nContent-Le"), None);
    }
}
