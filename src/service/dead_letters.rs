//! What an operator does with a tenant's dead letters once the cause is fixed: look at the
//! oldest, replay them to the tenant's queue, or drop them. Each holds the lock of the tenant's
//! dead letters, so only one look, replay or drop runs per tenant at a time (a look reads up to
//! a thousand letters; one caller looping over them cannot take the broker from the others),
//! and a look holds at most `PAGE_BYTES` of bodies.

use base64::Engine;
use chrono::{DateTime, Utc};
use log::{info, warn};
use serde::Serialize;
use serde_json::value::RawValue;

use super::{Service, ServiceError, ServiceResult};
use crate::broker::{DeadLetter, Progress, Shown, Unroutable};
use crate::cursor;
use crate::ids::TenantId;
use crate::model::Status;
use crate::store::{dead_letters as ledger, tenants};

/// How deep the pages of dead letters reach: a page is read from the head of the DLQ each time,
/// so a deeper one costs more round trips (and, on a quorum queue, counts as a delivery of
/// every letter before it). `total` tells how many there are beyond.
pub const MAX_PEEK_DEPTH: u64 = 1000;

/// Payloads larger than this are not shown in a page (their `size` is).
const MAX_SHOWN_BYTES: usize = 64 * 1024;

/// The most payload bytes one page of dead letters holds; it ends before the letter that would
/// pass it (the first letter always shows, within `MAX_SHOWN_BYTES`).
const PAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long the record of a dead letter is kept: a copy of the message arriving later is
/// lettered again.
pub const LEDGER_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl Service {
    /// Forgets the records of dead letters older than `keep`; the number forgotten.
    pub fn forget_old_letters(&self, keep: std::time::Duration) -> anyhow::Result<u64> {
        ledger::prune(&mut *self.db.get()?, keep)
    }
}

#[derive(Serialize)]
pub struct DeadLetterPage {
    pub data: Vec<DeadLetterView>,
    pub next_cursor: Option<String>,
    /// Letters in the DLQ when the page was read.
    pub total: u32,
}

#[derive(Serialize)]
pub struct DeadLetterView {
    pub message_id: Option<String>,
    /// The body: as JSON when it is JSON, else base64; `null` when larger than shown.
    pub payload: Option<Payload>,
    pub payload_encoding: &'static str,
    /// The body's size in bytes.
    pub size: usize,
    pub reason: Option<String>,
    pub attempts: u32,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum Payload {
    /// Passed through as written.
    Json(Box<RawValue>),
    Base64(String),
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> DeadLetterView {
        let size = letter.size;
        let (payload, payload_encoding) = match letter.body.as_deref().and_then(shown) {
            Some(payload @ Payload::Json(_)) => (Some(payload), "json"),
            Some(payload @ Payload::Base64(_)) => (Some(payload), "base64"),
            None => (None, "omitted"),
        };
        DeadLetterView {
            message_id: letter.message_id,
            payload,
            payload_encoding,
            size,
            reason: letter.reason,
            attempts: letter.attempts,
            dead_lettered_at: letter.dead_lettered_at,
        }
    }
}

fn shown(body: &[u8]) -> Option<Payload> {
    if body.len() > MAX_SHOWN_BYTES {
        return None;
    }
    Some(match serde_json::from_slice::<Box<RawValue>>(body) {
        Ok(json) => Payload::Json(json),
        Err(_) => Payload::Base64(base64::engine::general_purpose::STANDARD.encode(body)),
    })
}

/// What a replay did: letters moved to the tenant's queue, letters left in the DLQ.
#[derive(Serialize)]
pub struct Replayed {
    pub moved: u64,
    pub remaining: u32,
}

/// What a drop did: letters dropped, letters left in the DLQ.
#[derive(Serialize)]
pub struct Dropped {
    pub dropped: u64,
    pub remaining: u32,
}

impl Service {
    /// The oldest dead letters, a page at a time, left in the DLQ in their order.
    pub fn dead_letters(
        &self,
        id: TenantId,
        cursor: Option<&str>,
        limit: u64,
    ) -> ServiceResult<DeadLetterPage> {
        let skip = match cursor {
            None | Some("") => 0,
            Some(c) => cursor::decode_offset(c)
                .filter(|skip| *skip < MAX_PEEK_DEPTH)
                .ok_or_else(|| ServiceError::Invalid("invalid cursor".into()))?,
        };
        let limit = limit.min(MAX_PEEK_DEPTH - skip);
        let shown = Shown {
            letter: MAX_SHOWN_BYTES,
            page: PAGE_BYTES,
        };
        let peeked = self
            .with_letters_locked(id, false, || {
                self.admin.peek_dead_letters(id, skip, limit, shown)
            })?
            .map_err(ServiceError::broker)?;
        let next = skip + peeked.letters.len() as u64;
        let next_cursor =
            (peeked.more && next < MAX_PEEK_DEPTH).then(|| cursor::encode_offset(next));
        Ok(DeadLetterPage {
            data: peeked
                .letters
                .into_iter()
                .map(DeadLetterView::from)
                .collect(),
            next_cursor,
            total: peeked.total,
        })
    }

    /// Moves up to `limit` dead letters (`None`: every one there when it starts) back to the
    /// tenant's queue, each confirmed there before it leaves the DLQ, with its attempts reset.
    /// A paused tenant's queue keeps them until it resumes; a tenant being deleted is refused.
    pub fn replay_dead_letters(&self, id: TenantId, limit: Option<u64>) -> ServiceResult<Replayed> {
        let (moved, remaining) = self.exclusively(id, "replay", |progress| {
            self.admin.replay_dead_letters(id, limit, progress)
        })?;
        self.metrics
            .dead_letters_replayed
            .with_label_values(&[&id.to_string()])
            .inc_by(moved);
        let remaining = remaining.map_err(|e| self.failed(id, "replayed", moved, e))?;
        info!(tenant_id:% = id, moved, remaining; "dead letters replayed");
        Ok(Replayed { moved, remaining })
    }

    /// Drops up to `limit` dead letters (`None`: every one there).
    pub fn drop_dead_letters(&self, id: TenantId, limit: Option<u64>) -> ServiceResult<Dropped> {
        let (dropped, remaining) = self.exclusively(id, "drop", |progress| {
            self.admin.drop_dead_letters(id, limit, progress)
        })?;
        self.metrics
            .dead_letters_dropped
            .with_label_values(&[&id.to_string()])
            .inc_by(dropped);
        let remaining = remaining.map_err(|e| self.failed(id, "dropped", dropped, e))?;
        info!(tenant_id:% = id, dropped, remaining; "dead letters dropped");
        Ok(Dropped { dropped, remaining })
    }

    /// Runs a replay or drop (`op`) holding the lock of the tenant's dead letters. Returns how
    /// many letters `op` got through, and its outcome.
    fn exclusively(
        &self,
        id: TenantId,
        what: &str,
        op: impl FnOnce(&Progress) -> anyhow::Result<u32>,
    ) -> ServiceResult<(u64, anyhow::Result<u32>)> {
        self.with_letters_locked(id, true, || {
            info!(tenant_id:% = id; "dead letters: {what} starts");
            let stop = || self.is_stopping();
            let progress = Progress::new(&stop);
            let outcome = op(&progress);
            (progress.done(), outcome)
        })
    }

    /// Runs `op` holding the lock of the tenant's dead letters, taken without waiting: a second
    /// look, replay or drop is refused at once rather than queued behind a long one. With
    /// `moves`, a tenant being deleted is refused too (its letters go with it).
    fn with_letters_locked<T>(
        &self,
        id: TenantId,
        moves: bool,
        op: impl FnOnce() -> T,
    ) -> ServiceResult<T> {
        let mut db = self.db.get().map_err(ServiceError::database)?;
        let status = tenants::status(&mut db, id)
            .map_err(ServiceError::database)?
            .ok_or_else(|| ServiceError::tenant_not_found(id))?;
        if moves && status == Status::Deleting {
            return Err(ServiceError::Conflict(format!(
                "tenant {id} is being deleted"
            )));
        }
        if !tenants::try_lock_dead_letters(&mut db, id).map_err(ServiceError::database)? {
            return Err(ServiceError::Conflict(format!(
                "a look, replay or drop of tenant {id}'s dead letters is already running; try \
                 again once it has answered"
            )));
        }
        let outcome = op();
        if tenants::unlock_dead_letters(&mut db, id).is_err() {
            // Closing the session releases the lock.
            db.discard();
        }
        Ok(outcome)
    }

    /// The error of a replay or drop that stopped midway, saying how far it got.
    fn failed(&self, id: TenantId, done: &str, n: u64, e: anyhow::Error) -> ServiceError {
        warn!(tenant_id:% = id; "dead letters: stopped after {n} {done}: {e:#}");
        let so_far = format!("{n} dead letters were {done} before it stopped");
        match e.downcast_ref::<Unroutable>() {
            Some(u) => ServiceError::Unavailable(format!("{u}; {so_far}")),
            None => {
                ServiceError::Unavailable(format!("message broker unavailable: {e:#}; {so_far}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(body: &[u8]) -> serde_json::Value {
        let letter = DeadLetter {
            message_id: None,
            body: Some(body.to_vec()),
            size: body.len(),
            reason: None,
            attempts: 0,
            dead_lettered_at: None,
        };
        serde_json::to_value(DeadLetterView::from(letter)).unwrap()
    }

    #[test]
    fn a_payload_shows_as_json_when_it_is_json_else_as_base64_and_not_at_all_when_huge() {
        let json = view(br#"{"a": [1, 2.50]}"#);
        assert_eq!(json["payload_encoding"], "json");
        assert_eq!(
            serde_json::to_string(&json["payload"]).unwrap(),
            r#"{"a":[1,2.5]}"#
        );
        let text = view(b"\x00\xffnot json");
        assert_eq!(text["payload_encoding"], "base64");
        assert_eq!(text["payload"], "AP9ub3QganNvbg==");
        let huge = view(&vec![b' '; MAX_SHOWN_BYTES + 1]);
        assert_eq!(huge["payload_encoding"], "omitted");
        assert_eq!(huge["payload"], serde_json::Value::Null);
        assert_eq!(huge["size"], MAX_SHOWN_BYTES + 1);
    }

    #[test]
    fn a_payload_passes_through_as_written() {
        let body = br#"{"big": 12345678901234567890, "f": 1.0}"#;
        let letter = DeadLetter {
            message_id: Some("m".into()),
            body: Some(body.to_vec()),
            size: body.len(),
            reason: Some("r".into()),
            attempts: 3,
            dead_lettered_at: None,
        };
        let text = serde_json::to_string(&DeadLetterView::from(letter)).unwrap();
        assert!(
            text.contains(r#""payload":{"big": 12345678901234567890, "f": 1.0}"#),
            "{text}"
        );
    }
}
