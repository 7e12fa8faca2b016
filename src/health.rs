//! How this replica is doing, as its coordinator and heart keep it: whether its session works,
//! whether it took its share, how long since it last heartbeated and since each loop came
//! round. Written by the coordinator's threads; read by readiness, the fence, the consumers'
//! drains and the watchdog, which sit on both sides of the coordinator.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What readiness and the fence need to know of the coordinator.
pub struct Health {
    /// Why the replica's session is down, while it is.
    db_error: Mutex<Option<String>>,
    /// Whether the first plan has been carried out.
    settled: Mutex<bool>,
    /// When the last heartbeat that succeeded was sent (a little before it was recorded).
    heartbeat: Mutex<Instant>,
    /// When the coordinator's loop last came round (it does at least every tick).
    progress: Mutex<Instant>,
    /// When the heart's loop last came round (every heartbeat interval, a beat or an attempt
    /// to join again done; a beat to a silent server ends within F/2).
    heart: Mutex<Instant>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            db_error: Mutex::new(None),
            settled: Mutex::new(false),
            heartbeat: Mutex::new(Instant::now()),
            progress: Mutex::new(Instant::now()),
            heart: Mutex::new(Instant::now()),
        }
    }
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

    /// How long this replica has been silent or stuck: since its last heartbeat that
    /// succeeded, or since its coordinator's loop last came round (a wedged coordinator, whose
    /// heart still beats on its own thread, is a stuck replica too).
    pub fn since_heartbeat(&self) -> Duration {
        self.heartbeat_age().max(self.progress.lock().elapsed())
    }

    /// How long ago the last heartbeat that succeeded was sent.
    pub fn heartbeat_age(&self) -> Duration {
        self.heartbeat.lock().elapsed()
    }

    /// How long since the coordinator's loop, and the heart's, last came round.
    pub fn turned(&self) -> (Duration, Duration) {
        (self.progress.lock().elapsed(), self.heart.lock().elapsed())
    }

    pub fn mark_heart(&self) {
        *self.heart.lock() = Instant::now();
    }

    pub fn mark_progress(&self) {
        *self.progress.lock() = Instant::now();
    }

    /// A heartbeat sent at `sent` was recorded.
    pub fn mark_beat(&self, sent: Instant) {
        *self.heartbeat.lock() = sent;
    }

    /// Why the replica's session is down (`None`: it is up again).
    pub fn set_db_error(&self, error: Option<String>) {
        *self.db_error.lock() = error;
    }

    /// Whether the first plan has been carried out.
    pub fn is_settled(&self) -> bool {
        *self.settled.lock()
    }

    /// Says the first plan is carried out; true the first time only.
    pub fn settle(&self) -> bool {
        !std::mem::replace(&mut *self.settled.lock(), true)
    }
}
