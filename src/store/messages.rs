//! Messages: the workers' batch insert and the keyset pages the API reads.

use std::error::Error;

use anyhow::{Context, Result};
use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
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

/// Binary COPY of one tenant's messages: PostgreSQL's cheapest way in. It stores all or none:
/// a message id already stored fails it with `unique_violation`.
const COPY: &str = "COPY messages (id, tenant_id, payload) FROM STDIN (FORMAT binary)";

/// Copies the messages in; returns how many rows were stored (all of them).
pub fn copy_in(
    client: &mut Client,
    tenant: TenantId,
    ids: &[Uuid],
    payloads: &[&str],
) -> Result<u64, postgres::Error> {
    let sink = client.copy_in(COPY)?;
    let mut writer = BinaryCopyInWriter::new(sink, &[Type::UUID, Type::UUID, Type::JSONB]);
    let tenant = tenant.uuid();
    for (id, payload) in ids.iter().zip(payloads) {
        writer.write(&[id, &tenant, &JsonbText(payload)])?;
    }
    writer.finish()
}

/// JSON text sent as `jsonb` without parsing it here (the server parses it once).
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl ToSql for JsonbText<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1); // jsonb's binary format: a version byte, then the text
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
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
