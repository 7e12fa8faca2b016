//! Messages: the workers' batch insert and the keyset pages the API reads.

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use postgres::{Client, Statement};
use uuid::Uuid;

use crate::ids::TenantId;
use crate::model::StoredMessage;

/// Multi-row insert of one tenant's messages; a message id already stored is skipped.
pub const INSERT: &str = "INSERT INTO messages (id, tenant_id, payload)
     SELECT m.id, $1, m.payload::jsonb FROM unnest($2::uuid[], $3::text[]) AS m(id, payload)
     ON CONFLICT DO NOTHING";

/// Runs the prepared `INSERT`; returns how many rows were new.
pub fn insert(
    client: &mut Client,
    insert: &Statement,
    tenant: TenantId,
    ids: &[Uuid],
    payloads: &[&str],
) -> Result<u64, postgres::Error> {
    client.execute(insert, &[&tenant.uuid(), &ids, &payloads])
}

/// A page of a tenant's messages after a `(created_at, id)` position: a keyset read of the
/// partition's `(tenant_id, created_at, id)` index, as cheap deep in the partition as at its
/// start. The payload is passed through as PostgreSQL prints it: no second parse, and no number
/// that serde_json could not represent.
pub const PAGE_AFTER: &str = "SELECT id, tenant_id, payload::text, created_at FROM messages
     WHERE tenant_id = $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4";

/// The first page of a tenant's messages.
const FIRST: &str = "SELECT id, tenant_id, payload::text, created_at FROM messages
     WHERE tenant_id = $1 ORDER BY created_at, id LIMIT $2";

/// A tenant's messages oldest first, strictly after `after` (a `(created_at, id)` position).
pub fn page(
    client: &mut Client,
    tenant: TenantId,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<StoredMessage>> {
    let rows = match after {
        Some((at, id)) => client.query(PAGE_AFTER, &[&tenant.uuid(), &at, &id, &limit])?,
        None => client.query(FIRST, &[&tenant.uuid(), &limit])?,
    };
    rows.iter()
        .map(|r| {
            let payload: String = r.try_get(2)?;
            Ok(StoredMessage {
                id: r.try_get(0)?,
                tenant_id: r.try_get(1)?,
                payload: serde_json::value::RawValue::from_string(payload)
                    .context("a stored payload is not JSON")?,
                created_at: r.try_get(3)?,
            })
        })
        .collect()
}
