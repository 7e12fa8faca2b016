//! The tenant's retry relay: it consumes `tenant_{id}_retry` on a channel of its own, holds the
//! copy at the head until it is due, puts it back in the tenant's queue (confirmed) and only then
//! acks it. Retries so need nothing of the broker but queues — no per-message TTL and no
//! dead-lettering, which a quorum queue (RabbitMQ 3.10) can leave stuck after a leader change —
//! and a crash at any point leaves the copy in one queue or, at worst, in both.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Consumer, ConsumerMessage, ConsumerOptions, Delivery,
};
use anyhow::{bail, Context, Result};
use crossbeam_channel::{after, never, Receiver, RecvError};

use crate::broker::headers::RETRY_AT_HEADER;
use crate::broker::Publisher;
use crate::ids::TenantId;

pub struct Relay<'c> {
    tenant: TenantId,
    channel: &'c Channel,
    consumer: Consumer<'c>,
    publisher: Publisher,
    /// The copy taken from the retry queue, and when it is due.
    held: Option<(Delivery, Instant)>,
    /// The longest a copy is held: the largest configured retry delay.
    longest: Duration,
}

impl<'c> Relay<'c> {
    /// Starts consuming the retry queue on `channel`, which must serve nothing else (acks and
    /// prefetch are per channel and consumer). No copy is held longer than `longest` (the
    /// largest retry delay), whatever its due time says.
    pub fn start(
        channel: &'c Channel,
        tenant: TenantId,
        timeout: Duration,
        longest: Duration,
    ) -> Result<Self> {
        // One copy at a time: the head of the queue is the next to go back (a copy behind a
        // later one may come late, never early).
        channel.qos(0, 1, false)?;
        let publisher = Publisher::enable(channel, timeout)?;
        let consumer = channel
            .basic_consume(tenant.retry_name(), ConsumerOptions::default())
            .with_context(|| format!("consuming {}", tenant.retry_name()))?;
        Ok(Relay {
            tenant,
            channel,
            consumer,
            publisher,
            held: None,
            longest,
        })
    }

    pub fn deliveries(&self) -> &Receiver<ConsumerMessage> {
        self.consumer.receiver()
    }

    /// Fires when the held copy is due.
    pub fn timer(&self) -> Receiver<Instant> {
        match &self.held {
            Some((_, due)) => after(due.saturating_duration_since(Instant::now())),
            None => never(),
        }
    }

    /// Holds a copy until it is due.
    pub fn hold(&mut self, message: Result<ConsumerMessage, RecvError>) -> Result<()> {
        let delivery = match message {
            Ok(ConsumerMessage::Delivery(delivery)) => delivery,
            Ok(other) => bail!("the retry relay ended: {other:?}"),
            Err(_) => bail!("the retry relay ended: its channel closed"),
        };
        let due = due_at(&delivery, SystemTime::now(), self.longest);
        self.held = Some((delivery, due));
        Ok(())
    }

    /// Stops consuming: the held copy, unacked, goes back to the retry queue when the channel
    /// closes. Waits (until `deadline`) for the consumer's last message after the cancel: amiquip
    /// answers the cancel before it sends that message, and tears the whole connection down if
    /// the consumer is dropped in between.
    pub fn stop(self, deadline: Instant) {
        if self.consumer.cancel().is_err() {
            return;
        }
        let timeout = after(deadline.saturating_duration_since(Instant::now()));
        loop {
            crossbeam_channel::select! {
                recv(self.consumer.receiver()) -> message => match message {
                    Ok(ConsumerMessage::Delivery(_)) => {}
                    _ => return,
                },
                recv(timeout) -> _ => return,
            }
        }
    }

    /// Puts the held copy back in the tenant's queue, then acks it here.
    pub fn release(&mut self) -> Result<()> {
        let Some((delivery, _)) = self.held.take() else {
            return Ok(());
        };
        let mut properties = delivery.properties.clone();
        if let Some(mut headers) = properties.headers().clone() {
            headers.remove(RETRY_AT_HEADER);
            properties = properties.with_headers(headers);
        }
        let queue = self.tenant.queue_name();
        self.publisher
            .publish(self.channel, &queue, &delivery.body, properties)
            .with_context(|| format!("moving a retry back to {queue}"))?;
        delivery.ack(self.channel)?;
        Ok(())
    }
}

/// When a copy is due: its header's time, but no later than `longest` from `now` (the time was
/// set by the clock of the replica that published the copy, which may run ahead of this one's);
/// now when it has none (a copy from an older tenantd, which relied on the broker's
/// per-message TTL).
fn due_at(delivery: &Delivery, now: SystemTime, longest: Duration) -> Instant {
    Instant::now() + wait_for(&delivery.properties, now, longest)
}

/// How long a copy with these properties waits from `now`, at most `longest`.
fn wait_for(properties: &AmqpProperties, now: SystemTime, longest: Duration) -> Duration {
    let at = properties
        .headers()
        .as_ref()
        .and_then(|h| match h.get(RETRY_AT_HEADER) {
            Some(AmqpValue::LongLongInt(ms)) => Some(*ms),
            _ => None,
        });
    let Some(at) = at else {
        return Duration::ZERO;
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let wait = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
    Duration::from_millis(wait).min(longest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amiquip::FieldTable;

    fn due(at_ms: i64) -> AmqpProperties {
        let mut headers = FieldTable::new();
        headers.insert(RETRY_AT_HEADER.into(), AmqpValue::LongLongInt(at_ms));
        AmqpProperties::default().with_headers(headers)
    }

    #[test]
    fn a_copy_waits_until_due_but_never_longer_than_the_largest_delay() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now_ms = 1_000_000_000;
        let longest = Duration::from_secs(60);
        assert_eq!(
            wait_for(&due(now_ms + 5_000), now, longest),
            Duration::from_secs(5)
        );
        assert_eq!(wait_for(&due(now_ms - 5_000), now, longest), Duration::ZERO);
        // Published by a replica whose clock ran a day ahead.
        assert_eq!(wait_for(&due(now_ms + 86_400_000), now, longest), longest);
        assert_eq!(wait_for(&due(i64::MAX), now, longest), longest);
        assert_eq!(
            wait_for(&AmqpProperties::default(), now, longest),
            Duration::ZERO
        );
    }
}
