//! A tenant's consumer thread: one event loop that owns the tenant's broker connection and
//! channel, hands deliveries to the worker pool in batches, and acks only what was committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, Connection, Consumer, ConsumerMessage,
    ConsumerOptions, Delivery, FieldTable, Publish,
};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{after, bounded, never, select, unbounded, Receiver, Sender};
use log::{info, warn};
use uuid::Uuid;

use crate::broker::{self, BrokerAddr};
use crate::ids::TenantId;
use crate::metrics::metrics;
use crate::pool::{Batch, BatchDone, Item, Outcome, Poison, WorkerPool};
use crate::stats::TenantStats;

/// Header counting a message's failed attempts; it travels with the message, so the count
/// survives restarts.
const ATTEMPTS_HEADER: &str = "x-tenantd-attempts";
/// Header saying why the last attempt failed.
const REASON_HEADER: &str = "x-tenantd-reason";

/// What every tenant thread shares.
pub struct ConsumerContext {
    pub broker: BrokerAddr,
    pub connect_timeout: Duration,
    pub batch_size: usize,
    pub retry_delays: Vec<Duration>,
    pub pool: Arc<WorkerPool>,
}

impl ConsumerContext {
    fn prefetch(&self, workers: u16) -> u16 {
        (usize::from(workers) * self.batch_size).min(usize::from(u16::MAX)) as u16
    }
}

pub enum Control {
    /// Take no new deliveries, let the batches in the pool commit and ack, close, exit.
    Stop { deadline: Instant },
    /// Run this many batches at once from now on; prefetch follows.
    Resize(u16),
}

/// A running tenant thread: stopping it is sending `Stop`, then joining.
pub struct ConsumerHandle {
    control: Sender<Control>,
    thread: JoinHandle<()>,
}

impl ConsumerHandle {
    pub fn resize(&self, workers: u16) {
        let _ = self.control.send(Control::Resize(workers));
    }

    /// Asks the thread to drain and stop, and waits for it.
    pub fn stop(self, deadline: Instant) {
        self.request_stop(deadline);
        let name = self.thread.thread().name().unwrap_or("tenant").to_string();
        if !self.join() {
            warn!("thread {name} panicked");
        }
    }

    /// Asks the thread to drain and stop, without waiting.
    pub fn request_stop(&self, deadline: Instant) {
        let _ = self.control.send(Control::Stop { deadline });
    }

    /// Waits for the thread to end; false when it panicked.
    pub fn join(self) -> bool {
        self.thread.join().is_ok()
    }
}

/// A thread that was started and has not yet said whether its first session is up.
pub struct Starting {
    handle: ConsumerHandle,
    ready: Receiver<Result<()>>,
}

impl Starting {
    /// Waits until the consumer is registered with the broker, or for the reason it never was.
    pub fn wait(self, timeout: Duration) -> Result<ConsumerHandle> {
        let outcome = self
            .ready
            .recv_timeout(timeout)
            .map_err(|_| anyhow!("the consumer did not start in time"))
            .and_then(|r| r);
        match outcome {
            Ok(()) => Ok(self.handle),
            Err(e) => {
                self.handle.stop(Instant::now());
                Err(e)
            }
        }
    }
}

/// One tenant's thread: who it is, its concurrency, its counters.
pub struct TenantSpec {
    pub id: TenantId,
    pub workers: u16,
    pub stats: Arc<TenantStats>,
}

pub fn spawn(ctx: Arc<ConsumerContext>, spec: TenantSpec) -> Result<Starting> {
    let (control_tx, control_rx) = unbounded();
    let (ready_tx, ready_rx) = bounded(1);
    let thread = std::thread::Builder::new()
        .name(spec.id.thread_name())
        .spawn(move || run(&ctx, spec, &control_rx, ready_tx))
        .context("spawning a tenant thread")?;
    Ok(Starting {
        handle: ConsumerHandle {
            control: control_tx,
            thread,
        },
        ready: ready_rx,
    })
}

/// The thread's body: sessions, one per broker connection, until told to stop.
fn run(
    ctx: &ConsumerContext,
    mut spec: TenantSpec,
    control: &Receiver<Control>,
    ready: Sender<Result<()>>,
) {
    let id = spec.id;
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let result = run_session(ctx, &mut spec, control, &mut ready, &mut backoff);
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(Err(err));
            return;
        }
        let delay = backoff.next();
        warn!("tenant_id={id} consumer lost the broker, reconnecting in {delay:?}: {err:#}");
        match control.recv_timeout(delay) {
            Ok(Control::Resize(n)) => spec.workers = n,
            Ok(Control::Stop { .. }) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn run_session(
    ctx: &ConsumerContext,
    spec: &mut TenantSpec,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let label = format!("tenantd tenant {}", spec.id);
    let mut connection = broker::connect(&ctx.broker, ctx.connect_timeout, &label)?;
    let result = consume(ctx, spec, &mut connection, control, ready, backoff);
    let _ = connection.close();
    result
}

fn consume(
    ctx: &ConsumerContext,
    spec: &mut TenantSpec,
    connection: &mut Connection,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let id = spec.id;
    let channel = connection.open_channel(None)?;
    // Global: one limit for the channel, which a resize can change under the running consumer.
    channel.qos(0, ctx.prefetch(spec.workers), true)?;
    // Retries and dead letters are published here and acked only once the broker confirms them.
    channel.enable_publisher_confirms()?;
    let confirms = channel.listen_for_publisher_confirms()?;
    let queue = broker::declare_tenant_queue(&channel, id)?;
    let consumer = queue.consume(ConsumerOptions::default())?;
    info!(
        "consumer started tenant_id={id} consumer_tag={} prefetch={}",
        consumer.consumer_tag(),
        ctx.prefetch(spec.workers)
    );
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    backoff.reset();
    set_workers_gauge(id, spec.workers);
    let (reply_tx, reply_rx) = unbounded();
    let mut flight = InFlight::new(ctx, spec, reply_tx, confirms);
    let stop = event_loop(ctx, &channel, &consumer, &reply_rx, control, &mut flight);
    // A resize during this session applies to the next one too.
    spec.workers = flight.workers as u16;
    let stop = stop?;
    // Told to stop: from here on the session ends as stopped, whatever fails while closing,
    // so that a failed close is never mistaken for a lost connection and reconnected.
    let drained = drain(&channel, &consumer, &reply_rx, &mut flight, stop);
    drop(consumer);
    drop(queue);
    let closed = drained.and_then(|()| Ok(channel.close()?));
    if let Err(e) = closed {
        warn!("tenant_id={id} closing the consumer failed (unacked messages go back to the queue): {e:#}");
    }
    info!("consumer stopped tenant_id={id}");
    Ok(())
}

/// Runs until told to stop (returns the drain deadline) or until the broker session fails.
fn event_loop(
    ctx: &ConsumerContext,
    channel: &Channel,
    consumer: &Consumer,
    replies: &Receiver<BatchDone>,
    control: &Receiver<Control>,
    flight: &mut InFlight,
) -> Result<Instant> {
    loop {
        let retry = flight.retry_at.map_or_else(never, |at| {
            after(at.saturating_duration_since(Instant::now()))
        });
        select! {
            recv(consumer.receiver()) -> message => {
                flight.accept(delivery_of(message)?);
                // Take what else is already waiting, so a busy queue makes full batches.
                while flight.waiting.len() < flight.batch_size {
                    match consumer.receiver().try_recv() {
                        Ok(message) => flight.accept(delivery_of(Ok(message))?),
                        Err(_) => break,
                    }
                }
            }
            recv(replies) -> done => {
                flight.complete(channel, done.context("worker replies closed")?)?;
            }
            recv(control) -> command => match command {
                Ok(Control::Resize(n)) => {
                    channel.qos(0, ctx.prefetch(n), true)?;
                    info!("concurrency changed tenant_id={} {} -> {n}", flight.tenant, flight.workers);
                    flight.workers = usize::from(n);
                    set_workers_gauge(flight.tenant, n);
                }
                Ok(Control::Stop { deadline }) => return Ok(deadline),
                Err(_) => return Ok(Instant::now()),
            },
            recv(retry) -> _ => flight.retry_at = None,
        }
        flight.dispatch(&ctx.pool);
    }
}

fn set_workers_gauge(id: TenantId, workers: u16) {
    let label = id.to_string();
    metrics()
        .workers
        .with_label_values(&[label.as_str()])
        .set(i64::from(workers));
}

fn delivery_of(message: Result<ConsumerMessage, crossbeam_channel::RecvError>) -> Result<Delivery> {
    match message {
        Ok(ConsumerMessage::Delivery(delivery)) => Ok(delivery),
        Ok(other) => bail!("consumer ended: {other:?}"),
        Err(_) => bail!("consumer ended: its channel closed"),
    }
}

/// Stops taking deliveries and waits (until `deadline`) for the pool to finish what it holds and
/// for the broker to confirm the cancel (the consumer must outlive that confirmation, or amiquip
/// fails the whole connection). What is unacked after that is requeued when the channel closes.
fn drain(
    channel: &Channel,
    consumer: &Consumer,
    replies: &Receiver<BatchDone>,
    flight: &mut InFlight,
    deadline: Instant,
) -> Result<()> {
    consumer.cancel()?;
    let mut cancelled = false;
    let timeout = after(deadline.saturating_duration_since(Instant::now()));
    while flight.busy > 0 || !cancelled {
        select! {
            recv(replies) -> done => flight.complete(channel, done.context("worker replies closed")?)?,
            recv(consumer.receiver()) -> message => match message {
                // Deliveries that raced the cancel stay unacked and go back to the queue.
                Ok(ConsumerMessage::Delivery(_)) => {}
                _ => cancelled = true,
            },
            recv(timeout) -> _ => {
                warn!(
                    "tenant_id={} stop deadline passed with {} batches in flight; they will be redelivered",
                    flight.tenant, flight.busy
                );
                break;
            }
        }
    }
    Ok(())
}

/// Deliveries between the broker and the database: which wait, which are in the pool, which are
/// committed and not yet acked.
struct InFlight {
    tenant: TenantId,
    workers: usize,
    batch_size: usize,
    retry_delays: Vec<Duration>,
    stats: Arc<TenantStats>,
    reply: Sender<BatchDone>,
    /// Publisher confirms of this channel, and how many messages it has published.
    confirms: Receiver<Confirm>,
    published: u64,
    /// Accepted, not yet handed to the pool.
    waiting: VecDeque<Item>,
    /// Every delivery neither acked nor rejected, by tag (bodies moved into `Item`s).
    unacked: BTreeMap<u64, Delivery>,
    /// Committed, waiting for every lower tag so one `ack_multiple` settles them all.
    committed: BTreeSet<u64>,
    /// Batches in the pool.
    busy: usize,
    retry_at: Option<Instant>,
    retry_backoff: Backoff,
}

impl InFlight {
    fn new(
        ctx: &ConsumerContext,
        spec: &TenantSpec,
        reply: Sender<BatchDone>,
        confirms: Receiver<Confirm>,
    ) -> Self {
        InFlight {
            tenant: spec.id,
            workers: usize::from(spec.workers),
            batch_size: ctx.batch_size,
            retry_delays: ctx.retry_delays.clone(),
            stats: spec.stats.clone(),
            reply,
            confirms,
            published: 0,
            waiting: VecDeque::new(),
            unacked: BTreeMap::new(),
            committed: BTreeSet::new(),
            busy: 0,
            retry_at: None,
            retry_backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
        }
    }

    fn accept(&mut self, mut delivery: Delivery) {
        let tag = delivery.delivery_tag();
        let item = Item {
            tag,
            id: message_id(&delivery),
            body: std::mem::take(&mut delivery.body),
            accepted: Instant::now(),
        };
        self.waiting.push_back(item);
        self.unacked.insert(tag, delivery);
        self.stats.consumed(1);
    }

    fn dispatch(&mut self, pool: &WorkerPool) {
        if self.retry_at.is_some() {
            return;
        }
        while self.busy < self.workers && !self.waiting.is_empty() {
            let n = self.waiting.len().min(self.batch_size);
            pool.submit(Batch {
                tenant: self.tenant,
                items: self.waiting.drain(..n).collect(),
                reply: self.reply.clone(),
            });
            self.busy += 1;
        }
    }

    fn complete(&mut self, channel: &Channel, done: BatchDone) -> Result<()> {
        self.busy -= 1;
        for poison in done.poison {
            self.retry_or_dead_letter(channel, poison)?;
        }
        match done.outcome {
            Outcome::Stored { settled, inserted } => {
                self.retry_backoff.reset();
                self.stats.stored(settled.len() as u64, inserted);
                self.committed.extend(settled);
            }
            Outcome::Transient { items, error } => {
                let delay = self.retry_backoff.next();
                warn!(
                    "tenant_id={} storing {} messages failed, retrying in {delay:?}: {error}",
                    self.tenant,
                    items.len()
                );
                for item in items.into_iter().rev() {
                    self.waiting.push_front(item);
                }
                self.retry_at = Some(Instant::now() + delay);
            }
        }
        self.ack_committed(channel)
    }

    /// Sends a message that failed to the retry queue (it comes back after the delay for its
    /// attempt) or, after the last attempt, to the DLQ; acks it once the broker has the copy.
    fn retry_or_dead_letter(&mut self, channel: &Channel, poison: Poison) -> Result<()> {
        let Some(delivery) = self.unacked.remove(&poison.tag) else {
            return Ok(());
        };
        let attempt = attempts(&delivery.properties) + 1;
        let delay = self.retry_delays.get(attempt as usize - 1).copied();
        let mut properties = copy_properties(&delivery.properties, attempt, &poison.reason);
        let queue = match delay {
            Some(delay) => {
                properties = properties.with_expiration(delay.as_millis().to_string());
                self.tenant.retry_name()
            }
            None => self.tenant.dlq_name(),
        };
        channel.basic_publish(
            "",
            Publish::with_properties(&poison.body, queue, properties),
        )?;
        self.published += 1;
        broker::wait_for_confirm(&self.confirms, self.published, Duration::from_secs(10))?;
        delivery.ack(channel)?;
        match delay {
            Some(delay) => {
                self.stats.retried();
                warn!(
                    "tenant_id={} message failed (attempt {attempt}), retrying in {delay:?}: {}",
                    self.tenant, poison.reason
                );
            }
            None => {
                self.stats.dead_lettered();
                warn!(
                    "tenant_id={} message dead-lettered after {attempt} attempts: {}",
                    self.tenant, poison.reason
                );
            }
        }
        Ok(())
    }

    /// Acks, with one `ack_multiple`, the longest run of committed deliveries at the low end.
    fn ack_committed(&mut self, channel: &Channel) -> Result<()> {
        let mut last = None;
        while let Some(entry) = self.unacked.first_entry() {
            if !self.committed.remove(entry.key()) {
                break;
            }
            last = Some(entry.remove());
        }
        match last {
            Some(delivery) => Ok(delivery.ack_multiple(channel)?),
            None => Ok(()),
        }
    }
}

/// How many times this message has failed before, from its header.
fn attempts(properties: &AmqpProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.get(ATTEMPTS_HEADER));
    let n = match value {
        Some(AmqpValue::LongInt(n)) => i64::from(*n),
        Some(AmqpValue::LongLongInt(n)) => *n,
        Some(AmqpValue::ShortInt(n)) => i64::from(*n),
        Some(AmqpValue::LongUInt(n)) => i64::from(*n),
        _ => 0,
    };
    n.clamp(0, 1000) as u32
}

/// The properties a retried or dead-lettered copy keeps (not the publisher's expiration, which
/// could make a dead letter vanish), plus the attempt count and the reason.
fn copy_properties(original: &AmqpProperties, attempt: u32, reason: &str) -> AmqpProperties {
    let mut headers: FieldTable = original.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPTS_HEADER.into(), AmqpValue::LongInt(attempt as i32));
    headers.insert(REASON_HEADER.into(), AmqpValue::LongString(reason.into()));
    let mut copy = AmqpProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(id) = original.message_id() {
        copy = copy.with_message_id(id.clone());
    }
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

/// Capped exponential backoff with jitter, so a thousand tenants do not reconnect in step.
struct Backoff {
    first: Duration,
    cap: Duration,
    current: Duration,
}

impl Backoff {
    fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            current: first,
        }
    }

    fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.cap);
        // Jitter from the clock's low bits: uniform enough to spread reconnects.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base / 2 + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
    }

    fn reset(&mut self) {
        self.current = self.first;
    }
}
