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
    pub fn new(settings: DbSettings, limit: usize) -> Ledger {
        Ledger {
            settings,
            limit: limit.max(1),
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
        // mid-publish holds its row): the message is then tried again later.
        client.batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'")?;
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
