//! What the API does, independent of HTTP. An operation on a tenant holds the tenant's lock in
//! PostgreSQL from its first read to its last write, changes the tenant's row (the desired
//! state), and waits until the replica that runs the tenant (this one or another) has applied
//! it: so two operations on one tenant never interleave, on one replica or several.

mod dead_letters;
mod error;
mod operations;
mod orphans;
mod pages;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use log::{info, warn};
use parking_lot::Mutex;
use postgres::Client;
use serde::Serialize;
use uuid::Uuid;

use crate::broker::{is_unconfirmed, BrokerAdmin, QueueStats, Unroutable};
use crate::health::Health;
use crate::ids::TenantId;
use crate::manager::TenantManager;
use crate::metrics::Metrics;
use crate::model::{ConsumerInfo, Status, Tenant};
use crate::stats::Counts;
use crate::store::orphans as create_records;
use crate::store::{self, replicas, tenants};

pub use dead_letters::LEDGER_KEEP;
pub use error::{ServiceError, ServiceResult};
pub use orphans::ORPHAN_GRACE;
pub use pages::PAGE_PAYLOAD_BYTES;

/// Below this many rows a tenant's rows are counted; above, PostgreSQL's estimate is shown.
const EXACT_ROWS_BELOW: i64 = 10_000;

/// What the service needs to know of the settings.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub default_workers: u16,
    pub max_workers: u16,
    /// How long an operation waits for another one on the same tenant.
    pub lock_timeout: Duration,
    /// How long a create or resume waits for the tenant's consumer to connect (or fail to).
    pub start_timeout: Duration,
    /// How long a pause or delete waits for the tenant's consumer to drain and stop.
    pub stop_timeout: Duration,
    /// How long a replica that stopped answering may still run consumers before it stops them
    /// on its own (half the failover timeout, and a margin).
    pub fence_grace: Duration,
}

pub struct Service {
    settings: ServiceSettings,
    db: store::Pool,
    admin: BrokerAdmin,
    manager: Arc<TenantManager>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// Set when the replica shuts down: operations stop waiting and answer at once.
    stopping: AtomicBool,
    /// When the queue gauges were last read from the broker.
    queues_read_at: Mutex<Option<Instant>>,
}

/// What a tenant may be created with.
pub struct NewTenant {
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
}

/// What `PATCH` may change; `None` leaves a field as it is.
pub struct TenantPatch {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub status: Option<Status>,
}

/// The outcome of a change: the tenant as it is now, and whether the replica running it has
/// applied the change (false when it did not within the wait; it will).
pub struct Changed {
    pub tenant: Tenant,
    pub applied: bool,
}

/// A tenant as `GET /api/tenants/{id}` shows it: its row, its consumer, what is stored, and its
/// queues as the broker sees them.
#[derive(Serialize)]
pub struct TenantView {
    #[serde(flatten)]
    pub tenant: Tenant,
    /// Rows in its partition (exact below `EXACT_ROWS_BELOW`, PostgreSQL's estimate above);
    /// `None` while another session holds the partition locked.
    pub rows: Option<i64>,
    /// `None` while the broker cannot be asked.
    pub queue: Option<QueueView>,
    /// Counted by this replica since it started.
    pub counts: Counts,
}

#[derive(Serialize)]
pub struct QueueView {
    pub name: String,
    pub messages: u32,
    pub consumers: u32,
    pub retrying: u32,
    pub dead_letters: u32,
}

impl Service {
    pub fn new(
        settings: ServiceSettings,
        db: store::Pool,
        admin: BrokerAdmin,
        manager: Arc<TenantManager>,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
    ) -> Service {
        Service {
            settings,
            db,
            admin,
            manager,
            health,
            metrics,
            stopping: AtomicBool::new(false),
            queues_read_at: Mutex::new(None),
        }
    }

    /// Ends every wait of an operation in progress (its change is saved or not, as it was): a
    /// shutdown must not wait for operations that wait for other replicas.
    pub fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn max_workers(&self) -> u16 {
        self.settings.max_workers
    }

    /// Runs `op` on a connection of the pool.
    fn with_db<T>(&self, op: impl FnOnce(&mut Client) -> ServiceResult<T>) -> ServiceResult<T> {
        let mut db = self.db.get().map_err(ServiceError::database)?;
        op(&mut db)
    }

    /// Runs `op` holding the tenant's lock (see the module's comment).
    fn locked<T>(
        &self,
        id: TenantId,
        op: impl FnOnce(&mut Client) -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let mut db = self.db.get().map_err(ServiceError::database)?;
        self.lock(&mut db, id)?;
        let result = op(&mut db);
        if tenants::unlock(&mut db, id).is_err() {
            // Closing the session releases the lock.
            db.discard();
        }
        result
    }

    /// Takes the tenant's lock, waiting in slices so that a shutdown ends the wait.
    fn lock(&self, db: &mut Client, id: TenantId) -> ServiceResult<()> {
        let deadline = Instant::now() + self.settings.lock_timeout;
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            match tenants::lock(db, id, slice) {
                Ok(()) => return Ok(()),
                Err(e) if store::Failure::of(&e) != store::Failure::LockTimeout => {
                    return Err(ServiceError::database(e))
                }
                Err(_) if self.is_stopping() => {
                    return Err(ServiceError::Unavailable(
                        "this replica is shutting down; try again on another".into(),
                    ))
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(ServiceError::Busy(format!(
                        "another operation on tenant {id} is still running; try again"
                    )))
                }
                Err(_) => {}
            }
        }
    }

    fn tenant(&self, db: &mut Client, id: TenantId) -> ServiceResult<Tenant> {
        tenants::get(db, id)
            .map_err(ServiceError::database)?
            .ok_or_else(|| ServiceError::tenant_not_found(id))
    }

    /// Records the create, creates the queues, then the row and partition in one transaction
    /// (which deletes the record), and waits for the consumer of an active tenant to connect
    /// (or to say why it cannot; it keeps trying). Queues a create leaves without a row are
    /// removed by it, or by a later sweep (`orphans`).
    pub fn create_tenant(&self, new: NewTenant) -> ServiceResult<Tenant> {
        let now = now_micros();
        let tenant = Tenant {
            id: Uuid::new_v4(),
            name: new.name,
            description: new.description,
            status: new.status,
            workers: self.settings.default_workers,
            version: 1,
            created_at: now,
            updated_at: now,
            consumer: None,
        };
        let id = tenant.tenant_id();
        self.with_db(|db| create_records::intend(db, id).map_err(ServiceError::database))?;
        self.admin
            .declare_queues(id)
            .map_err(ServiceError::broker)?;
        let created = self.with_db(|db| {
            tenants::create(db, &tenant).map_err(ServiceError::database)?;
            info!(tenant_id:% = id, status = tenant.status.as_str(); "tenant created");
            self.wait_applied(db, &tenant);
            self.tenant(db, id)
        });
        if created.is_err() && self.with_db(|db| self.tenant(db, id)).is_err() {
            self.delete_queues_quietly(id);
        }
        created
    }

    /// Deletes the queues of a create that failed; when they could not be, its record stays
    /// and a sweep removes them after the grace.
    fn delete_queues_quietly(&self, id: TenantId) {
        if let Err(e) = self.admin.delete_queues(id) {
            warn!(tenant_id:% = id; "could not delete its queues: {e:#}");
            return;
        }
        let _ = self.with_db(|db| create_records::abandon(db, id).map_err(ServiceError::database));
    }

    pub fn tenant_view(&self, id: TenantId) -> ServiceResult<TenantView> {
        let (tenant, rows) = self.with_db(|db| {
            let tenant = self.tenant(db, id)?;
            let rows = tenants::rows(db, id, EXACT_ROWS_BELOW).map_err(ServiceError::database)?;
            Ok((tenant, rows))
        })?;
        Ok(TenantView {
            tenant,
            rows,
            queue: self.queue_view(id),
            counts: self.manager.counts(id),
        })
    }

    /// The broker's view of the tenant's queues; `None` while the broker cannot be asked.
    fn queue_view(&self, id: TenantId) -> Option<QueueView> {
        let stats = |name: &str| match self.admin.queue_stats(name) {
            Ok(stats) => Some(stats.unwrap_or_default()),
            Err(e) => {
                warn!(tenant_id:% = id; "cannot read queue {name}: {e:#}");
                None
            }
        };
        let main: QueueStats = stats(&id.queue_name())?;
        let retry = stats(&id.retry_name())?;
        let dlq = stats(&id.dlq_name())?;
        Some(QueueView {
            name: id.queue_name(),
            messages: main.messages,
            consumers: main.consumers,
            retrying: retry.messages,
            dead_letters: dlq.messages,
        })
    }

    /// Stops the consumer (in-flight messages commit and ack), then deletes the queues, the
    /// partition and the row. The tenant is marked `deleting` first, so no replica starts it
    /// again; each step may be repeated, so a DELETE that failed midway is finished by another.
    pub fn delete_tenant(&self, id: TenantId) -> ServiceResult<()> {
        self.locked(id, |db| {
            let mut tenant = self.tenant(db, id)?;
            if tenant.status != Status::Deleting {
                tenant.status = Status::Deleting;
                tenants::save(db, &tenant, true).map_err(ServiceError::database)?;
            }
            if !self.wait_stopped(db, id) {
                return Err(ServiceError::Busy(format!(
                    "the consumer of tenant {id} did not stop in time; DELETE again to finish"
                )));
            }
            self.admin.delete_queues(id).map_err(ServiceError::broker)?;
            tenants::drop_with_partition(db, id).map_err(ServiceError::database)?;
            self.manager.forget(id);
            info!(tenant_id:% = id; "tenant deleted");
            Ok(())
        })
    }

    pub fn update_tenant(&self, id: TenantId, patch: TenantPatch) -> ServiceResult<Changed> {
        self.change(id, |tenant| {
            if let Some(name) = patch.name {
                tenant.name = name;
            }
            if let Some(description) = patch.description {
                tenant.description = description;
            }
            if let Some(status) = patch.status {
                tenant.status = status;
            }
        })
    }

    /// Persists the tenant's concurrency; the replica running it changes the live prefetch.
    pub fn set_concurrency(&self, id: TenantId, workers: u16) -> ServiceResult<Changed> {
        let max = self.settings.max_workers;
        if workers < 1 || workers > max {
            return Err(ServiceError::Invalid(format!(
                "workers must be between 1 and {max}"
            )));
        }
        self.change(id, |tenant| tenant.workers = workers)
    }

    /// Applies `edit` to the tenant's row under its lock; a change of status or concurrency
    /// bumps its version and is waited for.
    fn change(&self, id: TenantId, edit: impl FnOnce(&mut Tenant)) -> ServiceResult<Changed> {
        self.locked(id, |db| {
            let mut tenant = self.tenant(db, id)?;
            if tenant.status == Status::Deleting {
                return Err(ServiceError::Conflict(format!(
                    "tenant {id} is being deleted"
                )));
            }
            let (status, workers) = (tenant.status, tenant.workers);
            edit(&mut tenant);
            let bump = tenant.status != status || tenant.workers != workers;
            tenants::save(db, &tenant, bump).map_err(ServiceError::database)?;
            if tenant.status != status {
                info!(
                    tenant_id:% = id;
                    "status {} -> {}",
                    status.as_str(),
                    tenant.status.as_str()
                );
            }
            let mut applied = true;
            if bump {
                tenant.version += 1;
                applied = self.wait_applied(db, &tenant);
            }
            if tenant.workers != workers && tenant.status != Status::Active {
                info!(
                    tenant_id:% = id;
                    "concurrency changed {workers} -> {} (consumer paused)",
                    tenant.workers
                );
            }
            Ok(Changed {
                tenant: self.tenant(db, id)?,
                applied,
            })
        })
    }

    /// Waits until the replica running the tenant has applied `tenant`'s version: for an active
    /// tenant, a consumer that runs (or retries) at its concurrency; otherwise, none.
    fn wait_applied(&self, db: &mut Client, tenant: &Tenant) -> bool {
        let id = tenant.tenant_id();
        if tenant.status != Status::Active {
            return self.wait_stopped(db, id);
        }
        let applied = |c: Option<ConsumerInfo>| {
            c.is_some_and(|c| {
                c.version >= tenant.version && (c.state == "running" || c.state == "retrying")
            })
        };
        let running = |db: &mut Client| replicas::consumer(db, id).map(applied);
        self.wait_for(db, id, self.settings.start_timeout, running)
    }

    /// Waits until no replica can still be running the tenant's consumer.
    fn wait_stopped(&self, db: &mut Client, id: TenantId) -> bool {
        let grace = self.settings.fence_grace;
        let stopped = |db: &mut Client| replicas::surely_stopped(db, id, grace);
        self.wait_for(db, id, self.settings.stop_timeout, stopped)
    }

    fn wait_for(
        &self,
        db: &mut Client,
        id: TenantId,
        timeout: Duration,
        mut done: impl FnMut(&mut Client) -> anyhow::Result<bool>,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            match done(db) {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    warn!(tenant_id:% = id; "cannot read its consumer's state: {e:#}");
                    return false;
                }
            }
            if Instant::now() + pause > deadline || self.is_stopping() {
                warn!(tenant_id:% = id; "the change was saved but not applied within {timeout:?}");
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(Duration::from_millis(10));
        }
    }

    /// Publishes a JSON body to the tenant's queue, confirmed by the broker; returns the id.
    /// A queue that does not exist returns the message, and nothing is published.
    pub fn publish(&self, id: TenantId, body: &[u8]) -> ServiceResult<Uuid> {
        let status = self.with_db(|db| {
            tenants::status(db, id)
                .map_err(ServiceError::database)?
                .ok_or_else(|| ServiceError::tenant_not_found(id))
        })?;
        if status == Status::Deleting {
            return Err(ServiceError::NotFound(format!(
                "tenant {id} is being deleted"
            )));
        }
        let message_id = Uuid::now_v7();
        self.admin
            .publish(id, body, &message_id.to_string())
            .map_err(|e| match e.downcast_ref::<Unroutable>() {
                Some(u) => ServiceError::Unavailable(format!("{u}; nothing was published")),
                // A publish whose confirm did not come may still have reached the queue.
                None if is_unconfirmed(&e) => ServiceError::broker(e.context(format!(
                    "message {message_id} may have reached the queue all the same (stored once at most under that id)"
                ))),
                None => ServiceError::broker(e),
            })?;
        Ok(message_id)
    }
}

fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}
