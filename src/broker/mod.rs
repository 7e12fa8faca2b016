//! Connections to RabbitMQ: one or several brokers (a cluster), opened with a timeout and
//! TCP_NODELAY (amiquip sets neither); the tenant queues' one declaration; the shared admin
//! connections of the HTTP side (`admin`) and what they do with dead letters (`dead_letters`).

mod admin;
mod dead_letters;
pub mod headers;
mod publisher;

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amiquip::{
    AmqpValue, Auth, Channel, Confirm, Connection, ConnectionOptions, ConnectionTuning, FieldTable,
    Queue, QueueDeclareOptions,
};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::Receiver;
use log::warn;
use percent_encoding::percent_decode_str;

pub use admin::{BrokerAdmin, QueueStats};
pub use dead_letters::{DeadLetter, Progress, Shown};
pub use publisher::{Publisher, Unroutable};

use crate::ids::TenantId;

/// One broker: where it is and who we are there, parsed from a `RABBITMQ_URL` entry.
#[derive(Clone, Debug)]
pub struct BrokerAddr {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
}

impl BrokerAddr {
    /// Parses `amqp://user:password@host:port/vhost` (vhost percent-encoded, `%2f` for `/`).
    pub fn parse(raw: &str) -> Result<BrokerAddr> {
        let url = url::Url::parse(raw.trim()).context("RABBITMQ_URL is not a valid URL")?;
        if url.scheme() != "amqp" {
            bail!("RABBITMQ_URL must start with amqp://");
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => "localhost".into(),
        };
        let decode = |s: &str| -> Result<String> {
            Ok(percent_decode_str(s)
                .decode_utf8()
                .context("RABBITMQ_URL is not UTF-8 once decoded")?
                .into_owned())
        };
        let (user, password) = match url.username() {
            "" => ("guest".to_string(), "guest".to_string()),
            user => (decode(user)?, decode(url.password().unwrap_or(""))?),
        };
        let vhost = decode(url.path().strip_prefix('/').unwrap_or(""))?;
        Ok(BrokerAddr {
            host,
            port: url.port().unwrap_or(5672),
            user,
            password,
            vhost: if vhost.is_empty() { "/".into() } else { vhost },
        })
    }

    /// `host:port vhost v`, for messages: never the password.
    pub fn describe(&self) -> String {
        format!("{}:{} vhost {}", self.host, self.port, self.vhost)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user and password, for the broker's management API.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.user, &self.password)
    }
}

/// The brokers of `RABBITMQ_URL` (comma-separated, e.g. the nodes of a cluster). Each new
/// connection starts with the next broker in turn, so tenants spread over the nodes, and goes on
/// to the others when one does not answer.
#[derive(Clone, Debug)]
pub struct Brokers {
    addrs: Arc<[BrokerAddr]>,
    next: Arc<AtomicUsize>,
    heartbeat_secs: u16,
}

impl Brokers {
    pub fn parse(urls: &str) -> Result<Brokers> {
        let addrs: Vec<BrokerAddr> = urls
            .split(',')
            .filter(|u| !u.trim().is_empty())
            .map(BrokerAddr::parse)
            .collect::<Result<_>>()?;
        if addrs.is_empty() {
            bail!("RABBITMQ_URL names no broker");
        }
        Ok(Brokers {
            addrs: addrs.into(),
            next: Arc::new(AtomicUsize::new(0)),
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
        })
    }

    pub fn addrs(&self) -> &[BrokerAddr] {
        &self.addrs
    }

    /// Asks the brokers for heartbeats every `secs` (0: none).
    pub fn with_heartbeat(mut self, secs: u16) -> Brokers {
        self.heartbeat_secs = secs;
        self
    }

    /// Asks for heartbeats at least every `secs`: shortens the interval, never turns them on.
    pub fn with_heartbeat_at_most(self, secs: u16) -> Brokers {
        let current = self.heartbeat_secs;
        match current {
            0 => self,
            _ => self.with_heartbeat(current.min(secs)),
        }
    }

    /// Opens a connection to the first broker that answers, starting with the next in turn.
    pub fn connect(&self, timeout: Duration, label: &str) -> Result<Connection> {
        self.connect_abortable(timeout, label)
            .map(|(connection, _)| connection)
    }

    /// Like `connect`, with a handle on the connection's socket: shutting it down ends the
    /// connection at once, where amiquip's close waits for a broker that may not answer.
    pub fn connect_abortable(
        &self,
        timeout: Duration,
        label: &str,
    ) -> Result<(Connection, TcpStream)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.addrs.len() {
            let addr = &self.addrs[(start + i) % self.addrs.len()];
            match connect_with(addr, timeout, self.heartbeat_secs, label) {
                Ok(connection) => return Ok(connection),
                Err(e) => errors.push(e),
            }
        }
        let mut errors = errors.into_iter();
        let first = errors.next().expect("at least one broker");
        Err(errors.fold(first, |acc, e| acc.context(format!("{e:#}"))))
    }
}

/// Heartbeats asked of the broker by default (`BROKER_HEARTBEAT_SECS`): a connection whose
/// broker goes silent (a hung node) is declared dead after two missed ones, failing whatever
/// waits on it, as amiquip's calls have no timeout of their own. Each heartbeat wakes a thread
/// per connection, so thousands of tenants make short intervals cost CPU.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 30;

/// TCP keepalives on broker sockets: a dead host or a cut path is noticed within ~25 s by the
/// kernel, at no cost to tenantd.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// Opens a connection within `timeout` (TCP connect and AMQP handshake both), with TCP_NODELAY
/// and keepalives, asking for the default heartbeats.
pub fn connect(addr: &BrokerAddr, timeout: Duration, label: &str) -> Result<Connection> {
    connect_with(addr, timeout, DEFAULT_HEARTBEAT_SECS, label).map(|(connection, _)| connection)
}

/// A broker out of file descriptors accepts TCP and never answers the handshake: the timeout
/// turns that hang into an error.
fn connect_with(
    addr: &BrokerAddr,
    timeout: Duration,
    heartbeat_secs: u16,
    label: &str,
) -> Result<(Connection, TcpStream)> {
    let stream = tcp_connect(addr, timeout)?;
    let socket = stream.try_clone()?;
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(3);
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    let stream = mio::net::TcpStream::from_stream(stream)?;
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: addr.user.clone(),
            password: addr.password.clone(),
        })
        .virtual_host(addr.vhost.clone())
        .connection_timeout(Some(timeout))
        .heartbeat(heartbeat_secs)
        .information(Some(label.to_string()));
    Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
        .map(|connection| (connection, socket))
        .with_context(|| format!("cannot open an AMQP connection to {}", addr.describe()))
}

fn tcp_connect(addr: &BrokerAddr, timeout: Duration) -> Result<TcpStream> {
    let mut last = None;
    let targets = (addr.host.as_str(), addr.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve RabbitMQ host {}", addr.host))?;
    for target in targets {
        match TcpStream::connect_timeout(&target, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    let err = last.map_or_else(|| anyhow!("no address"), anyhow::Error::from);
    Err(err.context(format!("cannot connect to RabbitMQ at {}", addr.describe())))
}

/// How the tenants' queues are declared: `classic` for a single broker, `quorum` for queues
/// replicated by a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// Declares the tenant's three durable queues, on a channel of their own: a queue declared
/// earlier with other arguments (another `QUEUE_TYPE`) makes the broker close the channel
/// (406), and is then used as it is.
///
/// `tenant_{id}_retry` holds messages waiting for another attempt; each expires after its delay
/// and the broker dead-letters it back to the tenant's queue. `tenant_{id}_dlq` holds those that
/// failed every attempt. Every declarer goes through here, so the arguments always match.
pub fn declare_tenant_queues(
    connection: &mut Connection,
    id: TenantId,
    queue_type: QueueType,
) -> Result<()> {
    let channel = connection.open_channel(None)?;
    let declared = declare_all(&channel, id, queue_type);
    match declared {
        Err(e) if is_precondition_failed(&e) => {
            warn!(tenant_id:% = id; "its queues exist with other arguments (QUEUE_TYPE changed, or a quorum DLQ declared without x-delivery-limit?); using them as they are: {e:#}");
            Ok(())
        }
        other => {
            let _ = channel.close();
            other
        }
    }
}

fn declare_all(channel: &Channel, id: TenantId, queue_type: QueueType) -> Result<()> {
    let typed = |mut arguments: FieldTable| {
        if queue_type == QueueType::Quorum {
            arguments.insert(
                "x-queue-type".into(),
                AmqpValue::LongString("quorum".into()),
            );
        }
        arguments
    };
    // The dead-letter arguments of the retry and main queues are those earlier versions
    // declared (a queue cannot be declared again with other arguments). Nothing uses them now:
    // retry copies carry no TTL and tenantd moves them back itself (`relay`).
    let retry = typed(dead_letter_to(id.queue_name()));
    declare(channel, id.retry_name(), retry)?;
    declare(
        channel,
        id.queue_name(),
        typed(dead_letter_to(id.dlq_name())),
    )?;
    // Last: a quorum DLQ declared without a delivery limit refuses these arguments (406), and
    // the queues above are then in place all the same.
    let mut dlq = typed(FieldTable::new());
    if queue_type == QueueType::Quorum {
        dlq.insert(
            "x-delivery-limit".into(),
            AmqpValue::LongInt(DLQ_DELIVERY_LIMIT),
        );
    }
    declare(channel, id.dlq_name(), dlq)?;
    Ok(())
}

/// A quorum queue drops a message delivered more often than its delivery limit (RabbitMQ 4:
/// 20 by default), and every look at dead letters delivers them. A DLQ's letters stay until
/// an operator moves them: its limit is one no look reaches.
const DLQ_DELIVERY_LIMIT: i32 = i32::MAX;

fn declare(channel: &Channel, name: String, arguments: FieldTable) -> Result<Queue<'_>> {
    let options = QueueDeclareOptions {
        durable: true,
        arguments,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.clone(), options)
        .with_context(|| format!("declaring queue {name}"))
}

/// Arguments making the broker dead-letter to `queue` through the default exchange.
fn dead_letter_to(queue: String) -> FieldTable {
    let mut arguments = FieldTable::new();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AmqpValue::LongString(String::new()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AmqpValue::LongString(queue),
    );
    arguments
}

/// Waits for the broker to confirm publish number `tag` of the channel.
/// The broker did not confirm a publish in time (or its connection died first): it may hold the
/// message all the same.
#[derive(Debug)]
pub struct Unconfirmed;

impl std::fmt::Display for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the broker did not confirm the publish in time")
    }
}

impl std::error::Error for Unconfirmed {}

/// Whether `e` says a publish may have reached its queue without a confirm.
pub fn is_unconfirmed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unconfirmed>())
}

fn wait_for_confirm(confirms: &Receiver<Confirm>, tag: u64, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let confirm = confirms.recv_deadline(deadline).map_err(|_| Unconfirmed)?;
        let (payload, acked) = match confirm {
            Confirm::Ack(p) => (p, true),
            Confirm::Nack(p) => (p, false),
        };
        let covers =
            payload.delivery_tag == tag || (payload.multiple && payload.delivery_tag > tag);
        if covers {
            if acked {
                return Ok(());
            }
            bail!("the broker refused the message");
        }
    }
}

fn closed_with(e: &anyhow::Error, code: u16) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<amiquip::Error>(),
            Some(amiquip::Error::ServerClosedChannel { code: c, .. }) if *c == code
        )
    })
}

/// A broker error as an operator reads it in `/readyz` and the consumers' state: amiquip's
/// words for a lost connection ("i/o loop dropped sending side of a channel") are its own.
pub fn in_plain_words(e: &anyhow::Error) -> String {
    use amiquip::Error as Kind;
    let lost = e
        .chain()
        .find_map(|cause| match cause.downcast_ref::<amiquip::Error>()? {
            Kind::EventLoopDropped
            | Kind::EventLoopClientDropped
            | Kind::UnexpectedSocketClose
            | Kind::ClientClosedChannel
            | Kind::ClientClosedConnection => Some("the connection to the broker was lost"),
            Kind::MissedServerHeartbeats => {
                Some("the broker stopped answering (its heartbeats were missed)")
            }
            _ => None,
        });
    match lost {
        Some(words) => format!("{e}: {words}"),
        None => format!("{e:#}"),
    }
}

/// The broker closed the channel because a queue does not exist (404).
pub fn is_not_found(e: &anyhow::Error) -> bool {
    closed_with(e, 404)
}

fn is_precondition_failed(e: &anyhow::Error) -> bool {
    closed_with(e, 406)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_said_in_plain_words() {
        let lost = anyhow::Error::new(amiquip::Error::EventLoopDropped).context("consuming");
        let said = in_plain_words(&lost);
        assert_eq!(said, "consuming: the connection to the broker was lost");
        let other = anyhow::anyhow!("refused").context("connecting");
        assert_eq!(in_plain_words(&other), "connecting: refused");
    }

    #[test]
    fn parses_the_default_url() {
        let a = BrokerAddr::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.vhost.as_str()),
            ("127.0.0.1", 5672, "/")
        );
        assert_eq!((a.user.as_str(), a.password.as_str()), ("guest", "guest"));
    }

    #[test]
    fn parses_a_named_vhost_default_port_and_escapes() {
        let a = BrokerAddr::parse("amqp://u:p%40ss@rabbit/prod").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.vhost.as_str()),
            ("rabbit", 5672, "prod")
        );
        assert_eq!(a.password, "p@ss");
    }

    #[test]
    fn parses_ipv6_hosts_and_lists_of_brokers() {
        let a = BrokerAddr::parse("amqp://guest:guest@[::1]:5673/%2f").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 5673));
        let b = Brokers::parse("amqp://h1:5681/%2f, amqp://h2:5682/%2f").unwrap();
        assert_eq!(b.addrs.len(), 2);
        assert_eq!(b.addrs[1].host, "h2");
    }

    #[test]
    fn refuses_other_schemes_and_empty_lists() {
        assert!(BrokerAddr::parse("http://x").is_err());
        assert!(Brokers::parse(" , ").is_err());
    }
}
