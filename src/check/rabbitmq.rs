//! RabbitMQ as `tenantd check` sees it: whether each broker of `RABBITMQ_URL` takes an AMQP
//! connection with the configured credentials, and how many connections it allows — from its
//! management API when that answers (the broker's host, port 15672, the same credentials), else,
//! for a broker running on this host, from its process's file limit by RabbitMQ's own rule.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use amiquip::AmqpValue;
use anyhow::{bail, Context, Result};
use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::host::{soft_limit, Bound};
use super::table::count;
use crate::broker::{self, BrokerAddr, Brokers};

/// Where the management plugin listens by default, on the broker's host.
pub const MANAGEMENT_PORT: u16 = 15672;

/// Each request to the management API gets this long.
const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(2);

/// RabbitMQ 3 keeps 100 descriptors for itself and gives sockets 90 % of the rest.
const RESERVED_FDS: u64 = 100;

/// One broker of `RABBITMQ_URL`, and its version when it took a connection.
pub struct Reached {
    pub broker: String,
    pub version: Result<String>,
}

/// Opens (and closes) one AMQP connection to each broker.
pub fn reach(brokers: &Brokers, timeout: Duration) -> Vec<Reached> {
    let version = |addr: &BrokerAddr| -> Result<String> {
        let connection = broker::connect(addr, timeout, "tenantd check")?;
        let version = match connection.server_properties().get("version") {
            Some(AmqpValue::LongString(v)) => v.clone(),
            _ => "version unknown".into(),
        };
        let _ = connection.close();
        Ok(version)
    };
    brokers
        .addrs()
        .iter()
        .map(|addr| Reached {
            broker: addr.describe(),
            version: version(addr),
        })
        .collect()
}

/// How many connections the brokers of `RABBITMQ_URL` allow in all, and how that was found.
pub struct Connections {
    pub limit: Bound,
    /// "sockets" (RabbitMQ 3) or "file descriptors" (RabbitMQ 4, which has no socket limit).
    pub unit: &'static str,
    pub source: String,
}

/// The brokers' connection limit, or why it could not be told. `version` is that of a broker
/// that took a connection (`None`: none did, and nothing is asked).
pub fn connection_limit(brokers: &Brokers, version: Option<&str>) -> Result<Connections, String> {
    if version.is_none() {
        return Err("RabbitMQ did not answer".into());
    }
    from_management_api(brokers).or_else(|api| {
        from_local_process(brokers, version).map_err(|local| format!("{api:#}; {local:#}"))
    })
}

fn from_management_api(brokers: &Brokers) -> Result<Connections> {
    let mut total = 0;
    let mut unit = "sockets";
    for addr in brokers.addrs() {
        let overview = management_get(addr, "/api/overview")?;
        let node = overview["node"]
            .as_str()
            .context("the management API named no node")?;
        let path = format!("/api/nodes/{}", utf8_percent_encode(node, NON_ALPHANUMERIC));
        let stats = management_get(addr, &path)?;
        // RabbitMQ 4 reports 0 sockets: connections are bound by descriptors alone.
        let sockets = stats["sockets_total"].as_u64().filter(|n| *n > 0);
        let limit = match sockets {
            Some(n) => n,
            None => {
                unit = "file descriptors";
                stats["fd_total"]
                    .as_u64()
                    .context("the management API gave no socket or descriptor limit")?
            }
        };
        total += limit;
    }
    Ok(Connections {
        limit: Bound::At(total),
        unit,
        source: "management API".into(),
    })
}

/// `GET path` on the broker's management API, as JSON.
fn management_get(addr: &BrokerAddr, path: &str) -> Result<serde_json::Value> {
    let (user, password) = addr.credentials();
    let host = addr.host();
    let context = || format!("management API at {host}:{MANAGEMENT_PORT}");
    let target = (host, MANAGEMENT_PORT)
        .to_socket_addrs()
        .with_context(context)?
        .next()
        .with_context(context)?;
    let mut stream =
        TcpStream::connect_timeout(&target, MANAGEMENT_TIMEOUT).with_context(context)?;
    stream.set_read_timeout(Some(MANAGEMENT_TIMEOUT))?;
    stream.set_write_timeout(Some(MANAGEMENT_TIMEOUT))?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    // HTTP/1.0: the answer is the body up to the end of the connection, never chunked.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}:{MANAGEMENT_PORT}\r\n\
         Authorization: Basic {auth}\r\nAccept: application/json\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).with_context(context)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).with_context(context)?;
    parse_answer(&answer).with_context(context)
}

fn parse_answer(answer: &[u8]) -> Result<serde_json::Value> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no complete answer")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("answered {status:?}");
    }
    serde_json::from_slice(&answer[split + 4..]).context("answered something other than JSON")
}

/// The file limit of the RabbitMQ process on this host that listens on the broker's port (or
/// the only one, when the broker's address is loopback and which one listens cannot be seen).
fn from_local_process(brokers: &Brokers, version: Option<&str>) -> Result<Connections> {
    let [addr] = brokers.addrs() else {
        bail!("several brokers, none of whose management API answered");
    };
    let pids = rabbitmq_processes();
    let listening = listening_inodes(addr.port());
    let listener = pids.iter().find(|pid| holds_any(**pid, &listening));
    let pid = match (listener, pids.as_slice()) {
        (Some(pid), _) => *pid,
        (None, [only]) if is_loopback(addr.host()) => *only,
        (None, []) => bail!("no RabbitMQ process visible on this host"),
        (None, _) => bail!("cannot tell which RabbitMQ process on this host is the broker"),
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .with_context(|| format!("reading the limits of RabbitMQ (pid {pid})"))?;
    let files = soft_limit(&limits, "Max open files").context("no file limit")?;
    let rabbitmq_3 = version.is_none_or(|v| v.starts_with("3."));
    let (limit, unit) = match (files, rabbitmq_3) {
        (Bound::At(n), true) => (
            Bound::At(n.saturating_sub(RESERVED_FDS) * 9 / 10),
            "sockets",
        ),
        (bound, _) => (bound, "file descriptors"),
    };
    let source = match files {
        Bound::At(n) => format!("RabbitMQ pid {pid} here, {} open files", count(n)),
        Bound::Unlimited => format!("RabbitMQ pid {pid} here"),
    };
    Ok(Connections {
        limit,
        unit,
        source,
    })
}

/// Whether `host` names this host's loopback interface.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Processes of the Erlang VM that RabbitMQ runs in.
fn rabbitmq_processes() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "beam.smp")
        })
        .collect()
}

/// The socket inodes listening on TCP `port` (IPv4 and IPv6).
fn listening_inodes(port: u16) -> Vec<String> {
    let port = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| {
            let port = port.clone();
            table
                .lines()
                .skip(1)
                .filter_map(move |line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let listens = fields.get(3) == Some(&"0A");
                    let local = fields.get(1)?;
                    (listens && local.ends_with(&port))
                        .then(|| fields.get(9).map(|i| i.to_string()))?
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Whether the process holds one of these sockets (readable only for one's own processes, or
/// as root: otherwise false).
fn holds_any(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| {
            let target = target.to_string_lossy();
            inodes.iter().any(|i| target == format!("socket:[{i}]"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_of_the_management_api_is_read_as_json() {
        let ok =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"node\":\"rabbit@vm\"}";
        assert_eq!(parse_answer(ok).unwrap()["node"], "rabbit@vm");
        let denied = b"HTTP/1.1 401 Unauthorized\r\n\r\n{\"error\":\"not_authorised\"}";
        let err = parse_answer(denied).unwrap_err();
        assert!(format!("{err:#}").contains("401"), "{err:#}");
    }

    #[test]
    fn the_process_holding_a_listening_socket_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inodes = listening_inodes(listener.local_addr().unwrap().port());
        assert_eq!(inodes.len(), 1, "{inodes:?}");
        assert!(holds_any(std::process::id(), &inodes));
        assert!(!holds_any(std::process::id(), &["0".into()]));
    }
}
