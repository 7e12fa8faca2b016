//! How a consumer leaves: it cancels, lets the pool finish what it holds, and acks what was
//! committed, by a deadline — while still hearing a stop or a resize.

use std::time::{Duration, Instant};

use amiquip::{Consumer, ConsumerMessage};
use anyhow::{Context, Result};
use crossbeam_channel::{after, never, select};
use log::warn;

use super::{Control, FenceClock, Leave, Session};
use crate::inflight::InFlight;
use crate::pool::BatchDone;

/// Stops taking deliveries and waits (until `deadline`) for the pool to finish what it holds and
/// for the consumer's last message after the cancel (amiquip sends it after answering the
/// cancel, and fails the whole connection if the consumer is dropped in between). At its end,
/// what committed is acked, also replies that were waiting when the deadline came; what is
/// unacked after that is requeued when the channel closes.
///
/// It keeps listening to its control channel: a stop turns a resize's drain into a stop's, and
/// brings the deadline forward when its own is sooner (the fence's is now); a resize while
/// a resize drains changes the concurrency the next channel opens with.
///
/// The fence bounds it too: a drain ends when the replica's fence stops its consumers (F/2
/// after the last heartbeat), whatever deadline it was given. Nothing is acked that was not
/// committed (acks come only from the workers' replies); a batch still in the pool may commit
/// after the fence, and its messages, redelivered to the tenant's new owner, are stored once by
/// their ids (a message published without a UUID `message_id` gets a new one and is stored
/// again).
///
/// Once the consumer's channel has disconnected it is always ready in `select!`: it is then
/// dropped from the select, so waiting for a slow batch costs no CPU (as is the control
/// channel once disconnected).
pub(super) fn drain(
    session: &Session,
    flight: &mut InFlight,
    leave: &mut Leave,
    deadline: &mut Instant,
    fence: &FenceClock,
) -> Result<()> {
    enum Woke {
        Done(Result<BatchDone, crossbeam_channel::RecvError>),
        /// Whether it was a delivery (one that raced the cancel) or the consumer's end.
        Delivery {
            raced_the_cancel: bool,
        },
        Control(Result<Control, crossbeam_channel::RecvError>),
        Deadline,
        Fenced,
    }
    let Session {
        channel,
        consumer,
        replies,
        control,
    } = *session;
    consumer.cancel()?;
    let mut control = control.clone();
    let mut cancelled = false;
    let mut timeout = after(deadline.saturating_duration_since(Instant::now()));
    while flight.in_pool() > 0 || !cancelled {
        // Read again at each wake: a heartbeat meanwhile moves it on.
        let fenced_at = fence.at();
        let fenced = match fenced_at < *deadline {
            true => after(fenced_at.saturating_duration_since(Instant::now())),
            false => never(),
        };
        let deliveries = match cancelled {
            true => never(),
            false => consumer.receiver().clone(),
        };
        let woke = select! {
            recv(replies) -> done => Woke::Done(done),
            recv(deliveries) -> message => Woke::Delivery {
                raced_the_cancel: matches!(message, Ok(ConsumerMessage::Delivery(_))),
            },
            recv(control) -> command => Woke::Control(command),
            recv(timeout) -> _ => Woke::Deadline,
            recv(fenced) -> _ => Woke::Fenced,
        };
        match woke {
            Woke::Done(done) => {
                let done = done.context("worker replies closed")?;
                if let Err(e) = flight.complete(channel, done, replies.try_iter()) {
                    copy_refused(leave, flight, e);
                }
            }
            // Deliveries that raced the cancel stay unacked and go back to the queue.
            Woke::Delivery { raced_the_cancel } => cancelled |= !raced_the_cancel,
            Woke::Control(Ok(Control::Resize(n))) => match leave {
                Leave::Resize(workers)
                | Leave::Failed {
                    resize: Some(workers),
                    ..
                } => *workers = n,
                Leave::Failed { resize, .. } => *resize = Some(n),
                Leave::Stop(_) => {}
            },
            Woke::Control(command) => {
                let stop_by = match command {
                    Ok(Control::Stop { deadline }) => deadline,
                    _ => {
                        control = never();
                        Instant::now()
                    }
                };
                say_failure(leave, flight, "told to stop");
                *leave = Leave::Stop(stop_by);
                if stop_by < *deadline {
                    *deadline = stop_by;
                    timeout = after(stop_by.saturating_duration_since(Instant::now()));
                }
            }
            Woke::Deadline => {
                warn!(
                    tenant_id:% = flight.tenant();
                    "stop deadline passed with {} batches in flight; they will be redelivered",
                    flight.in_pool()
                );
                break;
            }
            Woke::Fenced if fence.at() <= Instant::now() => {
                warn!(
                    tenant_id:% = flight.tenant();
                    "fenced: no heartbeat, the drain ends with {} batches in flight; they will be redelivered",
                    flight.in_pool()
                );
                say_failure(leave, flight, "fenced");
                *leave = Leave::Stop(Instant::now());
                *deadline = Instant::now();
                break;
            }
            Woke::Fenced => {}
        }
    }
    // Replies already waiting when the deadline or the fence ended it are commits too.
    let ended = flight.end(channel, replies.try_iter());
    if !cancelled {
        take_the_consumer_end(consumer);
    }
    ended
}

/// Takes the consumer's last message, which amiquip sends right after it answered the cancel:
/// a consumer dropped before it fails the whole connection, with what it had not written yet
/// (the acks just sent). Bounded, should the connection be failing meanwhile.
fn take_the_consumer_end(consumer: &Consumer) {
    let until = Instant::now() + CONSUMER_END_WAIT;
    while let Ok(ConsumerMessage::Delivery(_)) = consumer.receiver().recv_deadline(until) {}
}

/// The longest a drain waits for its consumer's last message (it comes at once: the broker has
/// answered the cancel already).
const CONSUMER_END_WAIT: Duration = Duration::from_secs(1);

/// A failed message's copy refused while draining: the drain goes on (what commits is still
/// acked) and the message, unacked, comes again. A resize's drain becomes a failed session's.
fn copy_refused(leave: &mut Leave, flight: &InFlight, error: anyhow::Error) {
    match leave {
        Leave::Resize(workers) => {
            *leave = Leave::Failed {
                error,
                resize: Some(*workers),
            }
        }
        Leave::Stop(_) => {
            warn!(tenant_id:% = flight.tenant(); "while stopping: {error:#}; the message comes again")
        }
        Leave::Failed { .. } => {
            warn!(tenant_id:% = flight.tenant(); "while draining after a failure: {error:#}")
        }
    }
}

/// A stop that ends the drain of a failed session takes its place: its error, logged here, is
/// not returned.
fn say_failure(leave: &Leave, flight: &InFlight, ended_by: &str) {
    if let Leave::Failed { error, .. } = leave {
        warn!(tenant_id:% = flight.tenant(); "{ended_by} while draining after a failure: {error:#}");
    }
}
