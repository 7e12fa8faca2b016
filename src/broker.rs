//! Connections to RabbitMQ: opened with a timeout and TCP_NODELAY (amiquip sets neither), the
//! tenant queue's one declaration, and a shared admin connection for the HTTP side.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use amiquip::{
    AmqpProperties, AmqpValue, Auth, Channel, Confirm, Connection, ConnectionOptions,
    ConnectionTuning, FieldTable, Publish, Queue, QueueDeclareOptions, QueueDeleteOptions,
};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::Receiver;
use parking_lot::Mutex;

use crate::ids::TenantId;
use crate::url::percent_decode;

/// Where the broker is and who we are there, parsed from `RABBITMQ_URL`.
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
    pub fn parse(url: &str) -> Result<BrokerAddr> {
        let rest = url
            .strip_prefix("amqp://")
            .ok_or_else(|| anyhow!("RABBITMQ_URL must start with amqp://"))?;
        let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => u.split_once(':').unwrap_or((u, "")),
            None => ("guest", "guest"),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().context("RABBITMQ_URL has an invalid port")?),
            None => (hostport, 5672),
        };
        let vhost = percent_decode(vhost, false)?;
        Ok(BrokerAddr {
            host: if host.is_empty() {
                "localhost".into()
            } else {
                host.into()
            },
            port,
            user: percent_decode(user, false)?,
            password: percent_decode(password, false)?,
            vhost: if vhost.is_empty() { "/".into() } else { vhost },
        })
    }

    /// `host:port/vhost`, for messages: never the password.
    pub fn describe(&self) -> String {
        format!("{}:{} vhost {}", self.host, self.port, self.vhost)
    }
}

/// Opens a connection within `timeout` (TCP connect and AMQP handshake both), with TCP_NODELAY.
///
/// A broker out of file descriptors accepts TCP and never answers the handshake: the timeout
/// turns that hang into an error.
pub fn connect(addr: &BrokerAddr, timeout: Duration, label: &str) -> Result<Connection> {
    let stream = tcp_connect(addr, timeout)?;
    stream.set_nodelay(true)?;
    let stream = mio::net::TcpStream::from_stream(stream)?;
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: addr.user.clone(),
            password: addr.password.clone(),
        })
        .virtual_host(addr.vhost.clone())
        .connection_timeout(Some(timeout))
        .information(Some(label.to_string()));
    Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
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

/// Declares the tenant's durable queue. Every declarer goes through here, so the arguments
/// always match (RabbitMQ refuses a redeclaration with different ones).
///
/// A message the tenant thread rejects (it can never be stored) is dead-lettered by the broker
/// itself to `tenant_{id}_dlq`, atomically with the reject.
///
/// `tenant_{id}_retry` holds messages waiting for another attempt; each expires after its delay
/// and the broker dead-letters it back to the tenant's queue.
pub fn declare_tenant_queue(channel: &Channel, id: TenantId) -> Result<Queue<'_>> {
    declare(channel, id.dlq_name(), FieldTable::new())?;
    declare(channel, id.retry_name(), dead_letter_to(id.queue_name()))?;
    declare(channel, id.queue_name(), dead_letter_to(id.dlq_name()))
}

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

/// A queue's depth and consumer count, as the broker reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub messages: u32,
    pub consumers: u32,
}

/// One connection shared by the HTTP handlers for declaring, deleting, inspecting and publishing.
/// It reconnects on the next call after any failure.
pub struct BrokerAdmin {
    addr: BrokerAddr,
    timeout: Duration,
    session: Mutex<Option<AdminSession>>,
}

struct AdminSession {
    // Field order: the channel closes before its connection.
    channel: Channel,
    confirms: Receiver<Confirm>,
    last_tag: u64,
    connection: Connection,
}

impl AdminSession {
    fn open(addr: &BrokerAddr, timeout: Duration) -> Result<AdminSession> {
        let mut connection = connect(addr, timeout, "tenantd admin")?;
        let channel = connection.open_channel(None)?;
        channel.enable_publisher_confirms()?;
        let confirms = channel.listen_for_publisher_confirms()?;
        Ok(AdminSession {
            channel,
            confirms,
            last_tag: 0,
            connection,
        })
    }

    fn close(self) {
        let _ = self.channel.close();
        let _ = self.connection.close();
    }
}

impl BrokerAdmin {
    /// Connects now, so a wrong `RABBITMQ_URL` fails at start rather than at the first request.
    pub fn connect(addr: BrokerAddr, timeout: Duration) -> Result<BrokerAdmin> {
        let session = AdminSession::open(&addr, timeout)?;
        Ok(BrokerAdmin {
            addr,
            timeout,
            session: Mutex::new(Some(session)),
        })
    }

    pub fn addr(&self) -> &BrokerAddr {
        &self.addr
    }

    /// Runs `op` on the session, once more on a fresh one if a kept session had gone stale.
    fn with_session<T>(&self, op: impl Fn(&mut AdminSession) -> Result<T>) -> Result<T> {
        let mut guard = self.session.lock();
        let was_open = guard.is_some();
        match self.attempt(&mut guard, &op) {
            Err(_) if was_open => self.attempt(&mut guard, &op),
            result => result,
        }
    }

    fn attempt<T>(
        &self,
        slot: &mut Option<AdminSession>,
        op: &impl Fn(&mut AdminSession) -> Result<T>,
    ) -> Result<T> {
        if slot.is_none() {
            *slot = Some(AdminSession::open(&self.addr, self.timeout)?);
        }
        let session = slot.as_mut().expect("session was just opened");
        let result = op(session);
        if result.is_err() {
            if let Some(session) = slot.take() {
                session.close();
            }
        }
        result
    }

    /// Succeeds when the broker answers (opening a connection if there is none).
    pub fn ping(&self) -> Result<()> {
        self.with_session(|_| Ok(()))
    }

    pub fn declare_queue(&self, id: TenantId) -> Result<()> {
        self.with_session(|s| declare_tenant_queue(&s.channel, id).map(drop))
    }

    /// Deletes every queue of the tenant; a queue already gone is not an error.
    pub fn delete_queues(&self, id: TenantId) -> Result<()> {
        self.with_session(|s| {
            for name in [id.queue_name(), id.retry_name(), id.dlq_name()] {
                s.channel
                    .queue_delete(name.clone(), QueueDeleteOptions::default())
                    .with_context(|| format!("deleting queue {name}"))?;
            }
            Ok(())
        })
    }

    /// The queue's depth and consumers, or `None` when the queue does not exist.
    pub fn queue_stats(&self, queue_name: &str) -> Result<Option<QueueStats>> {
        let result = self.with_session(|s| {
            let queue = s.channel.queue_declare_passive(queue_name)?;
            Ok(QueueStats {
                messages: queue.declared_message_count().unwrap_or(0),
                consumers: queue.declared_consumer_count().unwrap_or(0),
            })
        });
        match result {
            Ok(stats) => Ok(Some(stats)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes a persistent message to the tenant's queue and waits for the broker's confirm.
    pub fn publish(&self, id: TenantId, body: &[u8], message_id: &str) -> Result<()> {
        self.with_session(|s| {
            let properties = AmqpProperties::default()
                .with_message_id(message_id.to_string())
                .with_content_type("application/json".to_string())
                .with_delivery_mode(2);
            s.channel.basic_publish(
                "",
                Publish::with_properties(body, id.queue_name(), properties),
            )?;
            s.last_tag += 1;
            wait_for_confirm(&s.confirms, s.last_tag, self.timeout)
        })
    }
}

impl Drop for BrokerAdmin {
    fn drop(&mut self) {
        if let Some(session) = self.session.lock().take() {
            session.close();
        }
    }
}

/// Waits for the broker to confirm publish number `tag` of the channel.
pub fn wait_for_confirm(confirms: &Receiver<Confirm>, tag: u64, timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let confirm = confirms
            .recv_deadline(deadline)
            .map_err(|_| anyhow!("the broker did not confirm the publish in time"))?;
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

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<amiquip::Error>(),
            Some(amiquip::Error::ServerClosedChannel { code: 404, .. })
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn parses_a_named_vhost_and_default_port() {
        let a = BrokerAddr::parse("amqp://u:p%40ss@rabbit/prod").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.vhost.as_str()),
            ("rabbit", 5672, "prod")
        );
        assert_eq!(a.password, "p@ss");
    }

    #[test]
    fn refuses_other_schemes() {
        assert!(BrokerAddr::parse("http://x").is_err());
    }
}
