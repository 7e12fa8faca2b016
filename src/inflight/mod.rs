//! The book a tenant thread keeps of its deliveries between the broker and the database: which
//! wait, which are in the pool, which are committed and may be acked, and what becomes of a
//! message that failed (retry queue or DLQ, acked only once the broker holds the copy).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, AmqpValue, Channel, Delivery, FieldTable};
use anyhow::{Context, Result};
use crossbeam_channel::{after, never, Receiver, Sender};
use log::{info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::broker::headers::{
    attempts, replays, ATTEMPTS_HEADER, DEAD_LETTERED_AT_HEADER, REASON_HEADER, RETRY_AT_HEADER,
};
use crate::broker::Publisher;
use crate::ids::TenantId;
use crate::pool::{Batch, BatchDone, Item, Outcome, Poison, WorkerPool};
use crate::stats::TenantStats;
use crate::store::dead_letters::Ledger;
use unacked::Unacked;

mod unacked;

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;

/// What a book is kept for: the tenant, its concurrency on this channel, and the settings.
pub struct Book {
    pub tenant: TenantId,
    pub workers: u16,
    pub batch_size: usize,
    pub retry_delays: Vec<Duration>,
    pub stats: Arc<TenantStats>,
    /// Which messages are dead-lettered already.
    pub ledger: Arc<Ledger>,
}

/// Deliveries between the broker and the database: which wait, which are in the pool, which are
/// committed and not yet acked.
pub struct InFlight {
    tenant: TenantId,
    workers: usize,
    batch_size: usize,
    retry_delays: Vec<Duration>,
    stats: Arc<TenantStats>,
    ledger: Arc<Ledger>,
    reply: Sender<BatchDone>,
    /// Publishes retry and dead-letter copies on this channel, confirmed.
    publisher: Publisher,
    /// Accepted, not yet handed to the pool.
    waiting: VecDeque<Item>,
    /// Every delivery neither acked nor rejected (bodies moved into `Item`s); the committed
    /// ones wait for every lower tag so one `ack_multiple` settles them all.
    unacked: Unacked<Delivery>,
    /// Batches in the pool.
    busy: usize,
    /// While set (the database failed), nothing goes to the pool before it.
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
    /// The session is ending (a copy of a failed message was refused, or the drain is over):
    /// failed messages are left unacked, to come again on the next one, rather than copied.
    no_more_copies: bool,
}

impl InFlight {
    pub fn new(book: Book, reply: Sender<BatchDone>, publisher: Publisher) -> Self {
        InFlight {
            tenant: book.tenant,
            workers: usize::from(book.workers),
            batch_size: book.batch_size,
            retry_delays: book.retry_delays,
            stats: book.stats,
            ledger: book.ledger,
            reply,
            publisher,
            waiting: VecDeque::new(),
            unacked: Unacked::default(),
            busy: 0,
            retry_at: None,
            retry_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            no_more_copies: false,
        }
    }

    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Batches in the pool.
    pub fn in_pool(&self) -> usize {
        self.busy
    }

    /// Whether a delivery now could go to the pool at once. When not (every slot of the
    /// tenant busy, or the database failing), there is nothing to decide: deliveries wait in
    /// the consumer's channel, bounded by the prefetch, and are taken together later.
    pub fn can_dispatch(&self) -> bool {
        self.retry_at.is_none() && self.busy < self.workers
    }

    /// Takes deliveries (counting them once for the burst).
    pub fn accept(&mut self, deliveries: impl IntoIterator<Item = Delivery>) {
        let now = Instant::now();
        let mut taken = 0;
        for mut delivery in deliveries {
            let tag = delivery.delivery_tag();
            let item = Item {
                tag,
                id: message_id(&delivery),
                body: std::mem::take(&mut delivery.body),
                accepted: now,
            };
            self.waiting.push_back(item);
            self.unacked.push(tag, delivery);
            taken += 1;
        }
        self.stats.consumed(taken);
    }

    /// Fires when the database is to be tried again after a failure.
    pub fn retry_timer(&self) -> Receiver<Instant> {
        self.retry_at.map_or_else(never, |at| {
            after(at.saturating_duration_since(Instant::now()))
        })
    }

    /// The database may be tried again.
    pub fn retry_due(&mut self) {
        self.retry_at = None;
    }

    /// Hands what waits to the pool, a batch per free slot.
    pub fn dispatch(&mut self, pool: &WorkerPool) {
        if self.retry_at.is_some() {
            return;
        }
        while self.busy < self.workers && !self.waiting.is_empty() {
            let n = self.waiting.len().min(self.batch_size);
            pool.submit(Batch {
                tenant: self.tenant,
                workers: self.workers,
                items: self.waiting.drain(..n).collect(),
                reply: self.reply.clone(),
            });
            self.busy += 1;
        }
    }

    /// Takes what the workers replied (every reply already waiting, with `done` first) and acks
    /// what is committed with one `ack_multiple`: one wake of amiquip's I/O thread per burst.
    ///
    /// A copy the broker refuses fails it, but only after every reply is taken and what they
    /// committed is acked: the session then drains and ends, and only what is unacked comes
    /// again (a message without an id, delivered again after its commit, would be stored twice).
    pub fn complete(
        &mut self,
        channel: &Channel,
        done: BatchDone,
        also: impl IntoIterator<Item = BatchDone>,
    ) -> Result<()> {
        let mut settled = Ok(());
        for done in std::iter::once(done).chain(also) {
            let copied = self.settle(channel, done);
            settled = settled.and(copied);
        }
        let acked = self.ack_committed(channel);
        settled.and(acked)
    }

    /// The session's end. Replies that came too late for the drain (its deadline or the fence
    /// ended it) are recorded, their failed messages left unacked (no copy waits for a confirm
    /// past the deadline); then every committed delivery is acked: the run at the low end with
    /// one `ack_multiple`, each one past a delivery that will not commit now (a failed message
    /// left unacked, a batch waiting for the database) on its own.
    pub fn end(
        &mut self,
        channel: &Channel,
        late: impl IntoIterator<Item = BatchDone>,
    ) -> Result<()> {
        self.no_more_copies = true;
        for done in late {
            self.settle(channel, done)?;
        }
        self.ack_committed(channel)?;
        for delivery in self.unacked.take_every_committed() {
            delivery.ack(channel)?;
        }
        Ok(())
    }

    /// Records one reply: its rows are committed (or wait for the database again) before its
    /// failed messages are copied, so a refused copy holds back no commit.
    fn settle(&mut self, channel: &Channel, done: BatchDone) -> Result<()> {
        self.busy -= 1;
        self.record(done.outcome);
        if self.no_more_copies {
            return Ok(());
        }
        for poison in done.poison {
            if let Err(e) = self.retry_or_dead_letter(channel, poison) {
                self.no_more_copies = true;
                return Err(e);
            }
        }
        Ok(())
    }

    fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Stored { settled, inserted } => {
                // Only a batch that stored something says the database answers (one of failed
                // messages alone touched none: a dead letter waiting for the ledger backs off).
                if !settled.is_empty() {
                    self.retry_backoff.reset();
                }
                self.stats.stored(settled.len() as u64, inserted);
                self.unacked.commit(settled);
            }
            Outcome::Transient { items, error } => {
                let delay = self.retry_backoff.next();
                warn!(
                    tenant_id:% = self.tenant;
                    "storing {} messages failed, retrying in {delay:?}: {error}",
                    items.len()
                );
                for item in items.into_iter().rev() {
                    self.waiting.push_front(item);
                }
                self.retry_at = Some(Instant::now() + delay);
            }
        }
    }

    /// Sends a message that failed to the retry queue (it comes back after the delay for its
    /// attempt) or, after the last attempt, to the DLQ; acks it once the broker has the copy.
    fn retry_or_dead_letter(&mut self, channel: &Channel, poison: Poison) -> Result<()> {
        let Some(delivery) = self.unacked.remove(poison.tag) else {
            return Ok(());
        };
        let attempt = attempts(&delivery.properties) + 1;
        let properties = copy_properties(&delivery.properties, attempt, &poison);
        match self.retry_delays.get(attempt as usize - 1).copied() {
            Some(delay) => self.retry(channel, delivery, poison, properties, delay),
            None => self.dead_letter(channel, delivery, poison, properties),
        }
    }

    fn retry(
        &mut self,
        channel: &Channel,
        delivery: Delivery,
        poison: Poison,
        properties: AmqpProperties,
        delay: Duration,
    ) -> Result<()> {
        let attempt = attempts(&properties);
        let properties = with_time(properties, RETRY_AT_HEADER, delay);
        let queue = self.tenant.retry_name();
        self.copy_then_ack(channel, delivery, &poison, properties, &queue)?;
        self.stats.retried();
        warn!(
            tenant_id:% = self.tenant;
            "message failed (attempt {attempt}), retrying in {delay:?}: {}",
            poison.reason
        );
        Ok(())
    }

    /// Dead-letters a message once: its record in the ledger commits only after the broker
    /// confirmed its letter, and a copy of a message already recorded is acked without a letter.
    /// While the ledger cannot be reached the message waits, unacked, and is tried again.
    fn dead_letter(
        &mut self,
        channel: &Channel,
        delivery: Delivery,
        poison: Poison,
        properties: AmqpProperties,
    ) -> Result<()> {
        let attempt = attempts(&properties);
        if self.retry_at.is_some() {
            // The database failed a moment ago (this burst's store or ledger): the message waits
            // with the rest, rather than each failed message waiting on the ledger in turn.
            self.wait_for_database(delivery, poison);
            return Ok(());
        }
        // The id the message is stored under: the publisher's when it is a UUID (every copy of
        // the message shares it), else one of its own (as its rows are), so that two messages
        // under one such id are two letters.
        let id = poison.id.to_string();
        let ledger = self.ledger.clone();
        let pending = match ledger.begin(self.tenant, &id, replays(&properties)) {
            Ok(Some(pending)) => pending,
            Ok(None) => {
                delivery.ack(channel)?;
                info!(
                    tenant_id:% = self.tenant;
                    "message {id} is dead-lettered already: this copy is dropped"
                );
                return Ok(());
            }
            Err(e) => {
                self.put_back(delivery, poison, &e);
                return Ok(());
            }
        };
        let properties = with_time(properties, DEAD_LETTERED_AT_HEADER, Duration::ZERO);
        let queue = self.tenant.dlq_name();
        let delivery = self.copy(channel, delivery, &poison, properties, &queue)?;
        // Recorded before the ack: an ack lost with the connection leaves a redelivery that
        // finds the record.
        if let Err(e) = pending.commit() {
            // The letter is in the DLQ: only a copy of it arriving later could be lettered again.
            warn!(tenant_id:% = self.tenant; "message {id} is dead-lettered but not recorded: {e:#}");
        }
        delivery.ack(channel)?;
        self.stats.dead_lettered();
        warn!(
            tenant_id:% = self.tenant;
            "message dead-lettered after {attempt} attempt{}: {}",
            if attempt == 1 { "" } else { "s" },
            poison.reason
        );
        Ok(())
    }

    /// Publishes the copy (confirmed), then acks the original.
    fn copy_then_ack(
        &mut self,
        channel: &Channel,
        delivery: Delivery,
        poison: &Poison,
        properties: AmqpProperties,
        queue: &str,
    ) -> Result<()> {
        let delivery = self.copy(channel, delivery, poison, properties, queue)?;
        Ok(delivery.ack(channel)?)
    }

    /// Publishes the copy and waits for the broker's confirm; the original is given back, to
    /// ack. A copy not confirmed leaves the original unacked: the session ends, the queues are
    /// declared again on the next one, and the message comes back.
    fn copy(
        &mut self,
        channel: &Channel,
        delivery: Delivery,
        poison: &Poison,
        properties: AmqpProperties,
        queue: &str,
    ) -> Result<Delivery> {
        let published = self
            .publisher
            .publish(channel, queue, &poison.body, properties)
            .with_context(|| format!("copying a failed message to {queue}"));
        match published {
            Ok(()) => Ok(delivery),
            Err(e) => {
                self.unacked.push(poison.tag, delivery);
                Err(e)
            }
        }
    }

    /// Keeps a message that could not be dead-lettered now: unacked, waiting for the pool again
    /// after the database backoff (where it fails again and comes back here).
    fn put_back(&mut self, delivery: Delivery, poison: Poison, error: &anyhow::Error) {
        let delay = self.retry_backoff.next();
        warn!(
            tenant_id:% = self.tenant;
            "dead-lettering waits {delay:?}: the ledger of dead letters is unavailable: {error:#}"
        );
        self.wait_for_database(delivery, poison);
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Keeps a failed message unacked, first of what waits for the pool.
    fn wait_for_database(&mut self, delivery: Delivery, poison: Poison) {
        self.unacked.push(poison.tag, delivery);
        self.waiting.push_front(Item {
            tag: poison.tag,
            id: poison.id,
            body: poison.body,
            accepted: Instant::now(),
        });
    }

    /// Acks, with one `ack_multiple`, the longest run of committed deliveries at the low end.
    fn ack_committed(&mut self, channel: &Channel) -> Result<()> {
        match self.unacked.take_committed_run() {
            Some(delivery) => Ok(delivery.ack_multiple(channel)?),
            None => Ok(()),
        }
    }
}

/// The properties a retried or dead-lettered copy keeps (not the publisher's expiration, which
/// could make a dead letter vanish), plus the attempt count and the reason. A message published
/// without an id gets the one it would have been stored under, so its copies — and a replay of
/// it that a crash interrupts and repeats — are stored once.
fn copy_properties(original: &AmqpProperties, attempt: u32, poison: &Poison) -> AmqpProperties {
    let mut headers: FieldTable = original.headers().clone().unwrap_or_default();
    headers.remove(RETRY_AT_HEADER);
    headers.remove(DEAD_LETTERED_AT_HEADER);
    headers.insert(ATTEMPTS_HEADER.into(), AmqpValue::LongInt(attempt as i32));
    headers.insert(
        REASON_HEADER.into(),
        AmqpValue::LongString(poison.reason.clone()),
    );
    let id = match original.message_id() {
        Some(id) => id.clone(),
        None => poison.id.to_string(),
    };
    let mut copy = AmqpProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_message_id(id);
    if let Some(content_type) = original.content_type() {
        copy = copy.with_content_type(content_type.clone());
    }
    if let Some(correlation_id) = original.correlation_id() {
        copy = copy.with_correlation_id(correlation_id.clone());
    }
    if let Some(timestamp) = original.timestamp() {
        copy = copy.with_timestamp(*timestamp);
    }
    copy
}

/// Sets `header` to a time (Unix ms): now plus `delay` (when a retry is due back, when a dead
/// letter arrived).
fn with_time(properties: AmqpProperties, header: &str, delay: Duration) -> AmqpProperties {
    let at = std::time::SystemTime::now() + delay;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(header.into(), AmqpValue::LongLongInt(ms));
    properties.with_headers(headers)
}

/// The publisher's `message_id` when it is a UUID (so redeliveries are stored once), else a new
/// time-ordered id.
fn message_id(delivery: &Delivery) -> Uuid {
    delivery
        .properties
        .message_id()
        .as_deref()
        .and_then(|s| Uuid::parse_str(s).ok())
        .unwrap_or_else(Uuid::now_v7)
}
