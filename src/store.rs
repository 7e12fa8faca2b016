//! The only module that speaks SQL: tenants, their partitions and their messages.
//!
//! Names of tables come from `TenantId`; every value travels as a bind parameter, except the
//! partition bound in DDL, which PostgreSQL cannot bind and which is printed from a parsed UUID.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use postgres::{Client, NoTls, Row, Statement};
use uuid::Uuid;

use crate::ids::TenantId;
use crate::model::{Status, StoredMessage, Tenant};

const SCHEMA: &str = include_str!("../schema.sql");

/// Opens a connection, giving up after `timeout`; the error names the server, never the password.
pub fn connect(url: &str, timeout: Duration) -> Result<Client> {
    let mut config = postgres::Config::from_str(url).context("DATABASE_URL is not a valid URL")?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout);
    }
    config.application_name("tenantd");
    config
        .connect(NoTls)
        .with_context(|| format!("cannot connect to PostgreSQL at {}", describe(&config)))
}

fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("postgres")
    )
}

/// A connection opened on first use and again after it broke: one per HTTP thread.
pub struct LazyClient {
    url: String,
    timeout: Duration,
    client: Option<Client>,
}

impl LazyClient {
    pub fn new(url: &str, timeout: Duration) -> LazyClient {
        LazyClient {
            url: url.to_string(),
            timeout,
            client: None,
        }
    }

    /// Runs `op` on the connection, opening it first if needed; a broken one is let go.
    pub fn with<T>(&mut self, op: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        let client = match &mut self.client {
            Some(client) => client,
            slot => slot.insert(connect(&self.url, self.timeout)?),
        };
        let result = op(client);
        if client.is_closed() {
            self.client = None;
        }
        result
    }
}

/// Creates what is missing of the schema; concurrent starts serialize on an advisory lock.
pub fn apply_schema(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('tenantd.schema'))",
        &[],
    )?;
    tx.batch_execute(SCHEMA).context("applying schema.sql")?;
    tx.commit()?;
    Ok(())
}

/// Inserts the tenant's row and attaches its partition, all or nothing.
///
/// The partition is built aside and attached (SHARE UPDATE EXCLUSIVE on `messages`) rather than
/// created with `PARTITION OF` (ACCESS EXCLUSIVE), so other tenants keep writing meanwhile.
pub fn create_tenant(client: &mut Client, tenant: &Tenant) -> Result<()> {
    let id = tenant.tenant_id();
    let mut tx = client.transaction()?;
    tx.batch_execute("SET LOCAL lock_timeout = '10s'")?;
    tx.execute(
        "INSERT INTO tenants (id, name, description, status, workers, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
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

/// Removes the tenant's partition and row. The partition is detached CONCURRENTLY first, so
/// dropping it never takes a lock on `messages` that would stall other tenants.
pub fn drop_tenant(client: &mut Client, id: TenantId) -> Result<()> {
    let p = id.partition_name();
    if partition_is_attached(client, id)? {
        let detach = format!(r#"ALTER TABLE messages DETACH PARTITION "{p}" CONCURRENTLY"#);
        if let Err(e) = client.batch_execute(&detach) {
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
    client.execute("DELETE FROM tenants WHERE id = $1", &[&id.uuid()])?;
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

const TENANT_COLUMNS: &str = "id, name, description, status, workers, created_at, updated_at";

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
        created_at: row.get(5),
        updated_at: row.get(6),
    }
}

pub fn get_tenant(client: &mut Client, id: TenantId) -> Result<Option<Tenant>> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1");
    Ok(client
        .query_opt(&sql, &[&id.uuid()])?
        .as_ref()
        .map(tenant_from_row))
}

/// Tenants in creation order, strictly after `after` (a `(created_at, id)` position).
pub fn list_tenants(
    client: &mut Client,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Tenant>> {
    let rows = match after {
        Some((at, id)) => {
            let sql = format!(
                "SELECT {TENANT_COLUMNS} FROM tenants WHERE (created_at, id) > ($1, $2)
                 ORDER BY created_at, id LIMIT $3"
            );
            client.query(&sql, &[&at, &id, &limit])?
        }
        None => {
            let sql =
                format!("SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, id LIMIT $1");
            client.query(&sql, &[&limit])?
        }
    };
    Ok(rows.iter().map(tenant_from_row).collect())
}

pub fn active_tenants(client: &mut Client) -> Result<Vec<Tenant>> {
    let sql = format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE status = 'active' ORDER BY id");
    let rows = client.query(&sql, &[])?;
    Ok(rows.iter().map(tenant_from_row).collect())
}

/// Writes the tenant's name, description, status and workers as given, and bumps `updated_at`.
pub fn update_tenant(client: &mut Client, tenant: &Tenant) -> Result<Option<Tenant>> {
    let sql = format!(
        "UPDATE tenants SET name = $2, description = $3, status = $4, workers = $5,
                updated_at = now()
         WHERE id = $1 RETURNING {TENANT_COLUMNS}"
    );
    let row = client.query_opt(
        &sql,
        &[
            &tenant.id,
            &tenant.name,
            &tenant.description,
            &tenant.status.as_str(),
            &i32::from(tenant.workers),
        ],
    )?;
    Ok(row.as_ref().map(tenant_from_row))
}

/// Multi-row insert of one tenant's messages; a message id already stored is skipped.
pub const INSERT_MESSAGES: &str = "INSERT INTO messages (id, tenant_id, payload)
     SELECT m.id, $1, m.payload::jsonb FROM unnest($2::uuid[], $3::text[]) AS m(id, payload)
     ON CONFLICT DO NOTHING";

/// Runs the prepared `INSERT_MESSAGES`; returns how many rows were new.
pub fn insert_messages(
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
pub const MESSAGES_AFTER: &str = "SELECT id, tenant_id, payload::text, created_at FROM messages
     WHERE tenant_id = $1 AND (created_at, id) > ($2, $3) ORDER BY created_at, id LIMIT $4";

/// The first page of a tenant's messages.
pub const MESSAGES_FIRST: &str = "SELECT id, tenant_id, payload::text, created_at FROM messages
     WHERE tenant_id = $1 ORDER BY created_at, id LIMIT $2";

/// A tenant's messages oldest first, strictly after `after` (a `(created_at, id)` position).
pub fn page_messages(
    client: &mut Client,
    tenant: TenantId,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<StoredMessage>> {
    let rows = match after {
        Some((at, id)) => client.query(MESSAGES_AFTER, &[&tenant.uuid(), &at, &id, &limit])?,
        None => client.query(MESSAGES_FIRST, &[&tenant.uuid(), &limit])?,
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

pub fn all_tenant_ids(client: &mut Client) -> Result<Vec<Uuid>> {
    let rows = client.query("SELECT id FROM tenants", &[])?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Tenant ids after `after` in id order: the walk order of `/api/messages` over all tenants.
pub fn tenant_ids_after(client: &mut Client, after: Option<Uuid>, limit: i64) -> Result<Vec<Uuid>> {
    let rows = client.query(
        "SELECT id FROM tenants WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after.unwrap_or_else(Uuid::nil), &limit],
    )?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
