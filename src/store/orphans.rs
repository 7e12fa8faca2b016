//! Create intents: a tenant's create records its id here before it declares the tenant's
//! queues, and removes the record in the transaction that inserts the tenant's row. A record
//! older than the grace with no row is a create that was interrupted (a crash, a lost
//! database): its queues are orphans. The broker cannot list queues over AMQP, so these records
//! are how orphans are found.
//!
//! A create and a sweep never both succeed: the sweep locks the record it removes queues for
//! (skipping one a create holds), and the create's transaction deletes the record before it
//! inserts the row, waiting for a sweep that holds it and failing if it is gone.

use super::locks;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use postgres::{Client, Transaction};

use crate::ids::TenantId;

/// The most records one sweep takes.
const SWEEP_BATCH: i64 = 100;

/// Records that a create of `id` begins (before its queues are declared).
pub fn intend(client: &mut Client, id: TenantId) -> Result<()> {
    client
        .execute(
            "INSERT INTO tenant_creates (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&id.uuid()],
        )
        .context("recording a create")?;
    Ok(())
}

/// In the transaction inserting the tenant's row: the create is done. Fails when a sweep took
/// the record (and the queues) because the create took longer than the grace.
pub fn fulfil(tx: &mut Transaction, id: TenantId) -> Result<()> {
    let deleted = tx.execute(
        "DELETE FROM tenant_creates WHERE tenant_id = $1",
        &[&id.uuid()],
    )?;
    if deleted == 0 {
        bail!("the create took too long: its queues were removed as orphans");
    }
    Ok(())
}

/// A create that failed and removed its queues itself.
pub fn abandon(client: &mut Client, id: TenantId) -> Result<()> {
    client.execute(
        "DELETE FROM tenant_creates WHERE tenant_id = $1",
        &[&id.uuid()],
    )?;
    Ok(())
}

/// When no other replica sweeps: takes the records older than `grace` (on the database's clock)
/// whose tenant has no row, calls `remove` for each (it deletes the queues) and deletes the
/// records it succeeded for, stopping at the first failure. Returns the ids swept.
pub fn sweep(
    client: &mut Client,
    grace: Duration,
    mut remove: impl FnMut(TenantId) -> Result<()>,
) -> Result<Vec<TenantId>> {
    let mut tx = client.transaction()?;
    let row = tx.query_one("SELECT pg_try_advisory_xact_lock($1, 0)", &[&locks::SWEEP])?;
    if !row.get::<_, bool>(0) {
        return Ok(Vec::new());
    }
    let rows = tx.query(
        "SELECT c.tenant_id FROM tenant_creates c
         WHERE c.started_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM tenants t WHERE t.id = c.tenant_id)
         ORDER BY c.started_at
         LIMIT $2
         FOR UPDATE OF c SKIP LOCKED",
        &[&grace.as_secs_f64(), &SWEEP_BATCH],
    )?;
    let mut swept = Vec::new();
    let mut failed = None;
    for row in rows {
        let id = TenantId::from(row.get::<_, uuid::Uuid>(0));
        if let Err(e) = remove(id) {
            failed = Some(e);
            break;
        }
        tx.execute(
            "DELETE FROM tenant_creates WHERE tenant_id = $1",
            &[&id.uuid()],
        )?;
        swept.push(id);
    }
    tx.commit()?;
    match failed {
        Some(e) if swept.is_empty() => Err(e),
        _ => Ok(swept),
    }
}
