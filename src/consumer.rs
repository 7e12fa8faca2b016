//! A tenant's consumer thread: one event loop that owns the tenant's broker connection and
//! channel, hands deliveries to the worker pool in batches, and acks only what was committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions, Delivery};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{after, bounded, never, select, unbounded, Receiver, Sender};
use log::{info, warn};
use uuid::Uuid;

use crate::broker::{self, BrokerAddr};
use crate::ids::TenantId;
use crate::pool::{Batch, BatchDone, BatchResult, Item, WorkerPool};

/// What every tenant thread shares.
pub struct ConsumerContext {
    pub broker: BrokerAddr,
    pub connect_timeout: Duration,
    pub batch_size: usize,
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

pub fn spawn(ctx: Arc<ConsumerContext>, id: TenantId, workers: u16) -> Result<Starting> {
    let (control_tx, control_rx) = unbounded();
    let (ready_tx, ready_rx) = bounded(1);
    let thread = std::thread::Builder::new()
        .name(id.thread_name())
        .spawn(move || run(&ctx, id, workers, &control_rx, ready_tx))
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
    id: TenantId,
    mut workers: u16,
    control: &Receiver<Control>,
    ready: Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        let result = run_session(ctx, id, &mut workers, control, &mut ready, &mut backoff);
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
            Ok(Control::Resize(n)) => workers = n,
            Ok(Control::Stop { .. }) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn run_session(
    ctx: &ConsumerContext,
    id: TenantId,
    workers: &mut u16,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let label = format!("tenantd tenant {id}");
    let mut connection = broker::connect(&ctx.broker, ctx.connect_timeout, &label)?;
    let result = consume(ctx, id, &mut connection, workers, control, ready, backoff);
    let _ = connection.close();
    result
}

fn consume(
    ctx: &ConsumerContext,
    id: TenantId,
    connection: &mut Connection,
    workers: &mut u16,
    control: &Receiver<Control>,
    ready: &mut Option<Sender<Result<()>>>,
    backoff: &mut Backoff,
) -> Result<()> {
    let channel = connection.open_channel(None)?;
    // Global: one limit for the channel, which a resize can change under the running consumer.
    channel.qos(0, ctx.prefetch(*workers), true)?;
    let queue = broker::declare_tenant_queue(&channel, id)?;
    let consumer = queue.consume(ConsumerOptions::default())?;
    info!(
        "consumer started tenant_id={id} consumer_tag={} prefetch={}",
        consumer.consumer_tag(),
        ctx.prefetch(*workers)
    );
    if let Some(ready) = ready.take() {
        let _ = ready.send(Ok(()));
    }
    backoff.reset();
    let (reply_tx, reply_rx) = unbounded();
    let mut flight = InFlight::new(id, *workers, ctx.batch_size, reply_tx);
    let stop = event_loop(
        ctx,
        &channel,
        &consumer,
        &reply_rx,
        control,
        &mut flight,
        workers,
    )?;
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
    workers: &mut u16,
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
                    info!("concurrency changed tenant_id={} {} -> {n}", flight.tenant, *workers);
                    *workers = n;
                    flight.workers = usize::from(n);
                }
                Ok(Control::Stop { deadline }) => return Ok(deadline),
                Err(_) => return Ok(Instant::now()),
            },
            recv(retry) -> _ => flight.retry_at = None,
        }
        flight.dispatch(&ctx.pool);
    }
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
    reply: Sender<BatchDone>,
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
    fn new(tenant: TenantId, workers: u16, batch_size: usize, reply: Sender<BatchDone>) -> Self {
        InFlight {
            tenant,
            workers: usize::from(workers),
            batch_size,
            reply,
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
        };
        self.waiting.push_back(item);
        self.unacked.insert(tag, delivery);
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
        match done.result {
            BatchResult::Done {
                settled, poison, ..
            } => {
                self.retry_backoff.reset();
                for (tag, reason) in poison {
                    self.reject(channel, tag, &reason)?;
                }
                self.committed.extend(settled);
                self.ack_committed(channel)
            }
            BatchResult::Transient { items, error } => {
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
                Ok(())
            }
        }
    }

    /// The broker dead-letters a rejected message to the tenant's DLQ.
    fn reject(&mut self, channel: &Channel, tag: u64, reason: &str) -> Result<()> {
        warn!("tenant_id={} message dead-lettered: {reason}", self.tenant);
        match self.unacked.remove(&tag) {
            Some(delivery) => Ok(delivery.reject(channel, false)?),
            None => Ok(()),
        }
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
