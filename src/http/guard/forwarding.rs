//! Passing a whole request to tiny_http on a private Unix connection of its own, and reading its
//! whole response back into memory at once: the request thread is free the moment it has
//! answered, however slowly the client then reads. The response is held within the budget of
//! responses (its address's fair share of it) and a cap per response; the connection ends with
//! the response, so no tiny_http thread ever waits on a client.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

use log::error;

use super::budget::{Budget, ClientKey, Reservation};
use super::reading::{Refusal, Request, CLIENT_HEADER, MAX_HEAD_BYTES};
use super::{FREE_RESPONSE_BYTES, MAX_RESPONSE_BYTES};

/// A response read whole, held until the client has taken it.
pub struct Held<'a> {
    pub bytes: Vec<u8>,
    /// The response lets the connection live.
    pub keep_alive: bool,
    _reservation: Reservation<'a>,
}

pub enum Answer<'a> {
    Held(Held<'a>),
    /// Not held: the client gets this instead (the request thread was let go at once).
    Refused(Refusal),
}

/// Sends the request, tagged with the client's address, and reads the response whole.
pub fn forward<'a>(
    request: &Request,
    client: ClientKey,
    upstream: &Path,
    responses: &'a Budget,
) -> io::Result<Answer<'a>> {
    let mut server = UnixStream::connect(upstream)?;
    let mut head = request.head[..request.head.len() - 2].to_vec(); // without its blank line
    head.extend_from_slice(format!("{CLIENT_HEADER}: {}\r\n\r\n", client.ip()).as_bytes());
    server.write_all(&head)?;
    server.write_all(&request.body)?;
    // The end of this connection tells tiny_http there is no other request on it: it answers
    // this one and closes, which ends the read.
    server.shutdown(Shutdown::Write)?;
    let mut bytes = Vec::with_capacity(4096);
    let (head_len, length, keep_alive) = read_head(&mut server, &mut bytes)?;
    // Without a Content-Length the response runs to the end of the connection: within the
    // bytes every connection may hold.
    let total = length.map_or(FREE_RESPONSE_BYTES.max(head_len), |l| head_len + l);
    if total > MAX_RESPONSE_BYTES {
        error!(
            "a response of {total} bytes to {} {} is larger than the {MAX_RESPONSE_BYTES} the \
             guard holds",
            request.method, request.path
        );
        let refusal = Refusal::new(500, "the response is larger than the guard holds");
        return Ok(Answer::Refused(refusal.about_request(request)));
    }
    let reservation = if total <= FREE_RESPONSE_BYTES {
        responses.hold_free(client, total)
    } else {
        match responses.take(client, total) {
            Some(reservation) => reservation,
            None => {
                let busy = Refusal::new(
                    503,
                    "too many responses wait for this address to read them; read those, or \
                     try again",
                );
                return Ok(Answer::Refused(busy.about_request(request)));
            }
        }
    };
    let wanted = total - bytes.len().min(total);
    bytes.reserve_exact(wanted);
    (&mut server).take(wanted as u64).read_to_end(&mut bytes)?;
    bytes.truncate(total);
    Ok(Answer::Held(Held {
        bytes,
        keep_alive: keep_alive && length.is_some(),
        _reservation: reservation,
    }))
}

/// Reads until the response head is complete: its length, its `Content-Length` and whether
/// it lets the connection live.
fn read_head(
    server: &mut UnixStream,
    bytes: &mut Vec<u8>,
) -> io::Result<(usize, Option<usize>, bool)> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(head) = parse_response_head(bytes) {
            return Ok(head);
        }
        if bytes.len() >= MAX_HEAD_BYTES {
            return Err(io::Error::other("the response head is too large"));
        }
        let n = server.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("no response"));
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

/// A complete response head: its length, `Content-Length`, and whether it lets the connection
/// live; `None` while incomplete.
fn parse_response_head(bytes: &[u8]) -> Option<(usize, Option<usize>, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some((bytes.len(), Some(0), false)),
    };
    let value = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let close = value("connection").is_some_and(|v| v.contains("close"));
    let length = value("content-length").and_then(|v| v.trim().parse().ok());
    Some((len, length, !close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_tells_the_length_and_whether_the_connection_lives() {
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"),
            Some((38, None, false))
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            Some((38, Some(5), true))
        );
        assert_eq!(parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Le"), None);
    }
}
