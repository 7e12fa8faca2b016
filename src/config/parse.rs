//! How each setting's text becomes a value within its bounds: one small function per kind of
//! value, named in the settings table beside the setting it reads.
//!
//! A refusal is the rest of a sentence that starts with the setting's name: `="x" is not a
//! number`, or ` must be at least 32 bytes` for a secret, whose value is never repeated.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use log::LevelFilter;

pub type Parsed<T> = Result<T, String>;

/// RabbitMQ's largest `max_message_size` (512 MiB): no message can be larger.
pub const MAX_BROKER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// A credential shorter than this is refused: for an HS256 secret, RFC 7518 3.2 asks for a key
/// as long as the hash, 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;

fn bad(raw: &str, what: impl std::fmt::Display) -> String {
    format!("={raw:?} {what}")
}

pub fn text(raw: &str) -> Parsed<String> {
    Ok(raw.to_string())
}

pub fn optional(raw: &str) -> Parsed<Option<String>> {
    Ok(Some(raw.to_string()).filter(|s| !s.is_empty()))
}

pub fn optional_path(raw: &str) -> Parsed<Option<PathBuf>> {
    Ok(optional(raw)?.map(PathBuf::from))
}

/// A credential: unset, or at least `MIN_SECRET_BYTES`.
pub fn secret(raw: &str) -> Parsed<Option<String>> {
    if !raw.is_empty() && raw.len() < MIN_SECRET_BYTES {
        return Err(format!(
            " must be at least {MIN_SECRET_BYTES} bytes (`openssl rand -hex 32` makes one)"
        ));
    }
    optional(raw)
}

/// `host:port`, resolved now: a start that cannot listen is refused before it connects.
pub fn socket_addr(raw: &str) -> Parsed<String> {
    use std::net::ToSocketAddrs;
    match raw.to_socket_addrs().map(|mut addrs| addrs.next()) {
        Ok(Some(_)) => Ok(raw.to_string()),
        _ => Err(bad(raw, "is not an address to listen on (host:port)")),
    }
}

/// `0` or `1`.
pub fn flag(raw: &str) -> Parsed<bool> {
    match raw.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(raw, "is neither 0 nor 1")),
    }
}

/// A number within `range`.
pub fn number<T>(raw: &str, range: RangeInclusive<T>) -> Parsed<T>
where
    T: FromStr + PartialOrd + std::fmt::Display,
{
    let n: T = raw
        .trim()
        .parse()
        .map_err(|_| bad(raw, "is not a valid number"))?;
    if n < *range.start() {
        return Err(bad(raw, format_args!("must be at least {}", range.start())));
    }
    if n > *range.end() {
        return Err(bad(raw, format_args!("must be at most {}", range.end())));
    }
    Ok(n)
}

/// A message size: RabbitMQ takes none larger than its largest `max_message_size`.
pub fn message_bytes(raw: &str) -> Parsed<usize> {
    number(raw, 1..=MAX_BROKER_MESSAGE_BYTES).map_err(|refusal| {
        format!("{refusal} (RabbitMQ's largest max_message_size is {MAX_BROKER_MESSAGE_BYTES})")
    })
}

/// Whole seconds within `range`.
pub fn secs(raw: &str, range: RangeInclusive<u64>) -> Parsed<Duration> {
    number(raw, range).map(Duration::from_secs)
}

/// Milliseconds within `range`.
pub fn millis(raw: &str, range: RangeInclusive<u64>) -> Parsed<Duration> {
    number(raw, range).map(Duration::from_millis)
}

/// A number of threads, or `cpus`: one per CPU (at least two). On a small machine that shares
/// its cores with PostgreSQL and RabbitMQ, more threads only add contention.
pub fn threads(raw: &str) -> Parsed<usize> {
    if raw.trim() == "cpus" {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        return Ok(cpus.max(2));
    }
    number(raw, 1..=usize::MAX).map_err(|_| bad(raw, "is not a number of at least 1, or `cpus`"))
}

/// `2000,4000,8000` → three delays; `none` → no retries.
pub fn delays(raw: &str) -> Parsed<Vec<Duration>> {
    if raw.trim() == "none" {
        return Ok(Vec::new());
    }
    raw.split(',')
        .map(|part| part.trim().parse().map(Duration::from_millis))
        .collect::<Result<_, _>>()
        .map_err(|_| bad(raw, "is not a list of milliseconds"))
}

pub fn log_level(raw: &str) -> Parsed<LevelFilter> {
    raw.parse().map_err(|_| bad(raw, "is not a log level"))
}

pub fn log_format(raw: &str) -> Parsed<crate::logging::Format> {
    match raw {
        "text" => Ok(crate::logging::Format::Text),
        "json" => Ok(crate::logging::Format::Json),
        _ => Err(bad(raw, "is neither text nor json")),
    }
}

pub fn queue_type(raw: &str) -> Parsed<crate::broker::QueueType> {
    match raw {
        "classic" => Ok(crate::broker::QueueType::Classic),
        "quorum" => Ok(crate::broker::QueueType::Quorum),
        _ => Err(bad(raw, "is neither classic nor quorum")),
    }
}

/// Web origins, `scheme://host[:port]` each, lowercased; comma-separated.
pub fn origins(raw: &str) -> Parsed<Vec<String>> {
    raw.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let lower = origin.to_ascii_lowercase();
            let rest = lower
                .strip_prefix("https://")
                .or_else(|| lower.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']) => {
                    Ok(lower)
                }
                _ => Err(format!(
                    ": {origin:?} is not an origin (scheme://host[:port], no path)"
                )),
            }
        })
        .collect()
}

/// This replica's name, or `<hostname>-<6 hex>`: unique per process, and says where it runs.
pub fn replica_id(raw: &str) -> Parsed<String> {
    if !raw.trim().is_empty() {
        return Ok(raw.to_string());
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tenantd".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    Ok(format!("{host}-{}", &random[..6]))
}
