//! Broker connections for the HTTP side — declaring, deleting, inspecting, publishing, and the
//! tenants' dead letters (`dead_letters`) — kept
//! in a small pool, so requests do not queue behind one another's round trips (a publish waits
//! for its confirm). A connection that failed is closed; the next call opens another.
//!
//! amiquip's calls have no timeout, and closing a channel or a connection waits for the broker's
//! answer: on a broker that hangs with its sockets open, or one that stops reading a publishing
//! connection (a memory or disk alarm) while it keeps heartbeating, a request would wait with
//! it. So these sessions ask for short heartbeats, and a failed session is aborted — its socket
//! shut down, which ends amiquip's I/O loop at once — rather than closed.

use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Connection, QueueDeleteOptions};
use anyhow::{Context, Result};
use parking_lot::Mutex;

use super::dead_letters::{self, Peeked, Progress, Shown};
use super::publisher::Unroutable;
use super::{declare_tenant_queues, is_not_found, is_unconfirmed, Brokers, Publisher, QueueType};
use crate::ids::TenantId;

/// A queue's depth and consumer count, as the broker reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub messages: u32,
    pub consumers: u32,
}

/// The error of a call tried on a kept session, then on a fresh one: both told, the one saying
/// a publish may have reached its queue kept as the cause (callers look for it).
fn tried_twice(first: anyhow::Error, second: anyhow::Error) -> anyhow::Error {
    match is_unconfirmed(&first) && !is_unconfirmed(&second) {
        true => first.context(format!("then on a fresh connection: {second:#}")),
        false => second.context(format!("{first:#}; then on a fresh connection")),
    }
}

/// Sessions kept open beyond this many are closed when returned.
const MAX_IDLE: usize = 8;

/// Heartbeats asked for on the API's sessions, at most (`BROKER_HEARTBEAT_SECS` if shorter, none
/// if it is 0): a hung broker fails a call waiting for its answer within 2 to 4 intervals. The
/// API holds a few connections, so short intervals cost nothing that matters.
pub const API_HEARTBEAT_SECS: u16 = 5;

pub struct BrokerAdmin {
    brokers: Brokers,
    queue_type: QueueType,
    timeout: Duration,
    idle: Mutex<Vec<AdminSession>>,
}

struct AdminSession {
    // Field order: the channel closes before its connection.
    channel: Channel,
    publisher: Publisher,
    connection: Connection,
    /// The connection's socket, to abort it.
    socket: TcpStream,
}

impl AdminSession {
    fn open(brokers: &Brokers, timeout: Duration) -> Result<AdminSession> {
        let (mut connection, socket) = brokers.connect_abortable(timeout, "tenantd admin")?;
        let channel = connection.open_channel(None)?;
        let publisher = Publisher::enable(&channel, timeout)?;
        Ok(AdminSession {
            channel,
            publisher,
            connection,
            socket,
        })
    }

    fn close(self) {
        let _ = self.channel.close();
        let _ = self.connection.close();
    }

    /// Ends a session that failed without waiting for its broker, which may not answer a close
    /// (hung, or blocked by an alarm) for as long as it lasts.
    fn abort(self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        self.close();
    }
}

impl BrokerAdmin {
    /// Connects now, so a wrong `RABBITMQ_URL` fails at start rather than at the first request.
    pub fn connect(brokers: Brokers, queue_type: QueueType, timeout: Duration) -> Result<Self> {
        let brokers = brokers.with_heartbeat_at_most(API_HEARTBEAT_SECS);
        let session = AdminSession::open(&brokers, timeout)?;
        Ok(BrokerAdmin {
            brokers,
            queue_type,
            timeout,
            idle: Mutex::new(vec![session]),
        })
    }

    /// Runs `op` on a session of the pool; once more on a fresh one when a kept session had
    /// gone stale (the broker restarted, say) and the error is not the broker's answer.
    fn with_session<T>(&self, op: impl Fn(&mut AdminSession) -> Result<T>) -> Result<T> {
        let kept = self.idle.lock().pop();
        let was_kept = kept.is_some();
        let session = match kept {
            Some(session) => session,
            None => AdminSession::open(&self.brokers, self.timeout)?,
        };
        match self.attempt(session, &op) {
            Err(first) if was_kept && !is_answer(&first) => {
                let retried = AdminSession::open(&self.brokers, self.timeout)
                    .and_then(|session| self.attempt(session, &op));
                retried.map_err(|second| tried_twice(first, second))
            }
            result => result,
        }
    }

    /// Runs `op`, then returns the session to the pool, or closes it when its channel may be
    /// broken (every error but an unroutable message leaves it so).
    fn attempt<T>(
        &self,
        mut session: AdminSession,
        op: &impl Fn(&mut AdminSession) -> Result<T>,
    ) -> Result<T> {
        let result = op(&mut session);
        let healthy = result
            .as_ref()
            .map_or_else(|e| e.is::<Unroutable>(), |_| true);
        let mut idle = self.idle.lock();
        if healthy && idle.len() < MAX_IDLE {
            idle.push(session);
        } else if healthy {
            drop(idle);
            session.close();
        } else {
            drop(idle);
            session.abort();
        }
        result
    }

    /// Succeeds when the broker answers a request now, on a connection that works.
    pub fn ping(&self) -> Result<()> {
        self.with_session(|s| {
            s.channel.exchange_declare_passive("amq.direct")?;
            Ok(())
        })
    }

    pub fn declare_queues(&self, id: TenantId) -> Result<()> {
        self.with_session(|s| declare_tenant_queues(&mut s.connection, id, self.queue_type))
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
    /// Fails with `Unroutable` when the queue does not exist (the broker returns the message).
    pub fn publish(&self, id: TenantId, body: &[u8], message_id: &str) -> Result<()> {
        self.with_session(|s| {
            let properties = AmqpProperties::default()
                .with_message_id(message_id.to_string())
                .with_content_type("application/json".to_string())
                .with_delivery_mode(2);
            let queue = id.queue_name();
            s.publisher.publish(&s.channel, &queue, body, properties)
        })
    }

    /// The tenant's dead letters after the first `skip`, at most `limit` and within `shown`,
    /// left in place.
    pub fn peek_dead_letters(
        &self,
        id: TenantId,
        skip: u64,
        limit: u64,
        shown: Shown,
    ) -> Result<Peeked> {
        self.with_session(|s| dead_letters::peek(&mut s.connection, id, skip, limit, shown))
    }

    /// Moves up to `limit` dead letters (`None`: all) back to the tenant's queue, confirmed
    /// before acked; `progress` counts them. Returns the letters left.
    pub fn replay_dead_letters(
        &self,
        id: TenantId,
        limit: Option<u64>,
        progress: &Progress,
    ) -> Result<u32> {
        self.with_session(|s| {
            dead_letters::replay(&mut s.connection, id, limit, self.timeout, progress)
        })
    }

    /// Drops up to `limit` dead letters (`None`: all); `progress` counts them. Returns the
    /// letters left.
    pub fn drop_dead_letters(
        &self,
        id: TenantId,
        limit: Option<u64>,
        progress: &Progress,
    ) -> Result<u32> {
        self.with_session(|s| dead_letters::drop_letters(&mut s.connection, id, limit, progress))
    }
}

/// Whether the error is the broker's answer to this request (a missing queue), as opposed to a
/// broken session that a fresh one might not have.
fn is_answer(e: &anyhow::Error) -> bool {
    e.is::<Unroutable>() || is_not_found(e)
}

impl Drop for BrokerAdmin {
    fn drop(&mut self) {
        for session in self.idle.lock().drain(..) {
            session.close();
        }
    }
}
