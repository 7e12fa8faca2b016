//! Many consumers starting at once (a replica starting on a thousand tenants with backlogs, a
//! broker failing over): the first to consume would flood the pool and the CPU with their
//! backlogs while the others still handshake, and the last would start tens of seconds after
//! the first. So at most `MAX_OPENING` consumers open their connection and channel at once, and
//! one ready to consume while many others start waits, for at most `HOLD`, until none of
//! those starting with it is still opening: they then consume together, and the pool serves them in turn. Both waits are
//! bounded, so a broker that does not answer, or a stop, is not held up for long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Connections and channels being opened at once.
const MAX_OPENING: usize = 64;
/// A ready consumer waits only when at least this many others are still starting: a few
/// cannot flood anything, and a failover or a reconnect of a few tenants is not slowed at all.
const HOLD_FROM: usize = 32;
/// The longest a ready consumer waits for the others: one that cannot connect does not hold
/// the others back for long.
const HOLD: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct StartGate {
    state: Mutex<Starting>,
    changed: Condvar,
}

#[derive(Default)]
struct Starting {
    /// Announced, waiting for a place to open.
    queued: usize,
    /// Opening their connection and channel.
    opening: usize,
}

impl StartGate {
    /// Counts a consumer about to start (before its thread runs, so that those already ready
    /// wait for it too).
    pub fn announce(self: &Arc<Self>) -> Announced {
        self.state.lock().queued += 1;
        Announced {
            gate: Some(self.clone()),
        }
    }
}

/// A consumer counted as starting that has not begun to open.
pub struct Announced {
    gate: Option<Arc<StartGate>>,
}

impl Announced {
    /// Waits for a place among those opening and takes it; after `HOLD` takes one anyway, so
    /// connects that hang (a broker not answering) delay the others by seconds, not minutes.
    pub fn open(mut self) -> Opening {
        let gate = self.gate.take().expect("announced once");
        {
            let deadline = Instant::now() + HOLD;
            let mut state = gate.state.lock();
            while state.opening >= MAX_OPENING {
                if gate.changed.wait_until(&mut state, deadline).timed_out() {
                    break;
                }
            }
            state.queued -= 1;
            state.opening += 1;
        }
        Opening { gate: Some(gate) }
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.state.lock().queued -= 1;
            gate.changed.notify_all();
        }
    }
}

/// A consumer opening its connection and channel. Dropped without `ready` (the open failed),
/// it gives its place up.
pub struct Opening {
    gate: Option<Arc<StartGate>>,
}

impl Opening {
    /// Opened: gives the place up; when many others are starting, waits until none of them is
    /// opening or waiting to open, or `HOLD` passed.
    pub fn ready(mut self) {
        let Some(gate) = self.gate.take() else {
            return;
        };
        let deadline = Instant::now() + HOLD;
        let mut state = gate.state.lock();
        state.opening -= 1;
        gate.changed.notify_all();
        if state.opening + state.queued < HOLD_FROM {
            return;
        }
        while state.opening + state.queued > 0 {
            if gate.changed.wait_until(&mut state, deadline).timed_out() {
                return;
            }
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.state.lock().opening -= 1;
            gate.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_consumer_waits_for_the_many_others_still_opening_but_not_for_ever() {
        let gate = Arc::new(StartGate::default());
        let first = gate.announce();
        let others: Vec<Announced> = (0..HOLD_FROM).map(|_| gate.announce()).collect();
        let first = first.open();
        let started = Instant::now();
        let waiter = std::thread::spawn(move || {
            first.ready();
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(100));
        let others_ready = Instant::now();
        for other in others {
            other.open().ready();
        }
        let first_ran = waiter.join().expect("the first consumer");
        assert!(first_ran >= others_ready, "the first waited for the others");
        assert!(started.elapsed() < HOLD);
    }

    #[test]
    fn a_few_consumers_starting_together_do_not_wait_for_each_other() {
        let gate = Arc::new(StartGate::default());
        let others: Vec<Announced> = (0..HOLD_FROM - 2).map(|_| gate.announce()).collect();
        let started = Instant::now();
        gate.announce().open().ready();
        assert!(started.elapsed() < Duration::from_millis(100));
        drop(others);
    }

    #[test]
    fn a_consumer_alone_consumes_at_once_and_a_failed_open_holds_nobody() {
        let gate = Arc::new(StartGate::default());
        drop(gate.announce().open());
        let started = Instant::now();
        gate.announce().open().ready();
        assert!(started.elapsed() < Duration::from_millis(100));
    }
}
