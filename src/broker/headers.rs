//! The headers tenantd writes on the copies of a message that failed (in the retry queue and
//! the DLQ): written by the tenant thread's book, read by the relay and the dead-letter looks.

use amiquip::{AmqpProperties, AmqpValue};

/// Header counting a message's failed attempts; it travels with the message, so the count
/// survives restarts.
pub const ATTEMPTS_HEADER: &str = "x-tenantd-attempts";
/// Header saying why the last attempt failed.
pub const REASON_HEADER: &str = "x-tenantd-reason";
/// Header of a copy in the retry queue: when (Unix time, ms) it goes back to the tenant's queue.
pub const RETRY_AT_HEADER: &str = "x-tenantd-retry-at";
/// Header of a copy in the DLQ: when (Unix time, ms) it was dead-lettered.
pub const DEAD_LETTERED_AT_HEADER: &str = "x-tenantd-dead-lettered-at";
/// Header counting how many times the message was replayed from the DLQ: the ledger of dead
/// letters records it once per replay.
pub const REPLAYS_HEADER: &str = "x-tenantd-replays";

/// How many times this message has failed before, from its header.
pub fn attempts(properties: &AmqpProperties) -> u32 {
    count(properties, ATTEMPTS_HEADER).clamp(0, 1000) as u32
}

/// How many times this message was replayed from the DLQ, from its header.
pub fn replays(properties: &AmqpProperties) -> i64 {
    count(properties, REPLAYS_HEADER).max(0)
}

/// A header's integer, 0 when it is missing or not an integer.
fn count(properties: &AmqpProperties, header: &str) -> i64 {
    let value = properties.headers().as_ref().and_then(|h| h.get(header));
    match value {
        Some(AmqpValue::LongInt(n)) => i64::from(*n),
        Some(AmqpValue::LongLongInt(n)) => *n,
        Some(AmqpValue::ShortInt(n)) => i64::from(*n),
        Some(AmqpValue::LongUInt(n)) => i64::from(*n),
        _ => 0,
    }
}
