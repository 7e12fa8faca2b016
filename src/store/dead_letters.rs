//! The ledger of dead letters: one row per message a tenant has dead-lettered (per replay of
//! it: a replayed letter that fails again is dead-lettered again), so that a second
//! copy of a message already dead-lettered (the original redelivered after a crash or a lost
//! connection between its letter's confirm and its ack, or a retry copy duplicated the same way)
//! is acked without a second letter.
//!
//! The row is inserted in a transaction held open while the letter is published, and committed
//! only once the broker has confirmed it: a letter is never lost to the ledger (no row commits
//! without its letter in the DLQ), and a copy arriving meanwhile waits on the row's unique key
//! and then sees it. What is left is a crash in the instant between the broker's confirm and the
//! commit: the row rolls back and a redelivery letters the message a second time.
//!
//! Records are kept for a while (`prune`), not for ever: a copy of a message comes within the
//! longest retry delay, or as soon as its tenant consumes again; one arriving later than that is
//! lettered a second time (a duplicate, never a loss).

use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::{Condvar, Mutex};
use postgres::Client;

use super::{connect, DbSettings};
use crate::ids::TenantId;

/// The ledger's connections, at most `limit` at once (dead-lettering is rare; a burst of it
/// across a thousand tenants must not open a thousand connections).
pub struct Ledger {
    settings: DbSettings,
    limit: usize,
    /// The longest a record stays uncommitted: past it the database ends the session (its
    /// replica paused, or cut off), so that another copy of the message is not kept waiting.
    hold: Duration,
    idle: Mutex<Vec<Client>>,
    /// Connections out of `idle` (in use) right now.
    busy: Mutex<usize>,
    freed: Condvar,
}

/// A letter being recorded: its row is inserted and uncommitted until `commit`; dropped, it
/// rolls back.
pub struct Pending<'a> {
    ledger: &'a Ledger,
    client: Option<Client>,
}

impl Ledger {
    /// `hold`: longer than a letter's publish may take (the broker's confirm timeout).
    pub fn new(settings: DbSettings, limit: usize, hold: Duration) -> Ledger {
        Ledger {
            settings,
            limit: limit.max(1),
            hold,
            idle: Mutex::new(Vec::new()),
            busy: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Starts recording `message_id` as dead-lettered for `tenant` after `replays` replays:
    /// `None` when it already is (a copy of a message already in the DLQ), else the pending
    /// row, to commit once the letter is confirmed. Waits for a copy being recorded at the same
    /// time to settle.
    pub fn begin(
        &self,
        tenant: TenantId,
        message_id: &str,
        replays: i64,
    ) -> Result<Option<Pending<'_>>> {
        let mut pending = Pending {
            ledger: self,
            client: Some(self.take()?),
        };
        let client = pending.client.as_mut().expect("just taken");
        // A copy being recorded elsewhere is waited for, but not for ever (a replica stopped
        // mid-publish holds its row): the message is then tried again later. A replica that
        // stopped answering holds it no longer than `hold`: the database ends its session.
        let hold = self.hold.as_millis().max(1);
        client.batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '5s';
             SET LOCAL idle_in_transaction_session_timeout = {hold}"
        ))?;
        let inserted = client
            .execute(
                "INSERT INTO dead_letters (tenant_id, message_id, replays) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&tenant.uuid(), &message_id, &replays],
            )
            .context("recording a dead letter")?;
        Ok((inserted == 1).then_some(pending))
    }

    /// A connection: an idle one, or a new one while fewer than `limit` are out.
    fn take(&self) -> Result<Client> {
        let mut busy = self.busy.lock();
        while *busy >= self.limit {
            self.freed.wait_for(&mut busy, Duration::from_secs(1));
        }
        *busy += 1;
        drop(busy);
        let kept = self.idle.lock().pop();
        let client = match kept {
            Some(client) if !client.is_closed() => Ok(client),
            _ => connect(&self.settings, "tenantd dead letters"),
        };
        if client.is_err() {
            self.give_back(None);
        }
        client
    }

    fn give_back(&self, client: Option<Client>) {
        if let Some(client) = client.filter(|c| !c.is_closed()) {
            self.idle.lock().push(client);
        }
        *self.busy.lock() -= 1;
        self.freed.notify_one();
    }
}

/// The most records one `prune` forgets.
const PRUNE_BATCH: i64 = 10_000;

/// Forgets the records older than `keep` (on the database's clock), at most `PRUNE_BATCH` of
/// them, skipping any another replica is forgetting; the number forgotten.
pub fn prune(client: &mut Client, keep: Duration) -> Result<u64> {
    client
        .execute(
            "DELETE FROM dead_letters WHERE ctid = ANY (ARRAY(
                 SELECT ctid FROM dead_letters
                 WHERE dead_lettered_at < now() - make_interval(secs => $1)
                 ORDER BY dead_lettered_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED))",
            &[&keep.as_secs_f64(), &PRUNE_BATCH],
        )
        .context("forgetting old records of dead letters")
}

impl Pending<'_> {
    /// The letter is in the DLQ: the row becomes visible to every replica.
    pub fn commit(mut self) -> Result<()> {
        let mut client = self.client.take().expect("present until dropped");
        let committed = client.batch_execute("COMMIT");
        self.ledger.give_back(Some(client));
        committed.context("committing a dead letter's record")
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut client) = self.client.take() {
            let kept = client.batch_execute("ROLLBACK").is_ok();
            self.ledger.give_back(kept.then_some(client));
        }
    }
}
