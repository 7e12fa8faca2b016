//! The HTTP edge: what a request costs through the guard and tiny_http, at a fixed rate on
//! kept-alive connections, for `GET /healthz` (the edge alone) and `POST
//! /api/tenants/{id}/messages` (the edge, a database read and a confirmed publish). Latency is
//! counted from when each request was due, so a stall shows even when the client waits.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::stack::Stack;
use crate::{percentile, Args, Report};

/// Client threads sharing the rate, each on its own kept-alive connection: enough that a
/// publish, which waits ~4 ms for the broker to persist and confirm it, is not queued behind
/// the previous one of the same client.
const CLIENTS: u64 = 16;

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    // The rate limiter's cost, never its limit (1,000 req/s from one address is past the
    // default).
    stack.start(&[
        ("RATE_LIMIT_PER_SEC", "1000000"),
        ("RATE_LIMIT_BURST", "1000000"),
    ]);
    let tenant = stack.create_tenant("edge", "inactive");
    let addr = stack.main().base.trim_start_matches("http://").to_string();
    let get = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_string();
    let body = r#"{"order": 42}"#;
    let post = format!(
        "POST /api/tenants/{tenant}/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for (name, request) in [("healthz", get), ("publish", post)] {
        let ms = at_rate(&addr, &request, args.rate, args.seconds);
        let (p50, p99) = (percentile(&ms, 0.5), percentile(&ms, 0.99));
        match name {
            "healthz" => {
                report.add("edge_healthz_p50_ms", p50, "ms");
                report.add("edge_healthz_p99_ms", p99, "ms");
            }
            _ => {
                report.add("edge_publish_p50_ms", p50, "ms");
                report.add("edge_publish_p99_ms", p99, "ms");
            }
        }
    }
}

/// Sends `request` at `rate` a second for `seconds`; each one's latency in ms.
fn at_rate(addr: &str, request: &str, rate: u64, seconds: u64) -> Vec<f64> {
    let per_client = rate / CLIENTS;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, request) = (addr.to_string(), request.to_string());
            std::thread::spawn(move || {
                // Staggered, so the clients' requests interleave evenly.
                let offset = Duration::from_secs_f64(i as f64 / rate as f64);
                client(&addr, &request, per_client, seconds, offset)
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

fn client(addr: &str, request: &str, rate: u64, seconds: u64, offset: Duration) -> Vec<f64> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let start = Instant::now() + offset;
    let mut latencies = Vec::with_capacity((rate * seconds) as usize);
    for n in 0..rate * seconds {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        stream.write_all(request.as_bytes()).unwrap();
        let status = read_response(&mut stream);
        assert!(status < 300, "the edge answered {status}");
        latencies.push(due.elapsed().as_secs_f64() * 1000.0);
    }
    latencies
}

/// Reads one response with a Content-Length body; its status.
fn read_response(stream: &mut TcpStream) -> u16 {
    let mut raw = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the connection closed");
        raw.extend_from_slice(&chunk[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if raw.len() >= end + 4 + length {
            return head[9..12].parse().unwrap();
        }
    }
}
