//! What every answered request leaves behind, whoever answered it (a route or the guard): its
//! request id, a log line, and its place in the request counter and latency histogram.

use log::{log, Level};

use super::routes;
use crate::metrics::Metrics;

/// The caller's `X-Request-Id` when it is a sane token, else a new one.
pub fn request_id(given: Option<&str>) -> String {
    match given {
        Some(id)
            if !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) =>
        {
            id.to_string()
        }
        _ => uuid::Uuid::new_v4().simple().to_string(),
    }
}

/// What every answered request gets, whoever answered it (a route or the guard): a log line
/// and its place in the request counter and latency histogram.
pub fn record(
    metrics: &Metrics,
    method: &str,
    path: &str,
    status: u16,
    elapsed: std::time::Duration,
    note: Option<&str>,
) {
    let route = routes::label(path);
    metrics
        .http_requests
        .with_label_values(&[route, &status.to_string()])
        .inc();
    let seconds = elapsed.as_secs_f64();
    metrics
        .http_seconds
        .with_label_values(&[route])
        .observe(seconds);
    let ms = seconds * 1000.0;
    // Probes come every few seconds (the unit's watchdog, a load balancer): when they succeed
    // they say nothing an operator reads, so they stay out of the log at the default level.
    let level = match route {
        "/healthz" | "/readyz" | "/metrics" if status < 400 => Level::Debug,
        _ => Level::Info,
    };
    match note {
        Some(note) => log!(level, "{method} {path} -> {status} in {ms:.1} ms ({note})"),
        None => log!(level, "{method} {path} -> {status} in {ms:.1} ms"),
    }
}
