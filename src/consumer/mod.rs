//! A tenant's consumer thread: one event loop that owns the tenant's broker connection and
//! channel, hands deliveries to the worker pool in batches, and acks only what was committed.
//! It connects, and reconnects, through one backoff for as long as it is not told to stop, and
//! tells the replica's coordinator how it is doing.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, Consumer, ConsumerOptions};
use anyhow::{Context, Result};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{info, warn};

use crate::backoff::Backoff;
use crate::broker::{self, Brokers, Publisher, QueueType};
use crate::health::Health;
use crate::ids::TenantId;
use crate::inflight::{Book, InFlight};
use crate::metrics::Metrics;
use crate::pool::WorkerPool;
use crate::relay::Relay;
use crate::stats::TenantStats;
use crate::store::dead_letters::Ledger;

mod drain;
#[cfg(test)]
mod drain_end_tests;
mod event_loop;
mod start_gate;
use drain::drain;
use event_loop::{event_loop, Session};
use start_gate::Opening;
pub use start_gate::{StartGate, MAX_WAIT as START_GATE_MAX_WAIT};

/// What every tenant thread shares.
pub struct ConsumerContext {
    pub brokers: Brokers,
    pub queue_type: QueueType,
    pub connect_timeout: Duration,
    pub batch_size: usize,
    pub retry_delays: Vec<Duration>,
    pub pool: Arc<WorkerPool>,
    pub events: Sender<Event>,
    pub metrics: Arc<Metrics>,
    /// How long a resize waits for the batches in flight before the channel is reopened.
    pub drain_timeout: Duration,
    /// When the replica's fence stops every consumer: a drain under way ends by then too.
    pub fence: FenceClock,
    /// Which messages are dead-lettered already, shared by every tenant thread.
    pub ledger: Arc<Ledger>,
    /// Threads opening sessions together start consuming together.
    pub gate: StartGate,
}

/// The fence's rule, read by a draining thread: every consumer stops `after` the coordinator's
/// last heartbeat. The fence thread tells running consumers to stop; one already draining (a
/// stop or resize with a later deadline) ends its drain by the same instant on its own.
pub struct FenceClock {
    pub health: Arc<Health>,
    pub after: Duration,
}

impl FenceClock {
    /// The instant the fence stops consumers if no heartbeat comes before it.
    pub fn at(&self) -> Instant {
        Instant::now() + self.after.saturating_sub(self.health.since_heartbeat())
    }
}

impl ConsumerContext {
    pub fn prefetch(&self, workers: u16) -> u16 {
        (usize::from(workers) * self.batch_size).min(usize::from(u16::MAX)) as u16
    }
}

/// What a tenant thread tells the coordinator.
#[derive(Debug)]
pub enum Event {
    /// Registered with the broker, applying this concurrency (also after a resize).
    Running { tenant: TenantId, workers: u16 },
    /// Not connected (the connect failed or the connection was lost); retrying.
    Failing { tenant: TenantId, error: String },
    /// The thread is ending: it was told to stop, or its queue is gone.
    Ended {
        tenant: TenantId,
        error: Option<String>,
    },
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

    /// Asks the thread to drain and stop, without waiting.
    pub fn request_stop(&self, deadline: Instant) {
        let _ = self.control.send(Control::Stop { deadline });
    }

    /// Waits for the thread to end; false when it panicked.
    pub fn join(self) -> bool {
        self.thread.join().is_ok()
    }
}

/// One tenant's thread: who it is, its concurrency, its counters.
pub struct TenantSpec {
    pub id: TenantId,
    pub workers: u16,
    pub stats: Arc<TenantStats>,
}

pub fn spawn(ctx: Arc<ConsumerContext>, spec: TenantSpec) -> Result<ConsumerHandle> {
    let (control_tx, control_rx) = unbounded();
    let thread = std::thread::Builder::new()
        .name(spec.id.thread_name())
        .spawn(move || {
            let id = spec.id;
            // A panic ends the thread like an error does: the coordinator hears of it.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&ctx, spec, &control_rx)
            }));
            let error = match ran {
                Ok(result) => result.err().map(|e| broker::in_plain_words(&e)),
                Err(_) => Some("the consumer thread panicked".to_string()),
            };
            // Its concurrency is a running consumer's: it goes when the consumer does.
            let _ = ctx.metrics.workers.remove_label_values(&[&id.to_string()]);
            let _ = ctx.events.send(Event::Ended { tenant: id, error });
        })
        .context("spawning a tenant thread")?;
    Ok(ConsumerHandle {
        control: control_tx,
        thread,
    })
}

/// Why a channel's consumer ended, when the session did not fail.
enum ChannelEnd {
    Stopped,
    /// To run at a new concurrency: prefetch is set per consumer (quorum queues allow nothing
    /// else), so a new one is opened on a new channel.
    Resized(u16),
}

/// Why the event loop returned.
enum Leave {
    Stop(Instant),
    Resize(u16),
    /// The relay failed, or a failed message's copy was refused: the consumer drains, then the
    /// session fails with `error` (and the next one opens at `resize`, when one came meanwhile).
    Failed {
        error: anyhow::Error,
        resize: Option<u16>,
    },
}

impl Leave {
    fn failed(error: anyhow::Error) -> Leave {
        Leave::Failed {
            error,
            resize: None,
        }
    }
}

/// What the thread knows of its tenant's queues. The API declares them when it creates the
/// tenant, so a session only consumes the main queue; they are declared from here only when one
/// was found missing — never the main queue of a tenant that may be gone (see `declare_missing`).
#[derive(Default)]
struct Queues {
    /// A session of this thread has consumed.
    started: bool,
    /// A queue was missing: the next session declares them all.
    declare: bool,
}

/// The main queue was not found.
#[derive(Debug)]
struct MainQueueMissing(String);

impl std::fmt::Display for MainQueueMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue {} does not exist", self.0)
    }
}

/// The thread's body: sessions, one per broker connection, until told to stop. Ends with an
/// error only when the tenant's queue is gone after it consumed from it (it is never declared
/// again from here: the coordinator decides whether the tenant still exists).
fn run(ctx: &ConsumerContext, mut spec: TenantSpec, control: &Receiver<Control>) -> Result<()> {
    let id = spec.id;
    let mut queues = Queues::default();
    let mut backoff = Backoff::new(Duration::from_millis(100), RECONNECT_CAP);
    loop {
        let started = Instant::now();
        let session = run_session(ctx, &mut spec, control, &mut queues);
        // Only a session that lasted starts the backoff over: one that fails right after it
        // connected (a queue refusing what is published to it, say) backs off like a refused
        // connect, instead of reconnecting ten times a second.
        if started.elapsed() >= STABLE_SESSION {
            backoff.reset();
        }
        let err = match session {
            Ok(()) => return Ok(()),
            Err(e) if e.is::<MainQueueMissing>() && queues.started => {
                warn!(tenant_id:% = id; "consumer stops: its queue is gone");
                return Err(e);
            }
            Err(e) => e,
        };
        queues.declare |= err.is::<MainQueueMissing>()
            || err.is::<broker::Unroutable>()
            || broker::is_not_found(&err);
        let delay = backoff.next();
        warn!(tenant_id:% = id; "consumer cannot reach the broker, retrying in {delay:?}: {err:#}");
        let _ = ctx.events.send(Event::Failing {
            tenant: id,
            error: broker::in_plain_words(&err),
        });
        if wait_out(control, delay, &mut spec.workers) {
            return Ok(());
        }
    }
}

/// Waits `delay` for the next attempt, taking resizes meanwhile; true when told to stop.
fn wait_out(control: &Receiver<Control>, delay: Duration, workers: &mut u16) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        match control.recv_deadline(deadline) {
            Ok(Control::Resize(n)) => *workers = n,
            Ok(Control::Stop { .. }) | Err(RecvTimeoutError::Disconnected) => return true,
            Err(RecvTimeoutError::Timeout) => return false,
        }
    }
}

/// The longest a tenant thread waits between two connects: after a broker restart every tenant
/// is consumed again within this (plus its connect) of the broker answering. Cheap for the
/// broker: a broker that is down refuses in the kernel; one that is up pays a TCP and AMQP
/// handshake per attempt, spread by the jitter over [cap/2, cap] — 1,000 tenants at most ~1,000
/// attempts a second, what their start after a restart costs anyway.
pub const RECONNECT_CAP: Duration = Duration::from_secs(2);

/// A session that lasted this long was not a failed start.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// One broker connection: a channel and its consumer, another after each resize, until told
/// to stop (`Ok`) or until the connection fails.
fn run_session(
    ctx: &ConsumerContext,
    spec: &mut TenantSpec,
    control: &Receiver<Control>,
    queues: &mut Queues,
) -> Result<()> {
    let label = format!("tenantd tenant {}", spec.id);
    let mut opening = ctx.gate.opening();
    let mut connection = ctx.brokers.connect(ctx.connect_timeout, &label)?;
    let result = loop {
        match consume(ctx, spec, &mut connection, control, queues, &mut opening) {
            Ok(ChannelEnd::Stopped) => break Ok(()),
            Ok(ChannelEnd::Resized(n)) => spec.workers = n,
            Err(e) => break Err(e),
        }
    };
    let _ = connection.close();
    result
}

/// Declares the tenant's queues when one was found missing: at once on the thread's first
/// sessions (the coordinator just claimed the tenant, so it exists), on later ones only if the
/// main queue is still there (a thread that outlives its tenant never brings a deleted tenant's
/// queues back). Before the relay consumes, whose queue may be the one missing.
fn declare_missing(
    ctx: &ConsumerContext,
    connection: &mut Connection,
    channel: &Channel,
    id: TenantId,
    queues: &mut Queues,
) -> Result<()> {
    if !queues.declare {
        return Ok(());
    }
    if queues.started {
        channel
            .queue_declare_passive(id.queue_name())
            .map_err(|e| main_queue_error(e.into(), id))?;
    }
    broker::declare_tenant_queues(connection, id, ctx.queue_type)?;
    queues.declare = false;
    Ok(())
}

/// Consumes the tenant's queue by name: a queue that is not there answers 404 (the channel
/// closes), which is the lookup.
fn consume_queue<'c>(
    channel: &'c Channel,
    id: TenantId,
    queues: &mut Queues,
) -> Result<Consumer<'c>> {
    let consumer = channel
        .basic_consume(id.queue_name(), ConsumerOptions::default())
        .map_err(|e| main_queue_error(e.into(), id))?;
    queues.started = true;
    Ok(consumer)
}

fn main_queue_error(e: anyhow::Error, id: TenantId) -> anyhow::Error {
    match broker::is_not_found(&e) {
        true => e.context(MainQueueMissing(id.queue_name())),
        false => e.context(format!("consuming queue {}", id.queue_name())),
    }
}

fn consume(
    ctx: &ConsumerContext,
    spec: &mut TenantSpec,
    connection: &mut Connection,
    control: &Receiver<Control>,
    queues: &mut Queues,
    opening: &mut Opening,
) -> Result<ChannelEnd> {
    let id = spec.id;
    let channel = connection.open_channel(None)?;
    // Per consumer (not channel-wide, which quorum queues refuse); `rabbitmqctl
    // list_consumers` shows it.
    channel.qos(0, ctx.prefetch(spec.workers), false)?;
    // Retries and dead letters are published here and acked only once the broker confirms them.
    let publisher = Publisher::enable(&channel, ctx.connect_timeout)?;
    declare_missing(ctx, connection, &channel, id, queues)?;
    let relay_channel = connection.open_channel(None)?;
    let longest = ctx.retry_delays.iter().max().copied().unwrap_or_default();
    let mut relay = Relay::start(&relay_channel, id, ctx.connect_timeout, longest)?;
    // Not past the fence: a thread held at the gate consumes no later than the fence allows.
    // After the gate the broker pushes every consumer's prefetch window at once and any call
    // waits behind them all, so the consume is the only call left for then (the queue is
    // looked up by consuming it). The relay consumes before: a retry queue found missing once
    // the tenant's messages are in the pool would end the session with their poison copies
    // unroutable.
    let fence = ctx.fence.at().saturating_duration_since(Instant::now());
    opening.ready(start_gate::MAX_WAIT.min(fence));
    if let Some(end) = told_before_consuming(ctx, control, spec.workers) {
        relay.stop(Instant::now() + ctx.connect_timeout);
        let _ = relay_channel.close();
        return close_unconsumed(channel, spec, end);
    }
    let consumer = consume_queue(&channel, id, queues)?;
    info!(
        tenant_id:% = id;
        "consumer started consumer_tag={} prefetch={}",
        consumer.consumer_tag(),
        ctx.prefetch(spec.workers)
    );
    running(ctx, id, spec.workers);
    let (reply_tx, reply_rx) = unbounded();
    let book = Book {
        tenant: id,
        workers: spec.workers,
        batch_size: ctx.batch_size,
        retry_delays: ctx.retry_delays.clone(),
        stats: spec.stats.clone(),
        ledger: ctx.ledger.clone(),
    };
    let mut flight = InFlight::new(book, reply_tx, publisher);
    let session = Session {
        channel: &channel,
        consumer: &consumer,
        replies: &reply_rx,
        control,
    };
    let mut leave = event_loop(ctx, &session, &mut flight, &mut relay)?;
    let mut deadline = match leave {
        Leave::Stop(deadline) => deadline,
        Leave::Resize(_) | Leave::Failed { .. } => Instant::now() + ctx.drain_timeout,
    };
    // What is committed is acked before the channel closes; what is not goes back to the
    // queue and comes again. The relay's copy, if it holds one, goes back to the retry queue.
    // A stop that comes meanwhile (also while a resize drains) ends the drain by its deadline.
    let drained = drain(&session, &mut flight, &mut leave, &mut deadline, &ctx.fence);
    relay.stop(deadline);
    let _ = relay_channel.close();
    drop(consumer);
    let closed = drained.and_then(|()| Ok(channel.close()?));
    match leave {
        Leave::Resize(n) => {
            info!(tenant_id:% = id; "concurrency changed {} -> {n}", spec.workers);
            // A failed close fails the session: the next one runs at the new concurrency.
            spec.workers = n;
            closed.map(|()| ChannelEnd::Resized(n))
        }
        Leave::Stop(_) => {
            // Told to stop: the session ends as stopped whatever fails while closing, so a
            // failed close is never mistaken for a lost connection and reconnected.
            if let Err(e) = closed {
                warn!(tenant_id:% = id; "closing the consumer failed (unacked messages go back to the queue): {e:#}");
            }
            info!(tenant_id:% = id; "consumer stopped");
            Ok(ChannelEnd::Stopped)
        }
        Leave::Failed { error, resize } => {
            spec.workers = resize.unwrap_or(spec.workers);
            // One line for the session's end: the drain's own failure (most often the same lost
            // connection) goes with the relay's.
            Err(match closed {
                Ok(()) => error,
                Err(e) => error.context(format!("the drain after it failed too ({e:#})")),
            })
        }
    }
}

/// What the thread was told while its session opened, or waited at the start gate: a stop
/// (also the fence's, which has fired when no heartbeat came for F/2: the thread waits for its
/// stop, or for a heartbeat, rather than consume), or a new concurrency to open with.
fn told_before_consuming(
    ctx: &ConsumerContext,
    control: &Receiver<Control>,
    workers: u16,
) -> Option<ChannelEnd> {
    loop {
        let fenced = ctx.fence.at() <= Instant::now();
        let wait = if fenced { FENCE_POLL } else { Duration::ZERO };
        match control.recv_timeout(wait) {
            Ok(Control::Stop { .. }) | Err(RecvTimeoutError::Disconnected) => {
                return Some(ChannelEnd::Stopped)
            }
            Ok(Control::Resize(n)) if n != workers => return Some(ChannelEnd::Resized(n)),
            // The same concurrency: the consumer about to start reports it.
            Ok(Control::Resize(_)) => {}
            Err(RecvTimeoutError::Timeout) if fenced => {}
            Err(RecvTimeoutError::Timeout) => return None,
        }
    }
}

/// Closes the channel of a session told to stop or resize before it consumed. As after a
/// drain, a failed close never turns a stop into a lost connection (which would reconnect a
/// thread its manager counts as stopping); a resize is kept whatever the close does.
fn close_unconsumed(
    channel: Channel,
    spec: &mut TenantSpec,
    end: ChannelEnd,
) -> Result<ChannelEnd> {
    let id = spec.id;
    let closed = channel.close();
    match end {
        ChannelEnd::Stopped => {
            if let Err(e) = closed {
                warn!(tenant_id:% = id; "closing the channel failed: {e:#}");
            }
            info!(tenant_id:% = id; "consumer stopped before it consumed");
            Ok(ChannelEnd::Stopped)
        }
        ChannelEnd::Resized(n) => {
            info!(tenant_id:% = id; "concurrency changed {} -> {n} before it consumed", spec.workers);
            spec.workers = n;
            Ok(closed.map(|()| ChannelEnd::Resized(n))?)
        }
    }
}

/// How often a fenced thread that has not consumed yet looks for a heartbeat.
const FENCE_POLL: Duration = Duration::from_millis(100);

/// Says the consumer runs at `workers`, to the coordinator and in the metrics.
fn running(ctx: &ConsumerContext, id: TenantId, workers: u16) {
    let label = id.to_string();
    ctx.metrics
        .workers
        .with_label_values(&[label.as_str()])
        .set(i64::from(workers));
    let _ = ctx.events.send(Event::Running {
        tenant: id,
        workers,
    });
}
