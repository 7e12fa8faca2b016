//! The heart: a thread with a session of its own that holds the replica's liveness lock and
//! heartbeats on a fixed schedule, so that nothing the coordinator waits on — a claim behind a
//! locked row, a burst of a thousand reports, a slow plan — delays a heartbeat, and a healthy
//! replica never fences itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::{info, warn};
use postgres::Client;

use super::{heartbeat_every, open_session, Settings};
use crate::backoff::Backoff;
use crate::health::Health;
use crate::manager::TenantManager;
use crate::store::replicas::{self, Beat};

pub struct Heart {
    /// Whether this replica cannot reach the broker (said with every heartbeat).
    pub broker_down: Arc<AtomicBool>,
    /// A message: heartbeat now. Dropped to stop the thread; its session ends with it, and the
    /// liveness lock.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct Beating {
    settings: Settings,
    health: Arc<Health>,
    manager: Arc<TenantManager>,
    broker_down: Arc<AtomicBool>,
    session: Option<Client>,
    reconnect: Backoff,
    next_connect: Instant,
}

impl Heart {
    /// Starts heartbeating on `session`, which has joined (and holds the liveness lock).
    pub fn start(
        settings: Settings,
        health: Arc<Health>,
        manager: Arc<TenantManager>,
        session: Client,
    ) -> Result<Heart> {
        let broker_down = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop) = bounded(1);
        let mut beating = Beating {
            settings,
            health,
            manager,
            broker_down: broker_down.clone(),
            session: Some(session),
            reconnect: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            next_connect: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("heart".into())
            .spawn(move || beating.run(&stop))
            .context("spawning the heart thread")?;
        Ok(Heart {
            broker_down,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Says it with a heartbeat at once (which announces the change).
    pub fn set_broker_down(&self, down: bool) {
        self.broker_down.store(down, Ordering::Relaxed);
        if let Some(stop) = &self.stop {
            let _ = stop.try_send(());
        }
    }
}

impl Drop for Heart {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Beating {
    fn run(&mut self, stop: &Receiver<()>) {
        let every = heartbeat_every(self.settings.failover_timeout);
        let mut next = Instant::now() + every;
        loop {
            match stop.recv_deadline(next) {
                // Asked for a beat now: the schedule stays.
                Ok(()) => {}
                // A fixed schedule: a slow beat does not push the next one back.
                Err(RecvTimeoutError::Timeout) => next = (next + every).max(Instant::now()),
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.session.is_none() {
                self.connect();
            } else if let Err(e) = self.beat() {
                warn!(
                    "replica {} cannot heartbeat: {e:#}",
                    self.settings.replica_id
                );
                self.session = None;
            }
            self.health.mark_heart();
        }
    }

    /// Records in `replicas.seen_at` that this replica answers, and tells the fence. The time
    /// the fence keeps is taken before the statement: never later than the database's.
    ///
    /// A replica whose last heartbeat is older than the fence's limit (its process was stopped,
    /// its machine frozen) has lost its tenants, or may have: it stops every consumer first,
    /// as the fence would, and only then heartbeats — it must not race the fence thread, which
    /// woke at the same moment, and look alive with its consumers still running.
    fn beat(&mut self) -> Result<()> {
        let silent = self.health.heartbeat_age();
        if silent >= self.settings.failover_timeout / 2 && self.manager.any_running() {
            warn!("no heartbeat for {silent:?}: stopping every consumer of this replica before it heartbeats again (others may have taken its tenants)");
            self.manager.stop_all(Instant::now());
        }
        let sent = Instant::now();
        let beat = Beat {
            failover: self.settings.failover_timeout,
            broker_down: self.broker_down.load(Ordering::Relaxed),
            max_tenants: self.settings.max_tenants,
        };
        let session = self.session.as_mut().expect("connected");
        replicas::heartbeat(session, &self.settings.replica_id, beat)?;
        self.health.mark_beat(sent);
        Ok(())
    }

    /// Joins again (with backoff) after the session was lost; the heartbeat is written by the
    /// join. The fence has stopped the consumers meanwhile if the loss lasted.
    fn connect(&mut self) {
        if Instant::now() < self.next_connect {
            return;
        }
        if self.manager.any_running()
            && self.health.heartbeat_age() >= self.settings.failover_timeout / 2
        {
            self.manager.stop_all(Instant::now());
        }
        let sent = Instant::now();
        // A replica cut from the broker says so again as it joins, or the plans hand it tenants
        // until its next heartbeat.
        match open_session(&self.settings, self.broker_down.load(Ordering::Relaxed)) {
            Ok(session) => {
                info!("replica {} heartbeats again", self.settings.replica_id);
                self.session = Some(session);
                self.health.mark_beat(sent);
                self.reconnect.reset();
            }
            Err(e) => {
                warn!(
                    "replica {} cannot join again: {e:#}",
                    self.settings.replica_id
                );
                self.next_connect = Instant::now() + self.reconnect.next();
            }
        }
    }
}
