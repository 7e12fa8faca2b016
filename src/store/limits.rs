//! The server settings that bound how many tenants one database holds, and how many tenants it
//! holds now, read by `tenantd check` without changing anything.

use anyhow::Result;
use postgres::Client;

/// What `tenantd check` reports of the PostgreSQL server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub version: String,
    pub max_connections: i64,
    /// Connections kept for superusers (and, from PostgreSQL 16, for `pg_use_reserved_connections`).
    pub reserved_connections: i64,
    pub connections_in_use: i64,
    pub max_locks_per_transaction: i64,
    pub max_prepared_transactions: i64,
    /// `None` before tenantd has created its schema in this database.
    pub active_tenants: Option<i64>,
}

pub fn server_limits(client: &mut Client) -> Result<ServerLimits> {
    let row = client.query_one(
        "SELECT current_setting('server_version'),
                current_setting('max_connections')::bigint,
                current_setting('superuser_reserved_connections')::bigint
                  + coalesce(current_setting('reserved_connections', true)::bigint, 0),
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
                current_setting('max_locks_per_transaction')::bigint,
                current_setting('max_prepared_transactions')::bigint,
                to_regclass('tenants') IS NOT NULL",
        &[],
    )?;
    let has_tenants: bool = row.get(6);
    let active_tenants = match has_tenants {
        true => Some(
            client
                .query_one("SELECT count(*) FROM tenants WHERE status = 'active'", &[])?
                .get(0),
        ),
        false => None,
    };
    Ok(ServerLimits {
        version: row.get(0),
        max_connections: row.get(1),
        reserved_connections: row.get(2),
        connections_in_use: row.get(3),
        max_locks_per_transaction: row.get(4),
        max_prepared_transactions: row.get(5),
        active_tenants,
    })
}
