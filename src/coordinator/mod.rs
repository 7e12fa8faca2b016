//! The replica's coordinator: one thread that keeps this replica's consumers in step with the
//! tenants' rows and with the other replicas, coordinating only through PostgreSQL.
//!
//! It holds a session for claims and reports; the `heart` holds another, with the replica's
//! liveness lock, and heartbeats on its own schedule. The coordinator wakes on every
//! change announced on the tenantd channel, on its consumers' events and once a second, and
//! then: plans which live replica runs which active tenant (`assign`), stops what should not
//! run here (releasing each claim once drained), claims and starts what should, resizes what
//! changed, and reports each consumer's state in `consumers` (`reconcile`). It is the only
//! caller of the manager's start and resize; the `fence` may stop everything on its own.
//!
//! The timing contract between replicas, for a failover timeout F:
//! - a replica heartbeats (`replicas.seen_at`, with its F) every tick while its heart's
//!   session works, whatever its coordinator waits on;
//! - a replica whose heartbeat is older than its F is not live, whatever its session holds;
//! - one that could not heartbeat for F/2 stops its consumers (`fence`), even if its own
//!   thread is stuck in a call to a silent database;
//! - a claim of a replica that is not live may be taken, and counts as stopped, only once that
//!   replica has not heartbeated for `grace(F)` = F/2 + a tick of its own F: by then it has
//!   fenced;
//! - one that wakes after F/2 without a heartbeat (a stopped process) stops its consumers
//!   before it heartbeats again.

mod fence;
mod heart;
mod listener;
mod probe;
mod reconcile;
mod state;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::health::Health;
use anyhow::{Context, Result};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use postgres::Client;

use crate::consumer::Event;
use crate::manager::TenantManager;
use crate::store::replicas::{self, Beat};
use crate::store::{self, DbSettings};
use fence::Fence;
use heart::Heart;
use listener::Listener;
use probe::Probe;
use state::Loop;

/// How often the replica heartbeats and checks who is live.
pub const TICK: Duration = Duration::from_secs(1);

/// How long after its last heartbeat a replica that is not live has surely stopped consuming:
/// its fence stops its consumers at F/2 (looking four times a tick), and a tick more is margin.
pub fn grace(failover_timeout: Duration) -> Duration {
    failover_timeout / 2 + TICK
}

/// How often a replica heartbeats (and looks at who is live): every tick, or a quarter of the
/// failover timeout when that is shorter, so that the fence (F/2) is two missed heartbeats away
/// — never one a few milliseconds late.
pub fn heartbeat_every(failover_timeout: Duration) -> Duration {
    TICK.min(failover_timeout / 4)
}

/// The longest interval between the AMQP heartbeats of this replica's consumers (in seconds, as
/// AMQP counts them). The broker drops a connection it has not heard from for two to three
/// intervals, so a stopped replica's consumers leave its queues within 3F/4 of the stop: before
/// another replica may take its tenants (its heartbeat older than F, a heartbeat interval
/// after the stop at the soonest). Longer, both would consume each queue at once.
pub fn consumer_heartbeat_secs(failover_timeout: Duration) -> u16 {
    u16::try_from((failover_timeout / 4).as_secs().max(1)).unwrap_or(u16::MAX)
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub replica_id: String,
    pub http_addr: String,
    pub db: DbSettings,
    /// A replica that stops answering has its tenants running elsewhere within this.
    pub failover_timeout: Duration,
    /// Most tenants this replica runs (0: no cap); said with every heartbeat.
    pub max_tenants: u32,
    /// How long a stopping consumer may drain.
    pub drain_timeout: Duration,
}

pub struct Coordinator {
    shutdown: Sender<Instant>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Coordinator {
    /// Joins the replicas (failing when the replica id is taken or the database unreachable)
    /// and starts the coordinator thread, which then takes this replica's share of tenants.
    pub fn start(
        settings: Settings,
        manager: Arc<TenantManager>,
        events: Receiver<Event>,
        health: Arc<Health>,
    ) -> Result<Coordinator> {
        let liveness = open_session(&settings, false)?;
        health.mark_beat(Instant::now());
        let session = open_coordinator_session(&settings)?;
        let (notes_tx, notes) = unbounded();
        let listener = Listener::start(settings.db.clone(), notes_tx)?;
        let fence = Fence::start(
            health.clone(),
            manager.clone(),
            settings.failover_timeout / 2,
        )?;
        let probe = Probe::start(manager.clone())?;
        let heart = Heart::start(settings.clone(), health.clone(), manager.clone(), liveness)?;
        let (shutdown, shutdown_rx) = bounded(1);
        let mut state = Loop::new(settings, health, manager, session, probe, heart);
        let thread = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                // Both stop when the coordinator does (the fence first).
                let (_listener, _fence) = (listener, fence);
                state.run(&shutdown_rx, &notes, &events)
            })
            .context("spawning the coordinator thread")?;
        Ok(Coordinator {
            shutdown,
            thread: Some(thread),
        })
    }

    /// Hands every tenant over (each consumer drains, then its claim is released for the
    /// replica that takes it), leaves the replicas, and joins the thread. Fails when consumers
    /// did not stop by `deadline`.
    pub fn stop(mut self, deadline: Instant) -> Result<()> {
        let _ = self.shutdown.send(deadline);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => anyhow::bail!("the coordinator thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.shutdown.send(Instant::now());
            let _ = thread.join();
        }
    }
}

/// Connects the heart's session — one that notices a silent server within half the failover
/// timeout, as the server notices it — and joins (taking the liveness lock on it), saying
/// whether this replica can reach the broker.
fn open_session(settings: &Settings, broker_down: bool) -> Result<Client> {
    let name = format!("tenantd replica {}", settings.replica_id);
    let db = DbSettings {
        keepalive: settings.failover_timeout / 2,
        ..settings.db.clone()
    };
    let mut client = store::connect(&db, &name)?;
    replicas::set_liveness_timeout(&mut client, settings.failover_timeout)?;
    replicas::join(
        &mut client,
        &settings.replica_id,
        &settings.http_addr,
        Beat {
            failover: settings.failover_timeout,
            broker_down,
            max_tenants: settings.max_tenants,
        },
    )?;
    replicas::forget_dead(&mut client)?;
    Ok(client)
}

/// Connects the coordinator's session, on which no statement waits on a row lock for longer
/// than a heartbeat's interval: a claim behind an operator's transaction fails and is tried
/// again at the next tick.
fn open_coordinator_session(settings: &Settings) -> Result<Client> {
    let name = format!("tenantd coordinator {}", settings.replica_id);
    let mut client = store::connect(&settings.db, &name)?;
    replicas::set_lock_timeout(&mut client, heartbeat_every(settings.failover_timeout))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The broker drops a stopped replica's consumers within three of their heartbeat
    /// intervals; another replica takes its tenants once its heartbeat is older than F, at the
    /// soonest F less a heartbeat interval after the stop. AMQP counts whole seconds, so below
    /// F = 4 s this cannot hold.
    #[test]
    fn a_stopped_replicas_consumers_leave_the_broker_before_its_tenants_are_taken() {
        for secs in 4..=120 {
            let f = Duration::from_secs(secs);
            let gone = Duration::from_secs(3 * u64::from(consumer_heartbeat_secs(f)));
            assert!(
                gone <= f - heartbeat_every(f),
                "FAILOVER_TIMEOUT={secs}: consumers gone after {gone:?}"
            );
        }
    }

    /// The fence stops everything F/2 after the last heartbeat: a healthy replica must have
    /// heartbeated at least twice by then, whatever failover timeout is allowed (two seconds at
    /// least), or a heartbeat a few milliseconds late fences it.
    #[test]
    fn a_healthy_replica_heartbeats_twice_before_its_fence_could_fire() {
        for secs in 2..=120 {
            let f = Duration::from_secs(secs);
            assert!(
                heartbeat_every(f) * 2 <= f / 2,
                "FAILOVER_TIMEOUT={secs}: a heartbeat every {:?}, the fence after {:?}",
                heartbeat_every(f),
                f / 2
            );
        }
    }
}
