//! What the API does, independent of HTTP: each operation keeps the row, the queues, the
//! partition and the consumer in step, and undoes its own work when a step fails.

use chrono::{DateTime, Utc};
use log::{info, warn};
use serde::Serialize;
use uuid::Uuid;

use crate::broker::{BrokerAdmin, QueueStats};
use crate::config::Config;
use crate::cursor::{self, AllPosition};
use crate::http::error::ApiError;
use crate::ids::TenantId;
use crate::manager::TenantManager;
use crate::metrics::metrics;
use crate::model::{Status, StoredMessage, Tenant};
use crate::stats::Counts;
use crate::store::{self, LazyClient};
use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// At most this many tenants' partitions are read by one page of `/api/messages`.
const PARTITIONS_PER_PAGE: usize = 50;

/// Queue depths in `/metrics` are read from the broker at most this often.
const QUEUE_METRICS_EVERY: Duration = Duration::from_secs(15);

pub struct Service {
    pub config: Config,
    pub admin: BrokerAdmin,
    pub manager: TenantManager,
    /// When the queue gauges were last read from the broker.
    pub queues_read_at: Mutex<Option<Instant>>,
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

#[derive(Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A tenant as `GET /api/tenants/{id}` shows it: its row and its queues as the broker sees them.
#[derive(Serialize)]
pub struct TenantView {
    #[serde(flatten)]
    pub tenant: Tenant,
    /// `None` while the broker cannot be asked.
    pub queue: Option<QueueView>,
    /// Since tenantd started.
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

type ApiResult<T> = Result<T, ApiError>;

impl Service {
    pub fn create_tenant(&self, db: &mut LazyClient, new: NewTenant) -> ApiResult<Tenant> {
        let now = now_micros();
        let tenant = Tenant {
            id: Uuid::new_v4(),
            name: new.name,
            description: new.description,
            status: new.status,
            workers: self.config.default_workers,
            created_at: now,
            updated_at: now,
        };
        let id = tenant.tenant_id();
        self.admin.declare_queue(id).map_err(ApiError::broker)?;
        let created = db.with(|c| store::create_tenant(c, &tenant));
        if let Err(e) = created {
            self.delete_queues_quietly(id);
            return Err(ApiError::database(e));
        }
        if tenant.status == Status::Active {
            if let Err(e) = self.manager.start(id, tenant.workers) {
                self.undo_create(db, id);
                return Err(ApiError::broker(e));
            }
        }
        info!(
            "tenant created tenant_id={id} status={}",
            tenant.status.as_str()
        );
        Ok(tenant)
    }

    fn undo_create(&self, db: &mut LazyClient, id: TenantId) {
        if let Err(e) = db.with(|c| store::drop_tenant(c, id)) {
            warn!("tenant_id={id} undoing a failed create left the partition: {e:#}");
        }
        self.delete_queues_quietly(id);
    }

    fn delete_queues_quietly(&self, id: TenantId) {
        if let Err(e) = self.admin.delete_queues(id) {
            warn!("tenant_id={id} could not delete its queues: {e:#}");
        }
    }

    pub fn tenant(&self, db: &mut LazyClient, id: TenantId) -> ApiResult<Tenant> {
        db.with(|c| store::get_tenant(c, id))
            .map_err(ApiError::database)?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {id} not found")))
    }

    pub fn tenant_view(&self, db: &mut LazyClient, id: TenantId) -> ApiResult<TenantView> {
        let tenant = self.tenant(db, id)?;
        Ok(TenantView {
            tenant,
            queue: self.queue_view(id),
            counts: self.manager.counts(id),
        })
    }

    /// The broker's view of the tenant's queues; `None` while the broker cannot be asked.
    fn queue_view(&self, id: TenantId) -> Option<QueueView> {
        let stats = |name: &str| match self.admin.queue_stats(name) {
            Ok(stats) => Some(stats.unwrap_or_default()),
            Err(e) => {
                warn!("tenant_id={id} cannot read queue {name}: {e:#}");
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

    pub fn list_tenants(
        &self,
        db: &mut LazyClient,
        cursor: Option<&str>,
        limit: usize,
    ) -> ApiResult<Page<Tenant>> {
        let after = decode_cursor(cursor, cursor::decode)?;
        let mut rows = db
            .with(|c| store::list_tenants(c, after, limit as i64 + 1))
            .map_err(ApiError::database)?;
        let next = next_cursor(&mut rows, limit, |t| cursor::encode((t.created_at, t.id)));
        Ok(Page {
            data: rows,
            next_cursor: next,
        })
    }

    /// Stops the consumer (in-flight messages commit and ack), then deletes the queues, the
    /// partition and the row. Each step is idempotent, so a DELETE that failed can be repeated.
    pub fn delete_tenant(&self, db: &mut LazyClient, id: TenantId) -> ApiResult<()> {
        self.tenant(db, id)?;
        self.manager.stop(id, self.config.shutdown_timeout);
        self.admin.delete_queues(id).map_err(ApiError::broker)?;
        db.with(|c| store::drop_tenant(c, id))
            .map_err(ApiError::database)?;
        self.manager.forget(id);
        info!("tenant deleted tenant_id={id}");
        Ok(())
    }

    pub fn update_tenant(
        &self,
        db: &mut LazyClient,
        id: TenantId,
        patch: TenantPatch,
    ) -> ApiResult<Tenant> {
        let mut tenant = self.tenant(db, id)?;
        let was = tenant.status;
        tenant.name = patch.name.unwrap_or(tenant.name);
        tenant.description = patch.description.unwrap_or(tenant.description);
        tenant.status = patch.status.unwrap_or(tenant.status);
        if was == Status::Inactive && tenant.status == Status::Active {
            self.manager
                .start(id, tenant.workers)
                .map_err(ApiError::broker)?;
        }
        let updated = self.save(db, &tenant);
        if updated.is_err() && was == Status::Inactive && tenant.status == Status::Active {
            self.manager.stop(id, self.config.shutdown_timeout);
        }
        let updated = updated?;
        if was == Status::Active && updated.status == Status::Inactive {
            self.manager.stop(id, self.config.shutdown_timeout);
        }
        if was != updated.status {
            info!(
                "tenant_id={id} status {} -> {}",
                was.as_str(),
                updated.status.as_str()
            );
        }
        Ok(updated)
    }

    fn save(&self, db: &mut LazyClient, tenant: &Tenant) -> ApiResult<Tenant> {
        let id = tenant.tenant_id();
        db.with(|c| store::update_tenant(c, tenant))
            .map_err(ApiError::database)?
            .ok_or_else(|| ApiError::NotFound(format!("tenant {id} not found")))
    }

    /// Persists the tenant's concurrency and applies it to the running consumer at once.
    pub fn set_concurrency(
        &self,
        db: &mut LazyClient,
        id: TenantId,
        workers: u16,
    ) -> ApiResult<Tenant> {
        let max = self.config.max_workers;
        if workers < 1 || workers > max {
            return Err(ApiError::BadRequest(format!(
                "workers must be between 1 and {max}"
            )));
        }
        let mut tenant = self.tenant(db, id)?;
        let was = tenant.workers;
        tenant.workers = workers;
        let updated = self.save(db, &tenant)?;
        self.manager.resize(id, workers);
        if !self.manager.is_running(id) {
            info!("concurrency changed tenant_id={id} {was} -> {workers} (consumer paused)");
        }
        Ok(updated)
    }

    /// Publishes a JSON body to the tenant's queue, confirmed by the broker; returns the id.
    pub fn publish(&self, db: &mut LazyClient, id: TenantId, body: &[u8]) -> ApiResult<Uuid> {
        self.tenant(db, id)?;
        let message_id = Uuid::now_v7();
        self.admin
            .publish(id, body, &message_id.to_string())
            .map_err(ApiError::broker)?;
        Ok(message_id)
    }

    pub fn tenant_messages(
        &self,
        db: &mut LazyClient,
        id: TenantId,
        cursor: Option<&str>,
        limit: usize,
    ) -> ApiResult<Page<StoredMessage>> {
        let after = decode_cursor(cursor, cursor::decode)?;
        self.tenant(db, id)?;
        let mut rows = db
            .with(|c| store::page_messages(c, id, after, limit as i64 + 1))
            .map_err(ApiError::database)?;
        let next = next_cursor(&mut rows, limit, |m| cursor::encode((m.created_at, m.id)));
        Ok(Page {
            data: rows,
            next_cursor: next,
        })
    }

    /// Pages over every tenant's messages: tenant by tenant in id order, each oldest first.
    /// One page reads at most `PARTITIONS_PER_PAGE` partitions, one at a time, so its cost and
    /// its locks do not grow with the number of tenants; a page may then be short, with a cursor.
    pub fn all_messages(
        &self,
        db: &mut LazyClient,
        cursor: Option<&str>,
        limit: usize,
    ) -> ApiResult<Page<StoredMessage>> {
        let mut position = decode_cursor(cursor, cursor::decode_all)?;
        let mut data = Vec::with_capacity(limit);
        for _ in 0..PARTITIONS_PER_PAGE {
            let (tenant, after) = match position {
                Some(AllPosition::Within(t, p)) => (t, Some(p)),
                Some(AllPosition::After(t)) => match self.next_tenant(db, Some(t))? {
                    Some(next) => (next, None),
                    None => {
                        return Ok(Page {
                            data,
                            next_cursor: None,
                        })
                    }
                },
                None => match self.next_tenant(db, None)? {
                    Some(first) => (first, None),
                    None => {
                        return Ok(Page {
                            data,
                            next_cursor: None,
                        })
                    }
                },
            };
            let want = limit - data.len();
            let mut rows = db
                .with(|c| store::page_messages(c, tenant.into(), after, want as i64 + 1))
                .map_err(ApiError::database)?;
            if rows.len() > want {
                rows.truncate(want);
                data.extend(rows);
                let last = data.last().expect("want >= 1");
                let next = AllPosition::Within(tenant, (last.created_at, last.id));
                return Ok(Page {
                    data,
                    next_cursor: Some(cursor::encode_all(next)),
                });
            }
            data.extend(rows);
            position = Some(AllPosition::After(tenant));
            if data.len() == limit {
                break;
            }
        }
        let next = match position {
            Some(AllPosition::After(t)) if self.next_tenant(db, Some(t))?.is_none() => None,
            p => p.map(cursor::encode_all),
        };
        Ok(Page {
            data,
            next_cursor: next,
        })
    }

    fn next_tenant(&self, db: &mut LazyClient, after: Option<Uuid>) -> ApiResult<Option<Uuid>> {
        db.with(|c| store::tenant_ids_after(c, after, 1))
            .map(|ids| ids.into_iter().next())
            .map_err(ApiError::database)
    }

    /// `/metrics`: refreshes the queue gauges when they are older than `QUEUE_METRICS_EVERY`
    /// (one scrape in that interval pays for reading thousands of queues; the others are cheap).
    pub fn metrics_text(&self, db: &mut LazyClient) -> String {
        let stale = {
            let mut at = self.queues_read_at.lock();
            let stale = at.is_none_or(|t| t.elapsed() >= QUEUE_METRICS_EVERY);
            if stale {
                *at = Some(Instant::now());
            }
            stale
        };
        if stale {
            self.read_queue_gauges(db);
        }
        metrics().render()
    }

    fn read_queue_gauges(&self, db: &mut LazyClient) {
        let ids = match db.with(store::all_tenant_ids) {
            Ok(ids) => ids,
            Err(e) => return warn!("metrics: cannot list tenants: {e:#}"),
        };
        let m = metrics();
        for id in ids {
            let id = TenantId::from(id);
            match self.admin.queue_stats(&id.queue_name()) {
                Ok(Some(stats)) => {
                    let label = id.to_string();
                    let label = [label.as_str()];
                    m.queue_messages
                        .with_label_values(&label)
                        .set(i64::from(stats.messages));
                    m.queue_consumers
                        .with_label_values(&label)
                        .set(i64::from(stats.consumers));
                }
                Ok(None) => {}
                Err(e) => return warn!("metrics: cannot read queue depths: {e:#}"),
            }
        }
    }

    /// Whether both dependencies answer now: `Err` names the one that does not.
    pub fn readiness(&self, db: &mut LazyClient) -> Result<(), String> {
        let database = db.with(|c| Ok(c.simple_query("SELECT 1")?)).err();
        let broker = self.admin.ping().err();
        let mut down = Vec::new();
        if let Some(e) = database {
            down.push(format!("database unavailable: {e:#}"));
        }
        if let Some(e) = broker {
            down.push(format!("message broker unavailable: {e:#}"));
        }
        match down.is_empty() {
            true => Ok(()),
            false => Err(down.join("; ")),
        }
    }

    /// Starts the consumers of every active tenant (at boot), in parallel.
    pub fn restore_consumers(&self, db: &mut LazyClient) -> anyhow::Result<()> {
        let tenants: Vec<_> = db
            .with(store::active_tenants)?
            .iter()
            .map(|t| (t.tenant_id(), t.workers))
            .collect();
        let failed = self.manager.start_all(&tenants);
        for (id, e) in &failed {
            warn!("tenant_id={id} consumer did not start: {e:#}");
        }
        info!(
            "restored {} of {} active tenants' consumers",
            tenants.len() - failed.len(),
            tenants.len()
        );
        match failed.into_iter().next() {
            Some((id, e)) if tenants.len() == 1 || self.manager.running() == 0 => {
                Err(e.context(format!("starting the consumer of tenant {id}")))
            }
            _ => Ok(()),
        }
    }
}

fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

fn decode_cursor<T>(cursor: Option<&str>, decode: fn(&str) -> Option<T>) -> ApiResult<Option<T>> {
    match cursor {
        None | Some("") => Ok(None),
        Some(c) => decode(c)
            .map(Some)
            .ok_or_else(|| ApiError::BadRequest("invalid cursor".into())),
    }
}

/// Trims the one extra row fetched to learn whether another page exists.
fn next_cursor<T>(
    rows: &mut Vec<T>,
    limit: usize,
    encode: impl Fn(&T) -> String,
) -> Option<String> {
    if rows.len() <= limit {
        return None;
    }
    rows.truncate(limit);
    rows.last().map(encode)
}
