//! A tenant's dead letters in the broker: read without taking them (peek), moved back to the
//! tenant's queue (replay), dropped. Each call opens a channel of its own, which acks nothing
//! but what it took itself, and closes it at the end: whatever it took and did not settle goes
//! back to the DLQ then, or when the connection dies with the process.

use std::cell::Cell;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, AmqpValue, Channel, Connection, Delivery};
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use super::headers::{
    attempts, replays, ATTEMPTS_HEADER, DEAD_LETTERED_AT_HEADER, REASON_HEADER, REPLAYS_HEADER,
    RETRY_AT_HEADER,
};
use super::{is_not_found, Publisher};
use crate::ids::TenantId;

/// Letters a replay or a drop takes before settling them: a replay publishes a window, waits
/// for the broker to confirm all of it, then acks the window's DLQ copies with one ack.
pub const WINDOW: u64 = 100;

/// How long a look waits for the letters it gave back to be in place again (another reader
/// holding some of them may keep the count below what it was).
const GIVE_BACK_WAIT: Duration = Duration::from_secs(1);

/// Headers a replayed letter leaves behind: tenantd's record of its failed attempts, and the
/// delivery counts a quorum queue adds, so it starts again at its first attempt.
const FAILURE_HEADERS: [&str; 6] = [
    ATTEMPTS_HEADER,
    REASON_HEADER,
    RETRY_AT_HEADER,
    DEAD_LETTERED_AT_HEADER,
    "x-delivery-count",
    "x-acquired-count",
];

/// How much of the dead letters a look holds: each letter's body up to `letter` bytes (a
/// larger one is held as its size alone), and bodies up to `page` bytes in all (the page ends
/// before the letter that would pass it).
#[derive(Clone, Copy)]
pub struct Shown {
    pub letter: usize,
    pub page: usize,
}

/// One dead letter as the operator sees it.
pub struct DeadLetter {
    pub message_id: Option<String>,
    /// `None` when larger than a look shows.
    pub body: Option<Vec<u8>>,
    /// The body's size in bytes.
    pub size: usize,
    pub reason: Option<String>,
    pub attempts: u32,
    /// When tenantd dead-lettered it; for letters from before that was recorded, the
    /// publisher's timestamp, if it set one.
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    /// The letter, its body kept only up to `shown` bytes, so a look never holds more.
    fn from_delivery(delivery: &mut Delivery, shown: usize) -> DeadLetter {
        let p = &delivery.properties;
        let header = |name: &str| p.headers().as_ref().and_then(|h| h.get(name).cloned());
        let reason = match header(REASON_HEADER) {
            Some(AmqpValue::LongString(reason)) => Some(reason),
            _ => None,
        };
        let stamped = match header(DEAD_LETTERED_AT_HEADER) {
            Some(AmqpValue::LongLongInt(ms)) => DateTime::from_timestamp_millis(ms),
            _ => None,
        };
        let published = p
            .timestamp()
            .and_then(|s| DateTime::from_timestamp(i64::try_from(s).ok()?, 0));
        DeadLetter {
            message_id: p.message_id().clone(),
            reason,
            attempts: attempts(p),
            dead_lettered_at: stamped.or(published),
            size: delivery.body.len(),
            body: (delivery.body.len() <= shown).then(|| std::mem::take(&mut delivery.body)),
        }
    }
}

/// A page of the oldest dead letters.
#[derive(Default)]
pub struct Peeked {
    /// Letters in the DLQ (ready, not held by another reader) when the peek began.
    pub total: u32,
    pub letters: Vec<DeadLetter>,
    /// Whether another letter follows the page.
    pub more: bool,
}

/// How far a replay or a drop got, kept across a retry on a fresh connection; and whether it
/// should stop early (the replica shuts down).
pub struct Progress<'a> {
    done: Cell<u64>,
    stop: &'a dyn Fn() -> bool,
}

impl<'a> Progress<'a> {
    pub fn new(stop: &'a dyn Fn() -> bool) -> Progress<'a> {
        Progress {
            done: Cell::new(0),
            stop,
        }
    }

    /// Letters moved or dropped so far.
    pub fn done(&self) -> u64 {
        self.done.get()
    }

    fn add(&self, n: u64) {
        self.done.set(self.done.get() + n);
    }

    /// Letters still wanted of a `limit` (`None`: all of `depth`), never more than `depth`:
    /// letters dead-lettered again while a replay runs are not taken twice.
    fn wanted(&self, limit: Option<u64>, depth: u32) -> u64 {
        let depth = u64::from(depth);
        limit.map_or(depth, |l| l.saturating_sub(self.done()).min(depth))
    }
}

/// The letters after the first `skip`, at most `limit` and within `shown`, left in the DLQ in
/// their order: taken without ack, then given back with one `nack(multiple, requeue)` (rather
/// than by closing the channel: from RabbitMQ 4.3 a nack does not count toward a quorum queue's
/// delivery limit).
pub fn peek(
    connection: &mut Connection,
    id: TenantId,
    skip: u64,
    limit: u64,
    shown: Shown,
) -> Result<Peeked> {
    on_own_channel(connection, |channel| {
        let dlq = id.dlq_name();
        let total = depth(channel, &dlq)?;
        let mut peeked = Peeked {
            total,
            ..Peeked::default()
        };
        let (mut last, mut bytes) = (None, 0);
        // One beyond the page says whether another follows.
        for i in 0..=skip + limit {
            let Some(mut get) = channel.basic_get(dlq.as_str(), false)? else {
                break;
            };
            if i == skip + limit {
                peeked.more = true;
            } else if i >= skip {
                let letter = DeadLetter::from_delivery(&mut get.delivery, shown.letter);
                let size = letter.body.as_ref().map_or(0, Vec::len);
                if bytes + size > shown.page && !peeked.letters.is_empty() {
                    peeked.more = true;
                    last = Some(get.delivery);
                    break;
                }
                bytes += size;
                peeked.letters.push(letter);
            }
            last = Some(get.delivery);
        }
        if let Some(last) = last {
            last.nack_multiple(channel, true)?;
            wait_back(channel, &dlq, total)?;
        }
        Ok(peeked)
    })
}

/// Moves up to `limit` letters (`None`: every letter there when it starts) to the tenant's
/// queue, a window at a time: each letter is published (`mandatory`) and confirmed by the broker
/// before its DLQ copy is acked. A crash leaves each letter in the DLQ, in the tenant's queue,
/// or (published, not yet acked) in both: stored once thanks to its message id. Returns the
/// letters left in the DLQ.
pub fn replay(
    connection: &mut Connection,
    id: TenantId,
    limit: Option<u64>,
    timeout: Duration,
    progress: &Progress,
) -> Result<u32> {
    on_own_channel(connection, |channel| {
        let mut publisher = Publisher::enable(channel, timeout)?;
        let (dlq, queue) = (id.dlq_name(), id.queue_name());
        let wanted = progress.wanted(limit, depth(channel, &dlq)?);
        let mut moved = 0;
        while moved < wanted && !(progress.stop)() {
            let window = (wanted - moved).min(WINDOW);
            let (mut n, mut last) = (0, None);
            while n < window {
                let Some(get) = channel.basic_get(dlq.as_str(), false)? else {
                    break;
                };
                let properties = replayed(&get.delivery.properties);
                publisher.send(channel, &queue, &get.delivery.body, properties)?;
                (n, last) = (n + 1, Some(get.delivery));
            }
            let Some(last) = last else { break };
            publisher
                .wait_all(&queue)
                .with_context(|| format!("moving dead letters back to {queue}"))?;
            last.ack_multiple(channel)?;
            moved += n;
            progress.add(n);
            if n < window {
                break; // the DLQ is empty
            }
        }
        depth(channel, &dlq)
    })
}

/// Drops up to `limit` letters (`None`: every letter there, in one purge). Returns the letters
/// left in the DLQ.
pub fn drop_letters(
    connection: &mut Connection,
    id: TenantId,
    limit: Option<u64>,
    progress: &Progress,
) -> Result<u32> {
    on_own_channel(connection, |channel| {
        let dlq = id.dlq_name();
        if limit.is_none() {
            let purged = channel.queue_purge(dlq.as_str())?;
            progress.add(u64::from(purged));
            return depth(channel, &dlq);
        }
        let wanted = progress.wanted(limit, depth(channel, &dlq)?);
        let mut dropped = 0;
        while dropped < wanted && !(progress.stop)() {
            let window = (wanted - dropped).min(WINDOW);
            let (mut n, mut last) = (0, None);
            while n < window {
                let Some(get) = channel.basic_get(dlq.as_str(), false)? else {
                    break;
                };
                (n, last) = (n + 1, Some(get.delivery));
            }
            let Some(last) = last else { break };
            last.ack_multiple(channel)?;
            dropped += n;
            progress.add(n);
            if n < window {
                break;
            }
        }
        depth(channel, &dlq)
    })
}

/// Runs `op` on a fresh channel, then closes it (what it took and did not settle goes back to
/// the DLQ). A DLQ that does not exist holds no letters: `op` then answers its default.
fn on_own_channel<T: Default>(
    connection: &mut Connection,
    op: impl FnOnce(&Channel) -> Result<T>,
) -> Result<T> {
    let channel = connection.open_channel(None)?;
    let result = op(&channel);
    // A channel the broker closed (a missing queue) fails to close again: nothing to do.
    let _ = channel.close();
    match result {
        Err(e) if is_not_found(&e) => Ok(T::default()),
        other => other,
    }
}

/// Letters ready in the DLQ now (those another reader holds are not counted).
fn depth(channel: &Channel, dlq: &str) -> Result<u32> {
    let queue = channel
        .queue_declare_passive(dlq)
        .with_context(|| format!("reading queue {dlq}"))?;
    Ok(queue.declared_message_count().unwrap_or(0))
}

/// Waits (a moment at most) until the DLQ holds `total` letters again. The broker puts letters
/// given back into place asynchronously, after it has answered: a look answers once they are
/// back, so that the next look, replay or drop finds them there, in their order.
fn wait_back(channel: &Channel, dlq: &str, total: u32) -> Result<()> {
    let deadline = Instant::now() + GIVE_BACK_WAIT;
    let mut pause = Duration::from_millis(1);
    while depth(channel, dlq)? < total && Instant::now() < deadline {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    Ok(())
}

/// What a replayed letter is published with: its own properties and headers, without the
/// record of its failures (`FAILURE_HEADERS`), one more replay counted (so that the ledger of
/// dead letters takes it again if it fails again), persistent.
fn replayed(properties: &AmqpProperties) -> AmqpProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for name in FAILURE_HEADERS {
        headers.remove(name);
    }
    let n = replays(properties) + 1;
    headers.insert(REPLAYS_HEADER.into(), AmqpValue::LongLongInt(n));
    properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amiquip::FieldTable;

    #[test]
    fn a_replayed_letter_keeps_its_own_headers_and_loses_its_failures() {
        let mut headers = FieldTable::new();
        for name in FAILURE_HEADERS {
            headers.insert(name.into(), AmqpValue::LongInt(3));
        }
        headers.insert("trace".into(), AmqpValue::LongString("abc".into()));
        let original = AmqpProperties::default()
            .with_headers(headers)
            .with_message_id("m-1".into());
        let copy = replayed(&original);
        let kept: Vec<String> = copy
            .headers()
            .as_ref()
            .unwrap()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(kept, ["trace", REPLAYS_HEADER]);
        assert_eq!(replays(&copy), 1);
        assert_eq!(replays(&replayed(&copy)), 2);
        assert_eq!(copy.message_id().as_deref(), Some("m-1"));
        assert_eq!(*copy.delivery_mode(), Some(2));
    }

    #[test]
    fn all_means_the_letters_there_at_the_start_and_a_limit_counts_what_is_done() {
        let never = || false;
        let progress = Progress::new(&never);
        assert_eq!(progress.wanted(None, 7), 7);
        assert_eq!(progress.wanted(Some(3), 7), 3);
        progress.add(2);
        assert_eq!(progress.wanted(Some(3), 7), 1);
        assert_eq!(progress.wanted(Some(10), 4), 4);
    }
}
