//! The coordinator thread's loop: what wakes it (announced changes, consumer events, a fixed
//! tick), its session to PostgreSQL (lost, reconnected, heartbeating), and the hand-over that
//! ends it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use crossbeam_channel::{at, never, Receiver};
use log::{error, info, warn};
use postgres::Client;

use super::heart::Heart;
use super::listener::Note;
use super::probe::Probe;
use super::{heartbeat_every, open_coordinator_session, Settings};
use crate::backoff::Backoff;
use crate::consumer::Event;
use crate::health::Health;
use crate::ids::TenantId;
use crate::manager::TenantManager;
use crate::model::Report;
use crate::store;
use crate::store::replicas;

/// How often everything is reconciled even when nothing was announced.
const FULL_EVERY: Duration = Duration::from_secs(10);
/// Tenants handed over at once when leaving (more when there are more than `MAX_WAVES` waves'
/// worth), and how long a wave may take to run elsewhere before the next one goes anyway.
const WAVE: usize = 50;
const MAX_WAVES: usize = 20;
const WAVE_WAIT: Duration = Duration::from_secs(2);

pub struct Loop {
    pub(super) settings: Settings,
    pub(super) health: Arc<Health>,
    pub(super) session: Option<Client>,
    pub(super) manager: Arc<TenantManager>,
    /// Threads that ended on their own start again no sooner than this.
    pub(super) restart_after: HashMap<TenantId, (Instant, Backoff)>,
    /// Claims to give up (their consumers have ended), written together.
    pub(super) released: Vec<(TenantId, i64)>,
    reconnect: Backoff,
    next_connect: Instant,
    next_tick: Instant,
    /// When this replica started: it may wait a little for peers (`reconcile`).
    pub(super) started: Instant,
    last_full: Instant,
    /// The live replicas at the last look (id, leaving, broker down).
    pub(super) members: Vec<(String, bool, bool)>,
    pub(super) probe: Probe,
    /// Holds the liveness lock; dropped last on the way out.
    pub(super) heart: Option<Heart>,
    /// Since when this replica has said it cannot reach the broker (and taken no tenants).
    pub(super) broker_down: Option<Instant>,
    /// Something changed: plan again.
    pub(super) dirty: bool,
    /// The plan claimed one wave of several: the next is claimed at once, not at the next
    /// wake, so a start's consumers open together (see `consumer::StartGate`).
    pub(super) next_wave: bool,
    pub(super) leaving: bool,
}

impl Loop {
    pub fn new(
        settings: Settings,
        health: Arc<Health>,
        manager: Arc<TenantManager>,
        session: Client,
        probe: Probe,
        heart: Heart,
    ) -> Loop {
        let tick = heartbeat_every(settings.failover_timeout);
        Loop {
            settings,
            health,
            session: Some(session),
            manager,
            restart_after: HashMap::new(),
            released: Vec::new(),
            reconnect: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            next_connect: Instant::now(),
            next_tick: Instant::now() + tick,
            started: Instant::now(),
            last_full: Instant::now(),
            members: Vec::new(),
            probe,
            heart: Some(heart),
            broker_down: None,
            dirty: true,
            next_wave: false,
            leaving: false,
        }
    }

    pub fn run(
        &mut self,
        shutdown: &Receiver<Instant>,
        notes: &Receiver<Note>,
        events: &Receiver<Event>,
    ) -> Result<()> {
        let mut notes = notes.clone();
        loop {
            self.health.mark_progress();
            self.step();
            // A fixed schedule: a stream of events never delays the tick.
            let tick = at(self.next_tick);
            let wave = match std::mem::take(&mut self.next_wave) {
                true => at(Instant::now()),
                false => never(),
            };
            crossbeam_channel::select! {
                recv(shutdown) -> deadline => {
                    return self.hand_over(deadline.unwrap_or_else(|_| Instant::now()), events);
                }
                recv(notes) -> note => match note {
                    // Every announced change, of a tenant or of the replicas, may change the plan.
                    Ok(_) => {
                        self.dirty = true;
                        while notes.try_recv().is_ok() {}
                    }
                    // The listener is gone (it never ends before the coordinator does): the
                    // tick still brings changes, within `FULL_EVERY`.
                    Err(_) => notes = never(),
                },
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.on_event(event);
                    }
                    while let Ok(event) = events.try_recv() {
                        self.on_event(event);
                    }
                    self.flush_releases();
                }
                recv(tick) -> _ => {
                    self.next_tick = Instant::now() + self.tick();
                    self.on_tick();
                }
                recv(wave) -> _ => {}
            }
        }
    }

    /// How often this replica heartbeats.
    fn tick(&self) -> Duration {
        heartbeat_every(self.settings.failover_timeout)
    }

    /// Reconnects when needed, and plans again when something changed.
    fn step(&mut self) {
        if self.session.is_none() && !self.connect() {
            return;
        }
        if self.dirty {
            self.dirty = false;
            if let Err(e) = self.reconcile() {
                self.lost(&e);
            }
        }
    }

    fn on_tick(&mut self) {
        if self.last_full.elapsed() >= FULL_EVERY {
            self.last_full = Instant::now();
            self.dirty = true;
            return;
        }
        if self.session.is_none() {
            return;
        }
        let live = self.watch_broker().and_then(|()| {
            let session = self.session.as_mut().expect("connected");
            replicas::live(session)
        });
        match live {
            Ok(live) => {
                let members: Vec<_> = live
                    .into_iter()
                    .map(|r| (r.id, r.leaving, r.broker_down))
                    .collect();
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
        if matches!(event, Event::Failing { .. }) {
            // The broker probe starts at once (see `probe`).
            self.probe.want(true);
        }
        if let Some((id, report)) = self.manager.on_event(&event) {
            self.write_report(id, &report);
        }
    }

    /// A thread ended: join it and give its claim up (with the others of the batch). One that
    /// ended on its own (its queue is gone) is started again after a backoff if the tenant
    /// should still run here.
    fn on_ended(&mut self, id: TenantId, error: Option<&str>) {
        let Some(version) = self.manager.ended(id) else {
            return;
        };
        if let Some(error) = error {
            self.back_off(id);
            error!(tenant_id:% = id; "consumer ended: {error}");
        }
        self.released.push((id, version));
        self.dirty = true;
    }

    /// The tenant's consumer is started here again no sooner than its backoff allows: one that
    /// ends on its own or fails to start is not released and claimed again in a tight loop.
    pub(super) fn back_off(&mut self, id: TenantId) {
        let (at, backoff) = self.restart_after.entry(id).or_insert_with(|| {
            (
                Instant::now(),
                Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            )
        });
        *at = Instant::now() + backoff.next();
    }

    /// Writes the releases collected so far. Without a session they are dropped: the next
    /// reconcile finds such claims (its own, with no thread behind them) and releases them.
    pub(super) fn flush_releases(&mut self) {
        let released = std::mem::take(&mut self.released);
        let me = self.settings.replica_id.clone();
        if let Some(session) = self.session.as_mut() {
            if let Err(e) = replicas::release(session, &released, &me) {
                self.lost(&e);
            }
        }
    }

    pub(super) fn write_report(&mut self, id: TenantId, report: &Report) {
        let me = self.settings.replica_id.clone();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        match replicas::report(session, id, &me, report) {
            Ok(true) => {}
            Ok(false) => {
                // Another replica holds the claim now (it took this one for dead).
                warn!(tenant_id:% = id; "another replica took the tenant; stopping here");
                self.manager.stop(id, Instant::now());
            }
            Err(e) => self.lost(&e),
        }
    }

    /// Opens the session again (with backoff); true once it is back.
    fn connect(&mut self) -> bool {
        if Instant::now() < self.next_connect {
            return false;
        }
        match open_coordinator_session(&self.settings) {
            Ok(session) => {
                info!(
                    "replica {} is back in touch with PostgreSQL",
                    self.settings.replica_id
                );
                self.session = Some(session);
                self.health.set_db_error(None);
                self.reconnect.reset();
                self.dirty = true;
                true
            }
            Err(e) => {
                self.health.set_db_error(Some(format!("{e:#}")));
                self.next_connect = Instant::now() + self.reconnect.next();
                false
            }
        }
    }

    /// The session failed: drop it (the server releases the liveness lock when it notices).
    /// A statement that waited on a row lock past `lock_timeout` only failed: the session
    /// stays, and the plan is carried out again at the next tick.
    pub(super) fn lost(&mut self, e: &anyhow::Error) {
        if store::Failure::of(e) == store::Failure::LockTimeout {
            info!("a coordinator statement waited too long on a lock; trying again: {e:#}");
            self.dirty = true;
            return;
        }
        if self.session.take().is_some() {
            warn!(
                "replica {} lost PostgreSQL: {e:#}",
                self.settings.replica_id
            );
        }
        self.health.set_db_error(Some(format!("{e:#}")));
        self.dirty = true;
    }

    /// The way out: say this replica is leaving, then hand the tenants over in waves — stop a
    /// wave's consumers (they drain in parallel), release their claims as they end, and wait
    /// until another replica runs them before stopping the next — so each tenant pauses only
    /// for its own hand-over, not behind hundreds of connects. Then end the session (and with
    /// it the liveness lock).
    fn hand_over(&mut self, deadline: Instant, events: &Receiver<Event>) -> Result<()> {
        self.leaving = true;
        let me = self.settings.replica_id.clone();
        if let Some(session) = self.session.as_mut() {
            if let Err(e) = replicas::leave(session, &me) {
                self.lost(&e);
            }
        }
        let others = self
            .members
            .iter()
            .any(|(id, leaving, _)| *id != me && !leaving);
        let mut ids = self.manager.ids();
        ids.sort_unstable();
        info!("stopping {} consumers", ids.len());
        let wave = WAVE.max(ids.len().div_ceil(MAX_WAVES));
        for tenants in ids.chunks(wave) {
            if Instant::now() >= deadline {
                break;
            }
            for id in tenants {
                self.manager.stop(*id, deadline);
            }
            self.await_ended(tenants, deadline, events);
            if others {
                self.await_taken(tenants, deadline.min(Instant::now() + WAVE_WAIT));
            }
        }
        self.manager.stop_all(deadline);
        let all = self.manager.ids();
        self.await_ended(&all, deadline + Duration::from_secs(2), events);
        self.session = None;
        self.heart = None;
        match self.manager.ids().len() {
            0 => Ok(()),
            n => anyhow::bail!("{n} consumers did not stop in time"),
        }
    }

    /// Handles events (heartbeating meanwhile, or the fence would cut the drains short) until
    /// none of `tenants` runs here any more, or `until`.
    fn await_ended(&mut self, tenants: &[TenantId], until: Instant, events: &Receiver<Event>) {
        while tenants.iter().any(|t| self.manager.has_thread(*t)) && Instant::now() < until {
            self.health.mark_progress();
            if let Ok(event) = events.recv_deadline(until.min(Instant::now() + self.tick())) {
                self.on_event(event);
                while let Ok(event) = events.try_recv() {
                    self.on_event(event);
                }
                self.flush_releases();
            }
        }
    }

    /// Waits (polling the claims) until another replica runs each of `tenants` still active.
    fn await_taken(&mut self, tenants: &[TenantId], until: Instant) {
        let me = self.settings.replica_id.clone();
        while Instant::now() < until {
            self.health.mark_progress();
            let Some(session) = self.session.as_mut() else {
                return;
            };
            match replicas::taken_over(session, tenants, &me) {
                Ok((active, taken)) if taken >= active => return,
                Ok(_) => std::thread::sleep(Duration::from_millis(20)), // a poll of the claims
                Err(e) => return self.lost(&e),
            }
        }
    }
}

impl Loop {
    /// Gives the tenants up when this replica alone cannot reach the broker, and takes tenants
    /// again when it can (see the module's header).
    pub(super) fn watch_broker(&mut self) -> Result<()> {
        let (running, failing) = self.manager.running_and_failing();
        self.probe.want(self.broker_down.is_some() || failing > 0);
        let seen = self.probe.seen();
        let half = self.settings.failover_timeout / 2;
        if let Some(down_at) = self.broker_down {
            // Answering as long as it failed before it was given up: a path that flaps does
            // not bounce the tenants back and forth.
            if seen
                .ok_since
                .is_some_and(|ok| ok > down_at && ok.elapsed() >= half)
            {
                info!("the broker answers again: taking tenants again");
                self.broker_down = None;
                self.say_broker_down(false);
            }
            return Ok(());
        }
        let cut_for = seen.failing_since.map_or(Duration::ZERO, |t| t.elapsed());
        if running == 0 || cut_for < half {
            return Ok(());
        }
        let me = self.settings.replica_id.clone();
        let session = self.session.as_mut().expect("connected");
        if !replicas::others_consume(session, &me)? {
            return Ok(());
        }
        warn!(
            "the broker has not answered this replica for {cut_for:?} while it answers others: \
             giving {running} tenants to other replicas until it does"
        );
        self.broker_down = Some(Instant::now());
        self.say_broker_down(true);
        Ok(())
    }

    /// Has the heart say it with its next heartbeat, which announces the change: the plans
    /// (this replica's too) are made again then.
    fn say_broker_down(&mut self, down: bool) {
        if let Some(heart) = &self.heart {
            heart.set_broker_down(down);
        }
    }
}
