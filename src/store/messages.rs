//! Messages: the workers' batch insert and the keyset pages the API reads.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Statement};
use uuid::Uuid;

use crate::ids::TenantId;
use crate::model::StoredMessage;

/// Multi-row insert of one tenant's messages. It fails as a whole (unique_violation) when one
/// of the ids is stored already; the batch is then inserted with `INSERT_SKIPPING_STORED`.
/// Leaving `ON CONFLICT` out of the common batch spares PostgreSQL a lookup of every id before
/// its insert: the unique index checks the id anyway while inserting it.
pub const INSERT: &str = "INSERT INTO messages (id, tenant_id, payload)
     SELECT m.id, $1, m.payload::jsonb FROM unnest($2::uuid[], $3::text[]) AS m(id, payload)";

/// The same insert, skipping the ids already stored: for a batch holding a redelivery.
pub const INSERT_SKIPPING_STORED: &str = "INSERT INTO messages (id, tenant_id, payload)
     SELECT m.id, $1, m.payload::jsonb FROM unnest($2::uuid[], $3::text[]) AS m(id, payload)
     ON CONFLICT DO NOTHING";

/// A worker's two prepared inserts, on the connection that prepared them.
pub struct Inserts {
    plain: Statement,
    skipping_stored: Statement,
}

/// Prepares the inserts on a worker's connection.
pub fn prepare_inserts(client: &mut Client) -> Result<Inserts, postgres::Error> {
    Ok(Inserts {
        plain: client.prepare(INSERT)?,
        skipping_stored: client.prepare(INSERT_SKIPPING_STORED)?,
    })
}

/// Inserts one tenant's messages in one statement (its own transaction); an id already stored
/// is skipped. Returns how many rows were new.
pub fn insert(
    client: &mut Client,
    inserts: &Inserts,
    tenant: TenantId,
    ids: &[Uuid],
    payloads: &[&str],
) -> Result<u64, postgres::Error> {
    let params: [&(dyn ToSql + Sync); 3] = [&tenant.uuid(), &ids, &payloads];
    match client.execute(&inserts.plain, &params) {
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            client.execute(&inserts.skipping_stored, &params)
        }
        inserted => inserted,
    }
}

/// A page of a tenant's messages after a `(created_at, id)` position: a keyset read of the
/// partition's `(tenant_id, created_at, id)` index, as cheap deep in the partition as at its
/// start. The payload is passed through as PostgreSQL prints it: no second parse, and no number
/// that serde_json could not represent. It is sent only while the payloads so far stay within
/// `$5` bytes: what PostgreSQL prints can be far larger than what was stored (`1e131071` is
/// 131,072 digits), so the page is cut where PostgreSQL measures it, before tenantd holds it.
pub const PAGE_AFTER: &str = "SELECT id, tenant_id, created_at, size,
            CASE WHEN running <= $5 THEN payload END
     FROM (SELECT id, tenant_id, created_at, payload, octet_length(payload) AS size,
                  sum(octet_length(payload)) OVER (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)
                      AS running
           FROM (SELECT id, tenant_id, created_at, payload::text AS payload FROM messages
                 WHERE tenant_id = $1 AND (created_at, id) > ($2, $3)
                 ORDER BY created_at, id LIMIT $4) page) sized
     ORDER BY created_at, id";

/// The first page of a tenant's messages.
const FIRST: &str = "SELECT id, tenant_id, created_at, size,
            CASE WHEN running <= $3 THEN payload END
     FROM (SELECT id, tenant_id, created_at, payload, octet_length(payload) AS size,
                  sum(octet_length(payload)) OVER (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)
                      AS running
           FROM (SELECT id, tenant_id, created_at, payload::text AS payload FROM messages
                 WHERE tenant_id = $1 ORDER BY created_at, id LIMIT $2) page) sized
     ORDER BY created_at, id";

/// A tenant's messages oldest first, strictly after `after` (a `(created_at, id)` position),
/// with their payloads while these add up to at most `bytes` (then without).
pub fn page(
    client: &mut Client,
    tenant: TenantId,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
    bytes: i64,
) -> Result<Vec<StoredMessage>> {
    let rows = match after {
        Some((at, id)) => client.query(PAGE_AFTER, &[&tenant.uuid(), &at, &id, &limit, &bytes])?,
        None => client.query(FIRST, &[&tenant.uuid(), &limit, &bytes])?,
    };
    rows.iter()
        .map(|r| {
            let payload: Option<String> = r.try_get(4)?;
            let size: i32 = r.try_get(3)?;
            Ok(StoredMessage {
                id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                payload: payload
                    .map(serde_json::value::RawValue::from_string)
                    .transpose()
                    .context("a stored payload is not JSON")?,
                size: i64::from(size),
                payload_size: None,
                created_at: r.try_get(2)?,
            })
        })
        .collect()
}
