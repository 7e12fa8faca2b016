//! The replica's coordinator: one thread that keeps this replica's consumers in step with the
//! tenants' rows and with the other replicas, coordinating only through PostgreSQL.
//!
//! It holds the replica's session (and on it the replica's liveness lock), wakes on every
//! change announced on the tenantd channel, on its consumers' events and once a second, and
//! then: plans which live replica runs which active tenant (`assign`), stops what should not
//! run here (releasing each claim once drained), claims and starts what should, resizes what
//! changed, and reports each consumer's state in `consumers`. It is the only caller of the
//! manager's start, resize and stop.

mod listener;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{after, bounded, unbounded, Receiver, Sender};
use log::{error, info, warn};
use parking_lot::Mutex;
use postgres::Client;

use crate::assign::{self, Placed};
use crate::backoff::Backoff;
use crate::consumer::Event;
use crate::ids::TenantId;
use crate::manager::TenantManager;
use crate::model::Status;
use crate::store::replicas::{self, Claimed, Report, TenantState};
use crate::store::{self, DbSettings};
use listener::{Listener, Note};

/// How often membership is checked (a dead replica is noticed within this).
pub const TICK: Duration = Duration::from_secs(1);
/// How often everything is reconciled even when nothing was announced.
const FULL_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Settings {
    pub replica_id: String,
    pub http_addr: String,
    pub db: DbSettings,
    /// A replica that stops answering has its tenants running elsewhere within this.
    pub failover_timeout: Duration,
    /// How long a stopping consumer may drain.
    pub drain_timeout: Duration,
}

/// What readiness needs to know of the coordinator.
#[derive(Default)]
pub struct Health {
    /// Why the replica's session is down, while it is.
    db_error: Mutex<Option<String>>,
    /// Whether the first plan has been carried out.
    settled: Mutex<bool>,
}

impl Health {
    /// `Err` says what keeps this replica from doing its share.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = self.db_error.lock().clone() {
            return Err(format!("database unavailable: {e}"));
        }
        match *self.settled.lock() {
            true => Ok(()),
            false => Err("starting: this replica has not yet taken its tenants".into()),
        }
    }
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
        let session = open_session(&settings)?;
        let (notes_tx, notes) = unbounded();
        let listener = Listener::start(settings.db.clone(), notes_tx)?;
        let (shutdown, shutdown_rx) = bounded(1);
        let mut state = Loop {
            health: health.clone(),
            session: Some(session),
            manager,
            settings,
            restart_after: HashMap::new(),
            reconnect: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            next_connect: Instant::now(),
            last_ok: Instant::now(),
            last_full: Instant::now(),
            members: Vec::new(),
            dirty: true,
            leaving: false,
        };
        let thread = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                let _listener = listener;
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

/// Connects the replica's session, asks the server to notice its death quickly, and joins.
fn open_session(settings: &Settings) -> Result<Client> {
    let name = format!("tenantd replica {}", settings.replica_id);
    let mut client = store::connect(&settings.db, &name)?;
    replicas::set_liveness_timeout(&mut client, settings.failover_timeout)?;
    replicas::join(&mut client, &settings.replica_id, &settings.http_addr)?;
    replicas::forget_dead(&mut client)?;
    Ok(client)
}

struct Loop {
    settings: Settings,
    health: Arc<Health>,
    session: Option<Client>,
    manager: Arc<TenantManager>,
    /// Threads that ended on their own start again no sooner than this.
    restart_after: HashMap<TenantId, (Instant, Backoff)>,
    reconnect: Backoff,
    next_connect: Instant,
    /// The last time the session answered.
    last_ok: Instant,
    last_full: Instant,
    /// The live replicas at the last look (id, leaving).
    members: Vec<(String, bool)>,
    /// Something changed: plan again.
    dirty: bool,
    leaving: bool,
}

impl Loop {
    fn run(
        &mut self,
        shutdown: &Receiver<Instant>,
        notes: &Receiver<Note>,
        events: &Receiver<Event>,
    ) -> Result<()> {
        loop {
            self.step();
            crossbeam_channel::select! {
                recv(shutdown) -> deadline => {
                    return self.hand_over(deadline.unwrap_or_else(|_| Instant::now()), events);
                }
                recv(notes) -> note => {
                    if let Ok(note) = note {
                        self.on_note(&note);
                    }
                    while let Ok(note) = notes.try_recv() {
                        self.on_note(&note);
                    }
                }
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.on_event(event);
                    }
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                }
                recv(after(TICK)) -> _ => self.on_tick(),
            }
        }
    }

    /// Reconnects when needed, fences when the database has been gone too long, and plans
    /// again when something changed.
    fn step(&mut self) {
        if self.session.is_none() && !self.connect() {
            self.fence();
            return;
        }
        if self.dirty {
            self.dirty = false;
            if let Err(e) = self.reconcile() {
                self.lost(&e);
            }
        }
    }

    fn on_note(&mut self, note: &Note) {
        // Every announced change, of a tenant or of the replicas, may change the plan.
        let _ = note;
        self.dirty = true;
    }

    fn on_tick(&mut self) {
        if self.last_full.elapsed() >= FULL_EVERY {
            self.dirty = true;
            return;
        }
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match replicas::heartbeat(session, &self.settings.replica_id)
            .and_then(|()| replicas::live(session))
        {
            Ok(live) => {
                self.last_ok = Instant::now();
                let members: Vec<(String, bool)> =
                    live.into_iter().map(|r| (r.id, r.leaving)).collect();
                if members != self.members {
                    self.dirty = true;
                }
            }
            Err(e) => self.lost(&e),
        }
    }

    fn on_event(&mut self, event: Event) {
        if let Event::Ended { tenant, error } = &event {
            return self.on_ended(*tenant, error.as_deref());
        }
        if let Some((id, report)) = self.manager.on_event(&event) {
            self.write_report(id, &report);
        }
    }

    /// A thread ended: join it and give its claim up. One that ended on its own (its queue is
    /// gone) is started again after a backoff if the tenant should still run here.
    fn on_ended(&mut self, id: TenantId, error: Option<&str>) {
        let Some(version) = self.manager.ended(id) else {
            return;
        };
        if let Some(error) = error {
            let (at, backoff) = self.restart_after.entry(id).or_insert_with(|| {
                (
                    Instant::now(),
                    Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
                )
            });
            *at = Instant::now() + backoff.next();
            error!("tenant_id={id} consumer ended: {error}");
        }
        let me = self.settings.replica_id.clone();
        if let Some(session) = self.session.as_mut() {
            if let Err(e) = replicas::release(session, id, &me, version) {
                self.lost(&e);
            }
        }
        self.dirty = true;
    }

    fn write_report(&mut self, id: TenantId, report: &Report) {
        let me = self.settings.replica_id.clone();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match replicas::report(session, id, &me, report) {
            Ok(true) => {}
            Ok(false) => {
                // Another replica holds the claim now (it took this one for dead).
                warn!("tenant_id={id} another replica took the tenant; stopping here");
                self.manager.stop(id, Instant::now());
            }
            Err(e) => self.lost(&e),
        }
    }

    /// Plans and carries the plan out for this replica.
    fn reconcile(&mut self) -> Result<()> {
        let me = self.settings.replica_id.clone();
        let session = self.session.as_mut().expect("connected");
        replicas::heartbeat(session, &me)?;
        let live = replicas::live(session)?;
        let states = replicas::states(session)?;
        self.last_ok = Instant::now();
        self.last_full = Instant::now();
        self.members = live.iter().map(|r| (r.id.clone(), r.leaving)).collect();
        let live_ids: HashSet<&str> = live.iter().map(|r| r.id.as_str()).collect();
        let taking: Vec<&str> = live
            .iter()
            .filter(|r| !(r.leaving || self.leaving && r.id == me))
            .map(|r| r.id.as_str())
            .collect();
        let active: Vec<Placed> = states
            .iter()
            .filter(|s| s.status == Status::Active)
            .map(|s| Placed {
                tenant: s.id,
                owner: s.owner.as_deref().filter(|o| taking.contains(o)),
            })
            .collect();
        let plan = assign::plan(&active, &taking);
        let mine = |s: &TenantState| {
            s.status == Status::Active && plan.get(&s.id).is_some_and(|r| *r == me)
        };
        let by_id: HashMap<TenantId, &TenantState> = states.iter().map(|s| (s.id, s)).collect();
        let mut reports = Vec::new();
        for id in self.manager.ids() {
            let keep = by_id
                .get(&id)
                .filter(|s| mine(s) && s.owner.as_deref() == Some(me.as_str()));
            let deadline = Instant::now() + self.settings.drain_timeout;
            let report = match keep {
                Some(s) => self.manager.update(id, claimed(s)),
                None => self.manager.stop(id, deadline),
            };
            reports.extend(report.map(|r| (id, r)));
        }
        let wanted: Vec<&TenantState> = states
            .iter()
            .filter(|s| mine(s) && self.manager.status(s.id).is_none())
            .filter(|s| {
                s.owner
                    .as_deref()
                    .is_none_or(|o| o == me || !live_ids.contains(o))
            })
            .collect();
        let started = self.claim_and_start(&wanted)?;
        self.release_stale_claims(&states, &mine)?;
        for id in self.manager.known() {
            if !by_id.contains_key(&id) && self.manager.status(id).is_none() {
                self.manager.forget(id);
                self.restart_after.remove(&id);
            }
        }
        for (id, report) in reports {
            self.write_report(id, &report);
        }
        self.settled(live.len(), active.len(), started);
        Ok(())
    }

    /// Gives up claims of this replica's that no thread here stands behind and that it does
    /// not want (their consumer ended while the session was down, so the release could not be
    /// written): otherwise a pause or a delete would wait on them for ever.
    fn release_stale_claims(
        &mut self,
        states: &[TenantState],
        mine: &impl Fn(&TenantState) -> bool,
    ) -> Result<()> {
        let me = self.settings.replica_id.clone();
        for s in states {
            let stale = s.owner.as_deref() == Some(me.as_str())
                && !mine(s)
                && self.manager.status(s.id).is_none();
            if stale {
                let session = self.session.as_mut().expect("connected");
                replicas::release(session, s.id, &me, s.version)?;
            }
        }
        Ok(())
    }

    /// Claims each tenant and starts its consumer; how many started.
    fn claim_and_start(&mut self, wanted: &[&TenantState]) -> Result<usize> {
        let me = self.settings.replica_id.clone();
        let mut started = 0;
        for s in wanted {
            if let Some((at, _)) = self.restart_after.get(&s.id) {
                if Instant::now() < *at {
                    self.dirty = true;
                    continue;
                }
            }
            let session = self.session.as_mut().expect("connected");
            let Some(claim) = replicas::claim(session, s.id, &me)? else {
                continue;
            };
            match self.manager.start(s.id, claim) {
                Ok(()) => started += 1,
                Err(e) => {
                    error!("tenant_id={} cannot start its consumer: {e:#}", s.id);
                    replicas::release(session, s.id, &me, claim.version)?;
                }
            }
        }
        Ok(started)
    }

    fn settled(&mut self, replicas: usize, active: usize, started: usize) {
        let mut settled = self.health.settled.lock();
        if !*settled {
            *settled = true;
            info!(
                "replica {} took its share: {replicas} live replicas, {active} active tenants, \
                 {started} started here",
                self.settings.replica_id
            );
        }
    }

    /// Opens the session again (with backoff); true once it is back.
    fn connect(&mut self) -> bool {
        if Instant::now() < self.next_connect {
            return false;
        }
        match open_session(&self.settings) {
            Ok(session) => {
                info!(
                    "replica {} is back in touch with PostgreSQL",
                    self.settings.replica_id
                );
                self.session = Some(session);
                *self.health.db_error.lock() = None;
                self.reconnect.reset();
                self.last_ok = Instant::now();
                self.dirty = true;
                true
            }
            Err(e) => {
                *self.health.db_error.lock() = Some(format!("{e:#}"));
                self.next_connect = Instant::now() + self.reconnect.next();
                false
            }
        }
    }

    /// The session failed: drop it (the server releases the liveness lock when it notices).
    fn lost(&mut self, e: &anyhow::Error) {
        if self.session.take().is_some() {
            warn!(
                "replica {} lost PostgreSQL: {e:#}",
                self.settings.replica_id
            );
        }
        *self.health.db_error.lock() = Some(format!("{e:#}"));
        self.dirty = true;
    }

    /// Without the database for half the failover timeout, this replica may already count as
    /// dead and its tenants run elsewhere: stop its consumers, so what they hold unacked goes
    /// back to the queues for the others.
    fn fence(&mut self) {
        if self.last_ok.elapsed() < self.settings.failover_timeout / 2 || self.manager.is_empty() {
            return;
        }
        warn!(
            "replica {} has been without PostgreSQL for {:?}: stopping its consumers",
            self.settings.replica_id,
            self.last_ok.elapsed()
        );
        self.manager.stop_all(Instant::now());
    }

    /// The way out: say this replica is leaving, stop every consumer (they drain in parallel),
    /// release each claim as its consumer ends, so the replica taking it starts at once, then
    /// end the session (and with it the liveness lock).
    fn hand_over(&mut self, deadline: Instant, events: &Receiver<Event>) -> Result<()> {
        self.leaving = true;
        let me = self.settings.replica_id.clone();
        if let Some(session) = self.session.as_mut() {
            if let Err(e) = replicas::leave(session, &me) {
                self.lost(&e);
            }
        }
        info!("stopping {} consumers", self.manager.ids().len());
        self.manager.stop_all(deadline);
        let grace = deadline + Duration::from_secs(2);
        while !self.manager.is_empty() {
            match events.recv_deadline(grace) {
                Ok(event) => self.on_event(event),
                Err(_) => break,
            }
        }
        self.session = None;
        match self.manager.ids().len() {
            0 => Ok(()),
            n => anyhow::bail!("{n} consumers did not stop in time"),
        }
    }
}

fn claimed(s: &TenantState) -> Claimed {
    Claimed {
        workers: s.workers,
        version: s.version,
    }
}
