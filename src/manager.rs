//! `TenantManager`: which tenants have a running consumer thread, and the one place that starts,
//! resizes and stops them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use log::{info, warn};
use parking_lot::Mutex;

use crate::consumer::{self, ConsumerContext, ConsumerHandle, Starting, TenantSpec};
use crate::ids::TenantId;
use crate::metrics::metrics;
use crate::stats::{Counts, TenantStats};

pub struct TenantManager {
    ctx: Arc<ConsumerContext>,
    start_timeout: Duration,
    consumers: Mutex<HashMap<TenantId, ConsumerHandle>>,
    /// Counters outlive a consumer (pause, resume) and go with the tenant.
    stats: Mutex<HashMap<TenantId, Arc<TenantStats>>>,
}

impl TenantManager {
    pub fn new(ctx: ConsumerContext, start_timeout: Duration) -> TenantManager {
        TenantManager {
            ctx: Arc::new(ctx),
            start_timeout,
            consumers: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
        }
    }

    fn spawn(&self, id: TenantId, workers: u16) -> Result<Starting> {
        let stats = self
            .stats
            .lock()
            .entry(id)
            .or_insert_with(|| Arc::new(TenantStats::new(id)))
            .clone();
        consumer::spawn(self.ctx.clone(), TenantSpec { id, workers, stats })
    }

    /// The tenant's counters since tenantd started.
    pub fn counts(&self, id: TenantId) -> Counts {
        self.stats
            .lock()
            .get(&id)
            .map(|s| s.counts())
            .unwrap_or_default()
    }

    /// Drops the counters of a deleted tenant.
    pub fn forget(&self, id: TenantId) {
        self.stats.lock().remove(&id);
        metrics().remove_tenant(&id.to_string());
    }

    /// The tenants with a running consumer.
    pub fn running_ids(&self) -> Vec<TenantId> {
        self.consumers.lock().keys().copied().collect()
    }

    /// Starts the tenant's consumer and returns once the broker has registered it.
    /// Starting a tenant that already runs only applies `workers`.
    pub fn start(&self, id: TenantId, workers: u16) -> Result<()> {
        if let Some(handle) = self.consumers.lock().get(&id) {
            handle.resize(workers);
            return Ok(());
        }
        let handle = self.spawn(id, workers)?.wait(self.start_timeout)?;
        self.insert(id, handle);
        Ok(())
    }

    /// Starts many consumers at once (at boot): threads start in parallel, then each is awaited.
    /// Returns the tenants whose consumer did not start, with the reason.
    pub fn start_all(&self, tenants: &[(TenantId, u16)]) -> Vec<(TenantId, anyhow::Error)> {
        let mut starting = Vec::with_capacity(tenants.len());
        let mut failed = Vec::new();
        for &(id, workers) in tenants {
            match self.spawn(id, workers) {
                Ok(s) => starting.push((id, s)),
                Err(e) => failed.push((id, e)),
            }
        }
        for (id, s) in starting {
            match s.wait(self.start_timeout) {
                Ok(handle) => self.insert(id, handle),
                Err(e) => failed.push((id, e)),
            }
        }
        failed
    }

    fn insert(&self, id: TenantId, handle: ConsumerHandle) {
        // Two concurrent starts of one tenant: keep the first, stop the second.
        let duplicate = {
            let mut consumers = self.consumers.lock();
            match consumers.contains_key(&id) {
                true => Some(handle),
                false => {
                    consumers.insert(id, handle);
                    metrics().tenants_running.set(consumers.len() as i64);
                    None
                }
            }
        };
        if let Some(handle) = duplicate {
            handle.stop(Instant::now());
        }
    }

    pub fn resize(&self, id: TenantId, workers: u16) {
        if let Some(handle) = self.consumers.lock().get(&id) {
            handle.resize(workers);
        }
    }

    pub fn is_running(&self, id: TenantId) -> bool {
        self.consumers.lock().contains_key(&id)
    }

    pub fn running(&self) -> usize {
        self.consumers.lock().len()
    }

    /// Stops the tenant's consumer gracefully; the lock is not held while it drains, so other
    /// tenants are created and stopped meanwhile.
    pub fn stop(&self, id: TenantId, timeout: Duration) -> bool {
        let handle = {
            let mut consumers = self.consumers.lock();
            let handle = consumers.remove(&id);
            metrics().tenants_running.set(consumers.len() as i64);
            handle
        };
        match handle {
            Some(handle) => {
                handle.stop(Instant::now() + timeout);
                true
            }
            None => false,
        }
    }

    /// Stops every consumer: all are told at once, so they drain in parallel, then each is joined.
    pub fn stop_all(&self, deadline: Instant) {
        let handles: Vec<_> = self.consumers.lock().drain().collect();
        metrics().tenants_running.set(0);
        info!("stopping {} consumers", handles.len());
        for (_, handle) in &handles {
            handle.request_stop(deadline);
        }
        for (id, handle) in handles {
            if !handle.join() {
                warn!("tenant_id={id} consumer thread panicked");
            }
        }
    }
}
