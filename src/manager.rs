//! `TenantManager`: the consumer threads this replica runs, what each was asked to do and how
//! each is doing. The coordinator is the only one that starts, resizes and stops them; HTTP reads
//! their state (readiness, counts).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use log::warn;
use parking_lot::Mutex;

use crate::consumer::{self, ConsumerContext, ConsumerHandle, Event, TenantSpec};
use crate::ids::TenantId;
use crate::model::{Claimed, Report};
use crate::stats::{Counts, TenantStats};

pub struct TenantManager {
    ctx: Arc<ConsumerContext>,
    consumers: Mutex<HashMap<TenantId, Local>>,
    /// Counters outlive a consumer (pause, resume) and go with the tenant.
    stats: Mutex<HashMap<TenantId, Arc<TenantStats>>>,
}

/// One consumer thread of this replica.
struct Local {
    handle: ConsumerHandle,
    /// The concurrency and tenant version it was last asked to apply.
    want: Claimed,
    state: State,
    /// The concurrency it applies, while registered with the broker.
    workers: Option<u16>,
    /// The tenant version it has acted on.
    applied: i64,
    error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Running,
    Retrying,
    Stopping,
}

impl Local {
    fn report(&self) -> Report {
        Report {
            state: match self.state {
                State::Starting => "starting",
                State::Running => "running",
                State::Retrying => "retrying",
                State::Stopping => "stopping",
            },
            workers: self.workers,
            version: self.applied,
            error: self.error.clone(),
        }
    }
}

impl TenantManager {
    pub fn new(ctx: Arc<ConsumerContext>) -> TenantManager {
        TenantManager {
            ctx,
            consumers: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
        }
    }

    /// Opens and closes a connection to the brokers, as a consumer would: whether this replica
    /// can reach one (within the connect timeout).
    pub fn probe_broker(&self) -> Result<()> {
        let connection = self
            .ctx
            .brokers
            .connect(self.ctx.connect_timeout, "tenantd broker probe")?;
        let _ = connection.close();
        Ok(())
    }

    /// Starts a consumer thread for the tenant (it connects in the background).
    pub fn start(&self, id: TenantId, want: Claimed) -> Result<()> {
        let stats = self
            .stats
            .lock()
            .entry(id)
            .or_insert_with(|| Arc::new(TenantStats::new(id, &self.ctx.metrics)))
            .clone();
        let spec = TenantSpec {
            id,
            workers: want.workers,
            stats,
        };
        let handle = consumer::spawn(self.ctx.clone(), spec)?;
        let local = Local {
            handle,
            want,
            state: State::Starting,
            workers: None,
            applied: 0,
            error: None,
        };
        self.consumers.lock().insert(id, local);
        self.publish_gauges();
        Ok(())
    }

    /// Records a newer version of the tenant that it runs: resizes when the concurrency changed.
    /// Returns the report to write when that changes it.
    pub fn update(&self, id: TenantId, want: Claimed) -> Option<Report> {
        let mut consumers = self.consumers.lock();
        let local = consumers.get_mut(&id)?;
        if local.state == State::Stopping || want.version <= local.want.version {
            return None;
        }
        if want.workers != local.want.workers {
            local.handle.resize(want.workers);
        }
        local.want = want;
        let before = local.report();
        local.settle();
        let after = local.report();
        (after != before).then_some(after)
    }

    /// Tells the thread to drain and stop; it says `Ended` when it has.
    pub fn stop(&self, id: TenantId, deadline: Instant) -> Option<Report> {
        let mut consumers = self.consumers.lock();
        let local = consumers.get_mut(&id)?;
        if local.state == State::Stopping {
            return None;
        }
        local.handle.request_stop(deadline);
        local.state = State::Stopping;
        drop(consumers);
        self.publish_gauges();
        self.report(id)
    }

    /// Tells every thread to stop by `deadline`.
    pub fn stop_all(&self, deadline: Instant) {
        for id in self.ids() {
            self.stop(id, deadline);
        }
    }

    /// Applies a thread's event; the report to write, if the state changed.
    pub fn on_event(&self, event: &Event) -> Option<(TenantId, Report)> {
        let mut consumers = self.consumers.lock();
        let (id, local) = match event {
            Event::Running { tenant, workers } => {
                let local = consumers.get_mut(tenant)?;
                if local.state != State::Stopping {
                    local.state = State::Running;
                }
                local.workers = Some(*workers);
                local.error = None;
                (*tenant, local)
            }
            Event::Failing { tenant, error } => {
                let local = consumers.get_mut(tenant)?;
                if local.state != State::Stopping {
                    local.state = State::Retrying;
                }
                local.workers = None;
                local.error = Some(error.clone());
                (*tenant, local)
            }
            Event::Ended { .. } => return None,
        };
        local.settle();
        let report = local.report();
        drop(consumers);
        self.publish_gauges();
        Some((id, report))
    }

    /// Joins an ended thread; the version to release its claim with.
    pub fn ended(&self, id: TenantId) -> Option<i64> {
        let local = self.consumers.lock().remove(&id)?;
        let version = local.want.version;
        if !local.handle.join() {
            warn!(tenant_id:% = id; "consumer thread panicked");
        }
        self.publish_gauges();
        Some(version)
    }

    fn report(&self, id: TenantId) -> Option<Report> {
        self.consumers.lock().get(&id).map(Local::report)
    }

    pub fn ids(&self) -> Vec<TenantId> {
        self.consumers.lock().keys().copied().collect()
    }

    /// Whether the tenant has a thread here, running or stopping.
    pub fn has_thread(&self, id: TenantId) -> bool {
        self.consumers.lock().contains_key(&id)
    }

    /// Whether a thread here has not been told to stop.
    pub fn any_running(&self) -> bool {
        self.consumers
            .lock()
            .values()
            .any(|l| l.state != State::Stopping)
    }

    /// Tenants that should run here but cannot connect, with the last reason.
    pub fn not_running(&self) -> Vec<(TenantId, Option<String>)> {
        self.consumers
            .lock()
            .iter()
            .filter(|(_, l)| l.state == State::Retrying)
            .map(|(id, l)| (*id, l.error.clone()))
            .collect()
    }

    /// How many tenants have a consumer here not told to stop, and how many of those cannot
    /// connect to the broker.
    pub fn running_and_failing(&self) -> (usize, usize) {
        let consumers = self.consumers.lock();
        let running = consumers.values().filter(|l| l.state != State::Stopping);
        let failing = running
            .clone()
            .filter(|l| l.state == State::Retrying)
            .count();
        (running.count(), failing)
    }

    /// The tenant's counters on this replica since it started.
    pub fn counts(&self, id: TenantId) -> Counts {
        self.stats
            .lock()
            .get(&id)
            .map(|s| s.counts())
            .unwrap_or_default()
    }

    /// Drops the counters and series of a tenant that is gone.
    pub fn forget(&self, id: TenantId) {
        self.stats.lock().remove(&id);
        self.ctx.metrics.remove_tenant(&id.to_string());
    }

    /// Tenants whose counters this replica keeps.
    pub fn known(&self) -> Vec<TenantId> {
        self.stats.lock().keys().copied().collect()
    }

    fn publish_gauges(&self) {
        let consumers = self.consumers.lock();
        let count = |s: State| consumers.values().filter(|l| l.state == s).count() as i64;
        let m = &self.ctx.metrics;
        m.tenants_running.set(count(State::Running));
        m.consumers_failing.set(count(State::Retrying));
    }
}

impl Local {
    /// The version is applied once the thread runs at the wanted concurrency, or is retrying
    /// (it will connect at that concurrency).
    fn settle(&mut self) {
        let applied = match self.state {
            State::Running => self.workers == Some(self.want.workers),
            State::Retrying => true,
            State::Starting | State::Stopping => false,
        };
        if applied {
            self.applied = self.want.version;
        }
    }
}
