//! A tenant's consumer thread: one event loop that owns the tenant's broker connection and
//! channel, hands deliveries to the worker pool in batches, and acks only what was committed.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection, Consumer, ConsumerMessage, ConsumerOptions, Delivery};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{after, bounded, never, select, unbounded, Receiver, Sender};
use log::{info, warn};

use crate::backoff::Backoff;
use crate::broker::{self, BrokerAddr};
use crate::ids::TenantId;
use crate::inflight::InFlight;
use crate::metrics::metrics;
use crate::pool::{BatchDone, WorkerPool};
use crate::stats::TenantStats;

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
                while flight.filling() {
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
