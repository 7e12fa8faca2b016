//! What operators ask of a replica: is it ready, its metrics, the live replicas.

use std::time::{Duration, Instant};

use log::warn;

use super::{Service, ServiceError, ServiceResult};
use crate::ids::TenantId;
use crate::store::replicas::{self, Replica};
use crate::store::{self, tenants};

/// Queue and dead-letter depths in `/metrics` are read from the broker at most this often.
const QUEUE_METRICS_EVERY: Duration = Duration::from_secs(15);

impl Service {
    /// Whether this replica does its share now: `Err` names everything that keeps it from it
    /// (the database, the broker as the admin connection and the consumers see it, tenants
    /// that should run here but cannot connect, a start not yet done).
    pub fn readiness(&self) -> Result<(), String> {
        let mut down = Vec::new();
        let database = self.with_db(|db| store::ping(db).map_err(ServiceError::database));
        match database {
            Err(ServiceError::Unavailable(why)) => down.push(why),
            Err(e) => down.push(format!("database unavailable: {e:?}")),
            Ok(_) => {
                if let Err(why) = self.health.check() {
                    down.push(why);
                }
            }
        }
        if let Err(e) = self.admin.ping() {
            down.push(format!(
                "message broker unavailable: {}",
                crate::broker::in_plain_words(&e)
            ));
        }
        let failing = self.manager.not_running();
        if let Some((_, error)) = failing.first() {
            down.push(format!(
                "{} tenants should run on this replica but cannot connect to the message \
                 broker (last error: {})",
                failing.len(),
                error.as_deref().unwrap_or("none yet")
            ));
        }
        match down.is_empty() {
            true => Ok(()),
            false => Err(down.join("; ")),
        }
    }

    /// The live replicas, with the number of tenants each runs.
    pub fn replicas(&self) -> ServiceResult<Vec<Replica>> {
        self.with_db(|db| replicas::live(db).map_err(ServiceError::database))
    }

    /// `/metrics`: refreshes the queue gauges when they are older than `QUEUE_METRICS_EVERY`
    /// (one scrape in that interval pays for reading thousands of queues; the others are cheap).
    /// `per_tenant` false: only the series that name no tenant (and nothing is read).
    pub fn metrics_text(&self, per_tenant: bool) -> String {
        if !per_tenant {
            return self.metrics.render(false);
        }
        let stale = {
            let mut at = self.queues_read_at.lock();
            let stale = at.is_none_or(|t| t.elapsed() >= QUEUE_METRICS_EVERY);
            if stale {
                *at = Some(Instant::now());
            }
            stale
        };
        if stale {
            self.read_queue_gauges();
        }
        self.metrics.render(true)
    }

    fn read_queue_gauges(&self) {
        let ids = match self.with_db(|db| tenants::all_ids(db).map_err(ServiceError::database)) {
            Ok(ids) => ids,
            Err(e) => return warn!("metrics: cannot list tenants: {e:?}"),
        };
        let m = &self.metrics;
        // Tenants deleted meanwhile (through any replica) lose their series.
        m.queue_messages.reset();
        m.queue_consumers.reset();
        m.dead_letters.reset();
        for id in ids {
            let id = TenantId::from(id);
            let label = id.to_string();
            let label = [label.as_str()];
            let read = self
                .admin
                .queue_stats(&id.queue_name())
                .and_then(|main| Ok((main, self.admin.queue_stats(&id.dlq_name())?)));
            match read {
                Ok((main, dlq)) => {
                    if let Some(stats) = main {
                        m.queue_messages
                            .with_label_values(&label)
                            .set(i64::from(stats.messages));
                        m.queue_consumers
                            .with_label_values(&label)
                            .set(i64::from(stats.consumers));
                    }
                    if let Some(stats) = dlq {
                        m.dead_letters
                            .with_label_values(&label)
                            .set(i64::from(stats.messages));
                    }
                }
                Err(e) => return warn!("metrics: cannot read queue depths: {e:#}"),
            }
        }
    }
}
