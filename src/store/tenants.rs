//! Tenant rows, their partitions, the per-tenant lock every lifecycle operation holds, and the
//! lock of a tenant's dead letters.

use super::locks;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::{Client, Row};
use uuid::Uuid;

use super::notify;
use crate::ids::TenantId;
use crate::model::{ConsumerInfo, Status, Tenant};

/// Takes the tenant's lock on this session, waiting at most `timeout`. Every operation that
/// changes a tenant holds it from its first read to its last write, on whichever replica it
/// runs, so two operations on one tenant never interleave. The server releases it if the
/// session ends.
pub fn lock(client: &mut Client, id: TenantId, timeout: Duration) -> Result<()> {
    let mut tx = client.transaction()?;
    let ms = timeout.as_millis().max(1);
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {ms}"))?;
    tx.execute(
        "SELECT pg_advisory_lock($1, $2)",
        &[&locks::TENANT, &id.lock_key()],
    )?;
    tx.commit()?;
    Ok(())
}

pub fn unlock(client: &mut Client, id: TenantId) -> Result<()> {
    client.execute(
        "SELECT pg_advisory_unlock($1, $2)",
        &[&locks::TENANT, &id.lock_key()],
    )?;
    Ok(())
}

/// Takes the lock of the tenant's dead letters on this session if no session holds it: one
/// replay or drop per tenant at a time, on whichever replica each arrives. Another lock than
/// the tenant's own: a replay may run for minutes and must not hold up a pause or a delete,
/// nor wait behind one. The server releases it if the session ends.
pub fn try_lock_dead_letters(client: &mut Client, id: TenantId) -> Result<bool> {
    let row = client.query_one(
        "SELECT pg_try_advisory_lock($1, $2)",
        &[&locks::DEAD_LETTERS, &id.lock_key()],
    )?;
    Ok(row.get(0))
}

pub fn unlock_dead_letters(client: &mut Client, id: TenantId) -> Result<()> {
    client.execute(
        "SELECT pg_advisory_unlock($1, $2)",
        &[&locks::DEAD_LETTERS, &id.lock_key()],
    )?;
    Ok(())
}

/// Inserts the tenant's row and attaches its partition, all or nothing, and announces it.
///
/// The partition is built aside and attached (SHARE UPDATE EXCLUSIVE on `messages`) rather than
/// created with `PARTITION OF` (ACCESS EXCLUSIVE), so other tenants keep writing meanwhile.
pub fn create(client: &mut Client, tenant: &Tenant) -> Result<()> {
    let id = tenant.tenant_id();
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'")?;
    super::orphans::fulfil(&mut tx, id)?;
    tx.execute(
        "INSERT INTO tenants (id, name, description, status, workers, version, created_at,
                              updated_at)
         VALUES ($1, $2, $3, $4, $5, 1, $6, $7)",
        &[
            &tenant.id,
            &tenant.name,
            &tenant.description,
            &tenant.status.as_str(),
            &i32::from(tenant.workers),
            &tenant.created_at,
            &tenant.updated_at,
        ],
    )?;
    tx.batch_execute(&partition_ddl(id))
        .with_context(|| format!("creating partition {}", id.partition_name()))?;
    notify(&mut tx, &id.to_string())?;
    tx.commit()?;
    Ok(())
}

fn partition_ddl(id: TenantId) -> String {
    let p = id.partition_name();
    format!(
        r#"CREATE TABLE "{p}" (
               id uuid NOT NULL,
               tenant_id uuid NOT NULL,
               payload jsonb NOT NULL,
               created_at timestamptz NOT NULL DEFAULT now(),
               CONSTRAINT "{p}_tenant_check" CHECK (tenant_id = '{id}'),
               CONSTRAINT "{p}_pkey" PRIMARY KEY (tenant_id, id)
           );
           CREATE INDEX "{p}_created_at_id_idx" ON "{p}" (tenant_id, created_at, id);
           ALTER TABLE messages ATTACH PARTITION "{p}" FOR VALUES IN ('{id}');"#
    )
}

/// Removes the tenant's partition and row, and announces it. The partition is detached
/// CONCURRENTLY first, so dropping it never takes a lock on `messages` that would stall other
/// tenants. Every step may be repeated after a failure.
pub fn drop_with_partition(client: &mut Client, id: TenantId) -> Result<()> {
    let p = id.partition_name();
    if partition_is_attached(client, id)? {
        // A concurrent detach waits for every transaction that could see the partition: it
        // may take longer than a statement is otherwise allowed to.
        client.batch_execute("SET statement_timeout = 0")?;
        let detach = format!(r#"ALTER TABLE messages DETACH PARTITION "{p}" CONCURRENTLY"#);
        let detached = client.batch_execute(&detach);
        client.batch_execute("RESET statement_timeout")?;
        if let Err(e) = detached {
            // A detach interrupted earlier leaves the partition pending; finish that one.
            let finalize = format!(r#"ALTER TABLE messages DETACH PARTITION "{p}" FINALIZE"#);
            client
                .batch_execute(&finalize)
                .map_err(|_| e)
                .with_context(|| format!("detaching partition {p}"))?;
        }
    }
    client
        .batch_execute(&format!(r#"DROP TABLE IF EXISTS "{p}""#))
        .with_context(|| format!("dropping partition {p}"))?;
    let mut tx = client.transaction()?;
    tx.execute("DELETE FROM tenants WHERE id = $1", &[&id.uuid()])?;
    notify(&mut tx, &id.to_string())?;
    tx.commit()?;
    Ok(())
}

fn partition_is_attached(client: &mut Client, id: TenantId) -> Result<bool> {
    let row = client.query_one(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                        WHERE i.inhparent = 'messages'::regclass AND c.relname = $1)",
        &[&id.partition_name()],
    )?;
    Ok(row.get(0))
}

/// A tenant with its live consumer: the claim of a replica that holds its liveness lock.
const TENANT_SELECT: &str = "SELECT t.id, t.name, t.description, t.status, t.workers, t.version,
            t.created_at, t.updated_at,
            c.replica_id, c.state, c.workers, c.version, c.error, c.updated_at
     FROM tenants t
     LEFT JOIN consumers c ON c.tenant_id = t.id
          AND c.replica_id IN (SELECT id FROM live_replicas)";

fn tenant_from_row(row: &Row) -> Tenant {
    let status: String = row.get(3);
    let workers: i32 = row.get(4);
    Tenant {
        id: row.get(0),
        name: row.get(1),
        description: row.get(2),
        // The CHECK constraints on `tenants` make both conversions total.
        status: Status::parse(&status).unwrap_or(Status::Inactive),
        workers: u16::try_from(workers).unwrap_or(u16::MAX),
        version: row.get(5),
        created_at: row.get(6),
        updated_at: row.get(7),
        consumer: consumer_from_row(row, 8),
    }
}

fn consumer_from_row(row: &Row, at: usize) -> Option<ConsumerInfo> {
    let replica: Option<String> = row.get(at);
    let workers: Option<i32> = row.get(at + 2);
    Some(ConsumerInfo {
        replica: replica?,
        state: row.get(at + 1),
        workers: workers.and_then(|w| u16::try_from(w).ok()),
        version: row.get(at + 3),
        error: row.get(at + 4),
        since: row.get(at + 5),
    })
}

/// The tenant's status alone: a cheap read for every publish (typed, so one round trip
/// instead of a prepare and an execute).
pub fn status(client: &mut Client, id: TenantId) -> Result<Option<Status>> {
    let row = client.query_typed_opt(
        "SELECT status FROM tenants WHERE id = $1",
        &[(&id.uuid(), postgres::types::Type::UUID)],
    )?;
    Ok(row.map(|r| Status::parse(r.get(0)).unwrap_or(Status::Inactive)))
}

pub fn get(client: &mut Client, id: TenantId) -> Result<Option<Tenant>> {
    let sql = format!("{TENANT_SELECT} WHERE t.id = $1");
    Ok(client
        .query_opt(&sql, &[&id.uuid()])?
        .as_ref()
        .map(tenant_from_row))
}

/// Tenants in creation order, strictly after `after` (a `(created_at, id)` position).
pub fn list(
    client: &mut Client,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Tenant>> {
    let rows = match after {
        Some((at, id)) => {
            let sql = format!(
                "{TENANT_SELECT} WHERE (t.created_at, t.id) > ($1, $2)
                 ORDER BY t.created_at, t.id LIMIT $3"
            );
            client.query(&sql, &[&at, &id, &limit])?
        }
        None => {
            let sql = format!("{TENANT_SELECT} ORDER BY t.created_at, t.id LIMIT $1");
            client.query(&sql, &[&limit])?
        }
    };
    Ok(rows.iter().map(tenant_from_row).collect())
}

/// Writes the tenant's name, description, status and workers as given and bumps `updated_at`;
/// with `bump`, also its version, announcing the change to the replicas.
pub fn save(client: &mut Client, tenant: &Tenant, bump: bool) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute(
        "UPDATE tenants SET name = $2, description = $3, status = $4, workers = $5,
                version = version + $6, updated_at = now()
         WHERE id = $1",
        &[
            &tenant.id,
            &tenant.name,
            &tenant.description,
            &tenant.status.as_str(),
            &i32::from(tenant.workers),
            &i64::from(bump),
        ],
    )?;
    if bump {
        notify(&mut tx, &tenant.id.to_string())?;
    }
    tx.commit()?;
    Ok(())
}

/// Rows in the tenant's partition: counted when PostgreSQL estimates fewer than `exact_below`
/// (or has no estimate yet), its estimate (as of its last analyze) above. `None` when another
/// session holds the partition locked against reads: a view never waits behind it.
pub fn rows(client: &mut Client, id: TenantId, exact_below: i64) -> Result<Option<i64>> {
    let estimate: Option<f32> = client
        .query_opt(
            "SELECT reltuples FROM pg_class WHERE relname = $1",
            &[&id.partition_name()],
        )?
        .map(|r| r.get(0));
    match estimate {
        Some(n) if n as i64 >= exact_below => Ok(Some(n as i64)),
        _ => count_without_waiting(client, id),
    }
}

fn count_without_waiting(client: &mut Client, id: TenantId) -> Result<Option<i64>> {
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL lock_timeout = 100")?;
    let sql = format!(r#"SELECT count(*) FROM "{}""#, id.partition_name());
    match tx.query_one(&sql, &[]) {
        Ok(row) => Ok(Some(row.get(0))),
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Tenant ids after `after` in id order: the walk order of `/api/messages` over all tenants.
pub fn ids_after(client: &mut Client, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>> {
    let rows = client.query(
        "SELECT id FROM tenants WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after.unwrap_or_else(Uuid::nil), &limit],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub fn all_ids(client: &mut Client) -> Result<Vec<Uuid>> {
    let rows = client.query("SELECT id FROM tenants", &[])?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
