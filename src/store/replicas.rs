//! Replicas and their claims on tenants: which replicas are live (a session holding the
//! replica's advisory lock, released by the server the moment that session ends, and a
//! heartbeat younger than the replica's failover timeout), which replica consumes which tenant,
//! and how that consumer is doing.

use super::locks;
use std::time::Duration;

use anyhow::{bail, Result};
use chrono::{DateTime, Utc};
use postgres::{Client, Row};
use serde::Serialize;

use super::notify;
use crate::ids::TenantId;
use crate::model::{Claimed, ConsumerInfo, Report, Status};

/// The payload announcing a change in the set of replicas.
pub const REPLICAS_CHANGED: &str = "replicas";
/// The payload announcing claims given up.
const RELEASED: &str = "released";

#[derive(Clone, Debug, Serialize)]
pub struct Replica {
    pub id: String,
    pub http_addr: Option<String>,
    /// Draining its tenants before it stops: it takes no new ones.
    pub leaving: bool,
    /// It cannot reach the broker while others can: it takes no tenants until it can.
    pub broker_down: bool,
    /// Most tenants it runs (`MAX_TENANTS`), when capped.
    pub max_tenants: Option<i32>,
    pub started_at: DateTime<Utc>,
    /// Tenants whose consumer it runs (claims it holds).
    pub tenants: i64,
}

/// Asks the server to notice within about `timeout` that this session's client is gone
/// (SIGKILL is seen at once; a lost network only through keepalives), so a dead replica's
/// liveness lock is released in time for another to take its tenants.
pub fn set_liveness_timeout(client: &mut Client, timeout: Duration) -> Result<()> {
    let secs = (timeout.as_secs() / 4).max(1);
    let ms = (timeout.as_millis() / 2).max(1000);
    client.batch_execute(&format!(
        "SET tcp_keepalives_idle = {secs}; SET tcp_keepalives_interval = {secs};
         SET tcp_keepalives_count = 2; SET tcp_user_timeout = {ms}"
    ))?;
    Ok(())
}

/// Makes statements on this session fail after waiting `timeout` for a lock.
pub fn set_lock_timeout(client: &mut Client, timeout: Duration) -> Result<()> {
    let ms = timeout.as_millis().max(1);
    client.batch_execute(&format!("SET lock_timeout = {ms}"))?;
    Ok(())
}

/// Registers the replica (with what it says of itself, as a heartbeat does: one joining again
/// while cut from the broker still says so) and takes its liveness lock on this session. Fails
/// when a live replica already uses the id.
pub fn join(client: &mut Client, id: &str, http_addr: &str, beat: Beat) -> Result<()> {
    let mut tx = client.transaction()?;
    let existing = tx.query_opt(
        "SELECT lock_key FROM replicas WHERE id = $1 FOR UPDATE",
        &[&id],
    )?;
    let key: i32 = match existing {
        Some(row) => row.get(0),
        None => tx
            .query_one(
                "INSERT INTO replicas (id) VALUES ($1) RETURNING lock_key",
                &[&id],
            )?
            .get(0),
    };
    let locked: bool = tx
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2)",
            &[&locks::REPLICA, &key],
        )?
        .get(0);
    if !locked {
        bail!("REPLICA_ID={id:?} is in use by another running tenantd");
    }
    tx.execute(
        "UPDATE replicas SET http_addr = $2, leaving = false, started_at = now(), seen_at = now(),
                             failover_ms = $3, broker_down = $5, max_tenants = $4
         WHERE id = $1",
        &[
            &id,
            &http_addr,
            &millis(beat.failover),
            &cap(beat.max_tenants),
            &beat.broker_down,
        ],
    )?;
    notify(&mut tx, REPLICAS_CHANGED)?;
    tx.commit()?;
    Ok(())
}

/// Says the replica is draining its tenants to stop: the others stop counting on it.
pub fn leave(client: &mut Client, id: &str) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("UPDATE replicas SET leaving = true WHERE id = $1", &[&id])?;
    notify(&mut tx, REPLICAS_CHANGED)?;
    tx.commit()?;
    Ok(())
}

/// Drops the rows of replicas that have been gone for an hour.
pub fn forget_dead(client: &mut Client) -> Result<u64> {
    Ok(client.execute(
        "DELETE FROM replicas WHERE id NOT IN (SELECT id FROM live_replicas)
                                AND seen_at < now() - interval '1 hour'",
        &[],
    )?)
}

/// What a replica says of itself with every heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    pub failover: Duration,
    pub broker_down: bool,
    /// Most tenants it runs (0: no cap).
    pub max_tenants: u32,
}

/// Records that the replica answers now, with its failover timeout and whether it can reach
/// the broker; a change of the latter is announced (the plan changes).
pub fn heartbeat(client: &mut Client, id: &str, beat: Beat) -> Result<()> {
    let mut tx = client.transaction()?;
    // The heartbeat waits as long as it must: the fence acts on its silence.
    tx.batch_execute("SET LOCAL lock_timeout = 0")?;
    let changed = tx
        .query_opt(
            "UPDATE replicas SET seen_at = now(), failover_ms = $2, broker_down = $3,
                                 max_tenants = $4
             FROM (SELECT broker_down AS was FROM replicas WHERE id = $1) old
             WHERE replicas.id = $1 RETURNING old.was <> $3",
            &[
                &id,
                &millis(beat.failover),
                &beat.broker_down,
                &cap(beat.max_tenants),
            ],
        )?
        // Forgotten after an hour's silence (a process stopped that long): join again.
        .ok_or_else(|| anyhow::anyhow!("the row of replica {id} is gone"))?
        .get(0);
    if changed {
        notify(&mut tx, REPLICAS_CHANGED)?;
    }
    tx.commit()?;
    Ok(())
}

/// A cap as stored: none for 0.
fn cap(max_tenants: u32) -> Option<i32> {
    i32::try_from(max_tenants).ok().filter(|&m| m > 0)
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Whether a replica other than `replica` heartbeated within the last minute (live or not):
/// a fleet that is starting together.
pub fn peers_seen_lately(client: &mut Client, replica: &str) -> Result<bool> {
    let row = client.query_one(
        "SELECT EXISTS (SELECT 1 FROM replicas
                        WHERE id <> $1 AND seen_at > now() - interval '1 minute')",
        &[&replica],
    )?;
    Ok(row.get(0))
}

/// Whether a live replica other than `replica`, not cut from the broker, runs a consumer (the
/// broker answers others), or, staying and not cut, has no claim at all (an idle replica, when
/// there are fewer tenants than replicas, shows nothing either way: it may try, rather than the
/// tenants wait unconsumed for as long as the cut lasts).
pub fn others_consume(client: &mut Client, replica: &str) -> Result<bool> {
    let row = client.query_one(
        "SELECT EXISTS (SELECT 1 FROM consumers c JOIN live_replicas r ON r.id = c.replica_id
                        WHERE c.state = 'running' AND r.id <> $1 AND NOT r.broker_down)
             OR EXISTS (SELECT 1 FROM live_replicas r
                        WHERE r.id <> $1 AND NOT r.broker_down AND NOT r.leaving
                          AND NOT EXISTS (SELECT 1 FROM consumers c WHERE c.replica_id = r.id))",
        &[&replica],
    )?;
    Ok(row.get(0))
}

/// The live replicas in id order, with the number of tenants each runs.
pub fn live(client: &mut Client) -> Result<Vec<Replica>> {
    let rows = client.query(
        "SELECT r.id, r.http_addr, r.leaving, r.started_at,
                (SELECT count(*) FROM consumers c WHERE c.replica_id = r.id), r.broker_down,
                r.max_tenants
         FROM live_replicas r ORDER BY r.id",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| Replica {
            id: r.get(0),
            http_addr: r.get(1),
            leaving: r.get(2),
            started_at: r.get(3),
            tenants: r.get(4),
            broker_down: r.get(5),
            max_tenants: r.get(6),
        })
        .collect())
}

/// A tenant's desired state with the replica that claims it (live or not).
#[derive(Clone, Debug)]
pub struct TenantState {
    pub id: TenantId,
    pub status: Status,
    pub workers: u16,
    pub version: i64,
    pub owner: Option<String>,
}

/// Every tenant's desired state and claim: what a replica reconciles against.
pub fn states(client: &mut Client) -> Result<Vec<TenantState>> {
    let rows = client.query(
        "SELECT t.id, t.status, t.workers, t.version, c.replica_id
         FROM tenants t LEFT JOIN consumers c ON c.tenant_id = t.id ORDER BY t.id",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let status: String = r.get(1);
            let id: uuid::Uuid = r.get(0);
            TenantState {
                id: id.into(),
                status: Status::parse(&status).unwrap_or(Status::Inactive),
                workers: u16::try_from(r.get::<_, i32>(2)).unwrap_or(u16::MAX),
                version: r.get(3),
                owner: r.get(4),
            }
        })
        .collect())
}

/// Claims, for `replica`, each of the tenants that is active and unclaimed, claimed by
/// `replica` itself, or claimed by a replica that is not live and has not heartbeated for its
/// own grace — half its failover timeout and a tick, or `grace` when it never said its timeout
/// (by then it has stopped its consumers: a blip of its session moves nothing). One
/// statement for them all; a tenant whose row (in `tenants` or `consumers`) another
/// transaction holds is skipped, not waited for — the others go on, and it is tried again at
/// the next tick. The tenants' rows are share-locked while claiming, so a concurrent change of
/// a status is seen by one side or the other. Returns what was claimed.
pub fn claim(
    client: &mut Client,
    tenants: &[TenantId],
    replica: &str,
    grace: Duration,
) -> Result<Vec<(TenantId, Claimed)>> {
    let ids: Vec<uuid::Uuid> = tenants.iter().map(|t| t.uuid()).collect();
    let rows = client.query(
        "WITH t AS (SELECT id, workers, version FROM tenants
                    WHERE id = ANY($1) AND status = 'active' ORDER BY id FOR SHARE SKIP LOCKED),
              free AS MATERIALIZED (SELECT tenant_id FROM consumers
                                    WHERE tenant_id IN (SELECT id FROM t)
                                    ORDER BY tenant_id FOR UPDATE SKIP LOCKED)
         INSERT INTO consumers (tenant_id, replica_id, state, workers, version, updated_at)
         SELECT id, $2, 'starting', workers, version, now() FROM t
         WHERE id IN (SELECT tenant_id FROM free)
            OR NOT EXISTS (SELECT 1 FROM consumers c WHERE c.tenant_id = t.id)
         ON CONFLICT (tenant_id) DO UPDATE
            SET replica_id = EXCLUDED.replica_id, state = 'starting', error = NULL,
                workers = EXCLUDED.workers, version = EXCLUDED.version, updated_at = now()
            WHERE consumers.replica_id IS NULL OR consumers.replica_id = EXCLUDED.replica_id
               OR (consumers.replica_id NOT IN (SELECT id FROM live_replicas)
                   AND coalesce((SELECT r.seen_at + make_interval(secs => coalesce(
                                            r.failover_ms / 2000.0 + 1, $3::float8))
                                 FROM replicas r WHERE r.id = consumers.replica_id),
                                '-infinity') < now())
         RETURNING tenant_id, workers, version",
        &[&ids, &replica, &grace.as_secs_f64()],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let id: uuid::Uuid = r.get(0);
            let claimed = Claimed {
                workers: u16::try_from(r.get::<_, i32>(1)).unwrap_or(u16::MAX),
                version: r.get(2),
            };
            (id.into(), claimed)
        })
        .collect())
}

/// Records the report; false when the claim is no longer `replica`'s (another replica took it,
/// or the tenant is gone).
pub fn report(client: &mut Client, tenant: TenantId, replica: &str, r: &Report) -> Result<bool> {
    let n = client.execute(
        "UPDATE consumers SET state = $3, workers = $4, version = $5, error = $6,
                updated_at = now()
         WHERE tenant_id = $1 AND replica_id = $2",
        &[
            &tenant.uuid(),
            &replica,
            &r.state,
            &r.workers.map(i32::from),
            &r.version,
            &r.error,
        ],
    )?;
    Ok(n == 1)
}

/// Gives up these claims (with the tenant version each stopped at) once their consumers have
/// stopped, in one statement, and announces it, so the replicas the tenants now belong to claim
/// them at once.
pub fn release(client: &mut Client, released: &[(TenantId, i64)], replica: &str) -> Result<()> {
    if released.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = released.iter().map(|(t, _)| t.uuid()).collect();
    let versions: Vec<i64> = released.iter().map(|(_, v)| *v).collect();
    let mut tx = client.transaction()?;
    tx.execute(
        "UPDATE consumers c SET replica_id = NULL, state = 'stopped', workers = NULL,
                error = NULL, version = r.version, updated_at = now()
         FROM unnest($1::uuid[], $2::bigint[]) AS r(tenant_id, version)
         WHERE c.tenant_id = r.tenant_id AND c.replica_id = $3",
        &[&ids, &versions, &replica],
    )?;
    notify(&mut tx, RELEASED)?;
    tx.commit()?;
    Ok(())
}

/// Whether no replica can still be running the tenant's consumer: no claim, or a claim by a
/// replica that is not live and has not answered for its own grace (as in `claim`; by then it
/// has stopped its consumers on its own, if it still runs at all).
pub fn surely_stopped(client: &mut Client, tenant: TenantId, grace: Duration) -> Result<bool> {
    let row = client.query_opt(
        "SELECT c.replica_id IS NULL
             OR (c.replica_id NOT IN (SELECT id FROM live_replicas)
                 AND coalesce((SELECT r.seen_at + make_interval(secs => coalesce(
                                          r.failover_ms / 2000.0 + 1, $2::float8))
                               FROM replicas r WHERE r.id = c.replica_id),
                              '-infinity') < now())
         FROM consumers c WHERE c.tenant_id = $1",
        &[&tenant.uuid(), &grace.as_secs_f64()],
    )?;
    Ok(row.is_none_or(|r| r.get(0)))
}

/// Of these tenants, how many are active, and how many of those run on another live replica
/// than `replica`.
pub fn taken_over(client: &mut Client, tenants: &[TenantId], replica: &str) -> Result<(i64, i64)> {
    let ids: Vec<uuid::Uuid> = tenants.iter().map(|t| t.uuid()).collect();
    let row = client.query_one(
        "SELECT count(*),
                count(*) FILTER (WHERE c.state = 'running' AND c.replica_id <> $2
                                 AND c.replica_id IN (SELECT id FROM live_replicas))
         FROM tenants t LEFT JOIN consumers c ON c.tenant_id = t.id
         WHERE t.id = ANY($1) AND t.status = 'active'",
        &[&ids, &replica],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// The tenant's consumer on a live replica, if any.
pub fn consumer(client: &mut Client, tenant: TenantId) -> Result<Option<ConsumerInfo>> {
    let row = client.query_opt(
        "SELECT replica_id, state, workers, version, error, updated_at FROM consumers
         WHERE tenant_id = $1 AND replica_id IN (SELECT id FROM live_replicas)",
        &[&tenant.uuid()],
    )?;
    Ok(row.as_ref().map(consumer_from_row))
}

fn consumer_from_row(row: &Row) -> ConsumerInfo {
    let workers: Option<i32> = row.get(2);
    ConsumerInfo {
        replica: row.get(0),
        state: row.get(1),
        workers: workers.and_then(|w| u16::try_from(w).ok()),
        version: row.get(3),
        error: row.get(4),
        since: row.get(5),
    }
}
