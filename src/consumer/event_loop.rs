//! The running consumer's loop: deliveries to the pool in bursts, the workers' replies to acks,
//! the retry relay, and the thread's control channel, until a stop, a resize or a failed session.

use std::time::Instant;

use amiquip::{Channel, Consumer, ConsumerMessage, Delivery};
use anyhow::{anyhow, bail, Context, Result};
use crossbeam_channel::{never, select, Receiver, TryRecvError};

use super::{running, ConsumerContext, Control, Leave};
use crate::inflight::InFlight;
use crate::pool::BatchDone;
use crate::relay::Relay;

/// What the event loop listens to.
pub(super) struct Session<'a> {
    pub channel: &'a Channel,
    pub consumer: &'a Consumer<'a>,
    pub replies: &'a Receiver<BatchDone>,
    pub control: &'a Receiver<Control>,
}

/// Runs until told to stop or to resize, or until the broker session fails. A failure of the
/// relay (its own channel), or a failed message's copy that the broker refuses, leaves through
/// the drain: the consumer's channel still acks what the pool commits, so nothing stored is
/// delivered again.
///
/// The thread wakes once per burst, not per delivery: it takes every delivery already waiting
/// before it decides what goes to the pool, and while every worker slot of the tenant is busy
/// (or the database is failing) it does not listen for deliveries at all — they accumulate in
/// the consumer's channel, bounded by the prefetch, and are taken together when a batch is done.
/// So a busy tenant sleeps between batches and sends full ones; a quiet one still sends each
/// message at once.
pub(super) fn event_loop(
    ctx: &ConsumerContext,
    session: &Session,
    flight: &mut InFlight,
    relay: &mut Relay,
) -> Result<Leave> {
    let Session {
        channel,
        consumer,
        replies,
        control,
    } = *session;
    loop {
        take_waiting(consumer, flight)?;
        flight.dispatch(&ctx.pool);
        let deliveries = match flight.can_dispatch() {
            true => consumer.receiver().clone(),
            false => never(),
        };
        let retry = flight.retry_timer();
        let relay_due = relay.timer();
        select! {
            recv(deliveries) -> message => flight.accept([delivery_of(message)?]),
            recv(replies) -> done => {
                let done = done.context("worker replies closed")?;
                if let Err(e) = flight.complete(channel, done, replies.try_iter()) {
                    return Ok(Leave::failed(e));
                }
            }
            recv(control) -> command => match command {
                Ok(Control::Resize(n)) if usize::from(n) != flight.workers() => {
                    return Ok(Leave::Resize(n));
                }
                Ok(Control::Resize(n)) => running(ctx, flight.tenant(), n),
                Ok(Control::Stop { deadline }) => return Ok(Leave::Stop(deadline)),
                Err(_) => return Ok(Leave::Stop(Instant::now())),
            },
            recv(retry) -> _ => flight.retry_due(),
            recv(relay.deliveries()) -> message => if let Err(e) = relay.hold(message) {
                return Ok(Leave::failed(e));
            },
            recv(relay_due) -> _ => if let Err(e) = relay.release() {
                return Ok(Leave::failed(e));
            },
        }
    }
}

/// Takes every delivery already in the consumer's channel.
fn take_waiting(consumer: &Consumer, flight: &mut InFlight) -> Result<()> {
    let mut burst = Vec::new();
    let result = loop {
        match consumer.receiver().try_recv() {
            Ok(message) => match delivery_of(Ok(message)) {
                Ok(delivery) => burst.push(delivery),
                Err(e) => break Err(e),
            },
            Err(TryRecvError::Empty) => break Ok(()),
            Err(TryRecvError::Disconnected) => {
                break Err(anyhow!("consumer ended: its channel closed"))
            }
        }
    };
    flight.accept(burst);
    result
}

fn delivery_of(message: Result<ConsumerMessage, crossbeam_channel::RecvError>) -> Result<Delivery> {
    match message {
        Ok(ConsumerMessage::Delivery(delivery)) => Ok(delivery),
        Ok(other) => bail!("consumer ended: {other:?}"),
        Err(_) => bail!("consumer ended: its channel closed"),
    }
}
