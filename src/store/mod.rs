//! The only module that speaks SQL: connections, the schema, tenants and their partitions,
//! messages, and the replicas' claims on tenants.
//!
//! Names of tables come from `TenantId`; every value travels as a bind parameter, except the
//! partition bound in DDL, which PostgreSQL cannot bind and which is printed from a parsed UUID.

mod connect;
pub mod dead_letters;
pub mod limits;
mod locks;
pub mod messages;
pub mod orphans;
pub mod replicas;
pub mod tenants;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use parking_lot::Mutex;
use postgres::Client;

pub use connect::connect;
#[cfg(test)]
pub use connect::silent::Silent;

const SCHEMA: &str = include_str!("../../schema.sql");

/// The channel every change to a tenant or to the set of replicas is announced on.
pub const CHANNEL: &str = "tenantd";

/// How tenantd's connections to PostgreSQL behave.
#[derive(Clone, Debug)]
pub struct DbSettings {
    pub url: Arc<str>,
    pub connect_timeout: Duration,
    /// The longest a statement may run (zero: no limit).
    pub statement_timeout: Duration,
    /// A connection whose server stays silent this long (TCP keepalive probes unanswered, or
    /// data unacknowledged) is declared dead.
    pub keepalive: Duration,
}

/// Connections for the API, opened on demand and kept while they work. A connection is used by
/// one request at a time; one that broke, or that a panic left mid-operation, is let go.
pub struct Pool {
    settings: DbSettings,
    idle: Mutex<Vec<Client>>,
}

impl Pool {
    pub fn new(settings: DbSettings) -> Pool {
        Pool {
            settings,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A connection of the pool's, returned to it when dropped.
    pub fn get(&self) -> Result<Pooled<'_>> {
        let kept = self.idle.lock().pop();
        let client = match kept {
            Some(client) if !client.is_closed() => client,
            _ => connect(&self.settings, "tenantd api")?,
        };
        Ok(Pooled {
            pool: self,
            client: Some(client),
        })
    }
}

pub struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Client>,
}

impl Pooled<'_> {
    /// Closes the connection instead of returning it (it may hold a session lock).
    pub fn discard(mut self) {
        self.client = None;
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() && !std::thread::panicking() {
                self.pool.idle.lock().push(client);
            }
        }
    }
}

/// Creates what is missing of the schema. Concurrent starts serialize on an advisory lock; a
/// start against an up-to-date database reads the catalog and locks no table.
pub fn apply_schema(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&locks::SCHEMA],
    )?;
    tx.batch_execute(SCHEMA).context("applying schema.sql")?;
    tx.commit()?;
    Ok(())
}

/// A round trip to the server: whether it answers now.
pub fn ping(client: &mut Client) -> Result<()> {
    client.simple_query("SELECT 1")?;
    Ok(())
}

/// Subscribes this session to `CHANNEL`.
pub fn listen(client: &mut Client) -> Result<()> {
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(())
}

/// Announces a change on `CHANNEL`; inside a transaction, it is sent when that commits.
fn notify(client: &mut impl postgres::GenericClient, payload: &str) -> Result<()> {
    client.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])?;
    Ok(())
}

/// What a failed database call means to its caller: what to do next depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server could not be reached or the session was lost: nothing was done; try again
    /// when it is back.
    Unreachable,
    /// A lock wait ran out of time (`lock_timeout`): someone else holds it; the session is fine.
    LockTimeout,
    /// The server refused the statement: a bug, or a state the caller must explain.
    Other,
}

impl Failure {
    /// Reads what an error of this module means (the one place that looks into its causes).
    pub fn of(e: &anyhow::Error) -> Failure {
        if e.chain().any(|c| c.is::<connect::GaveUp>()) {
            return Failure::Unreachable;
        }
        let pg = e.chain().find_map(|c| c.downcast_ref::<postgres::Error>());
        match pg {
            Some(pg) if pg.is_closed() || pg.code().is_none() => Failure::Unreachable,
            Some(pg) if pg.code() == Some(&postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Failure::LockTimeout
            }
            _ => Failure::Other,
        }
    }
}
