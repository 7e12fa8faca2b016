//! One broker connection shared by the HTTP side for declaring, deleting, inspecting and
//! publishing. It reconnects on the next call after any failure.

use std::time::Duration;

use amiquip::{AmqpProperties, Channel, Connection, QueueDeleteOptions};
use anyhow::{Context, Result};
use parking_lot::Mutex;

use super::{declare_tenant_queues, is_not_found, Brokers, Publisher, QueueType};
use crate::ids::TenantId;

/// A queue's depth and consumer count, as the broker reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub messages: u32,
    pub consumers: u32,
}

/// The broker could not route a message: the queue it was sent to does not exist.
#[derive(Debug)]
pub struct Unroutable(pub String);

impl std::fmt::Display for Unroutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker could not route the message to {}", self.0)
    }
}

impl std::error::Error for Unroutable {}

pub struct BrokerAdmin {
    brokers: Brokers,
    queue_type: QueueType,
    timeout: Duration,
    session: Mutex<Option<AdminSession>>,
}

struct AdminSession {
    // Field order: the channel closes before its connection.
    channel: Channel,
    publisher: Publisher,
    connection: Connection,
}

impl AdminSession {
    fn open(brokers: &Brokers, timeout: Duration) -> Result<AdminSession> {
        let mut connection = brokers.connect(timeout, "tenantd admin")?;
        let channel = connection.open_channel(None)?;
        let publisher = Publisher::enable(&channel, timeout)?;
        Ok(AdminSession {
            channel,
            publisher,
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
    pub fn connect(brokers: Brokers, queue_type: QueueType, timeout: Duration) -> Result<Self> {
        let session = AdminSession::open(&brokers, timeout)?;
        Ok(BrokerAdmin {
            brokers,
            queue_type,
            timeout,
            session: Mutex::new(Some(session)),
        })
    }

    /// Runs `op` on the session, once more on a fresh one if a kept session had gone stale.
    fn with_session<T>(&self, op: impl Fn(&mut AdminSession) -> Result<T>) -> Result<T> {
        let mut guard = self.session.lock();
        let was_open = guard.is_some();
        match self.attempt(&mut guard, &op) {
            Err(e) if was_open && !is_answer(&e) => self.attempt(&mut guard, &op),
            result => result,
        }
    }

    fn attempt<T>(
        &self,
        slot: &mut Option<AdminSession>,
        op: &impl Fn(&mut AdminSession) -> Result<T>,
    ) -> Result<T> {
        if slot.is_none() {
            *slot = Some(AdminSession::open(&self.brokers, self.timeout)?);
        }
        let session = slot.as_mut().expect("session was just opened");
        let result = op(session);
        if result.as_ref().is_err_and(|e| !e.is::<Unroutable>()) {
            if let Some(session) = slot.take() {
                session.close();
            }
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
}

/// Whether the error is the broker's answer to this request (a missing queue), as opposed to a
/// broken session that a fresh one might not have.
fn is_answer(e: &anyhow::Error) -> bool {
    e.is::<Unroutable>() || is_not_found(e)
}

impl Drop for BrokerAdmin {
    fn drop(&mut self) {
        if let Some(session) = self.session.lock().take() {
            session.close();
        }
    }
}
