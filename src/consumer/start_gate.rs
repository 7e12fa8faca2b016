//! The start gate: tenant threads opening their broker sessions together (a start, a failover,
//! a broker back after a restart) begin consuming together, so no tenant's first message waits
//! for the backlogs the first ones already pull.
//!
//! Without it the first consumers' backlogs saturate the broker while the rest are still in
//! their AMQP handshakes, each a few round trips through a broker busy delivering: at 1,000
//! tenants with backlogs the last handshakes took 5–25 s (some timing out and backing off). A
//! thread counts as opening from before its connect until it is ready to consume (or its
//! attempt failed). One that is ready waits while others are opening and still getting ready,
//! one after another: it stops waiting when none is left opening, when none got ready for
//! the stall (those left are stuck: a broker address that does not answer, connects refused), or
//! after `MAX_WAIT`. A lone start (a tenant created over HTTP) finds nobody opening and consumes
//! at once; beside threads stuck opening, it waits the stall.
//!
//! Ready means every call to the broker but the consume is made: once the gate opens, each
//! consume makes its queue push a prefetch window, and any later call waits behind them all.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The longest a ready consumer waits for the others, however steadily they get ready: 1,000
/// consumers open in 1–4 s on a broker not yet delivering, on two cores.
pub const MAX_WAIT: Duration = Duration::from_secs(8);

/// Once no other thread got ready for this long, those still opening are taken to be stuck and
/// a ready thread waits for them no more. Sessions getting ready together complete every few
/// milliseconds; a connect that is not answered takes `CONNECT_TIMEOUT_MS` to fail.
pub const STALL: Duration = Duration::from_secs(1);

pub struct StartGate {
    state: Mutex<State>,
    none_opening: Condvar,
    stall: Duration,
}

struct State {
    /// Threads opening a session now.
    opening: usize,
    /// When a thread last got ready to consume.
    last_ready: Instant,
}

impl Default for StartGate {
    fn default() -> StartGate {
        StartGate::new(STALL)
    }
}

/// One thread's opening, counted until it is ready or dropped.
pub struct Opening<'a> {
    gate: &'a StartGate,
    counted: bool,
    since: Instant,
}

impl StartGate {
    fn new(stall: Duration) -> StartGate {
        StartGate {
            state: Mutex::new(State {
                opening: 0,
                last_ready: Instant::now(),
            }),
            none_opening: Condvar::new(),
            stall,
        }
    }

    /// Counts the calling thread as opening a session.
    pub fn opening(&self) -> Opening<'_> {
        self.state.lock().opening += 1;
        Opening {
            gate: self,
            counted: true,
            since: Instant::now(),
        }
    }

    /// One thread is no longer opening: it is ready to consume, or its attempt failed.
    fn leave(&self, ready: bool) {
        let mut state = self.state.lock();
        state.opening -= 1;
        if ready {
            state.last_ready = Instant::now();
        }
        if state.opening == 0 {
            self.none_opening.notify_all();
        }
    }
}

impl Opening<'_> {
    /// The thread is ready to consume: waits while others are opening and getting ready (see
    /// the module's notes), at most `max_wait`. Only the first call waits; later ones (a new
    /// channel after a resize) pass.
    pub fn ready(&mut self, max_wait: Duration) {
        if !std::mem::take(&mut self.counted) {
            return;
        }
        self.gate.leave(true);
        let now = Instant::now();
        log::debug!("session opened in {:?}", now - self.since);
        let deadline = now + max_wait;
        let mut state = self.gate.state.lock();
        while state.opening > 0 {
            // Woken when none is left opening, or when the others would have stalled: then
            // whether one got ready meanwhile decides.
            let until = deadline.min(state.last_ready + self.gate.stall);
            if Instant::now() >= until {
                return;
            }
            self.gate.none_opening.wait_until(&mut state, until);
        }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.gate.leave(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_thread_passes_at_once() {
        let gate = StartGate::default();
        let started = Instant::now();
        gate.opening().ready(Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_ready_thread_waits_until_the_others_are_ready_or_failed() {
        let gate = StartGate::default();
        let (mut first, second, mut third) = (gate.opening(), gate.opening(), gate.opening());
        std::thread::scope(|s| {
            let waiting = s.spawn(move || {
                first.ready(Duration::from_secs(30));
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiting.is_finished(), "passed while two were opening");
            drop(second); // its connect failed
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiting.is_finished(), "passed while one was opening");
            let released = Instant::now();
            third.ready(Duration::from_secs(30));
            assert!(waiting.join().unwrap() >= released);
        });
    }

    #[test]
    fn a_ready_thread_waits_no_longer_than_its_bound() {
        let gate = StartGate::default();
        let _stuck = gate.opening();
        let started = Instant::now();
        gate.opening().ready(Duration::from_millis(100));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn a_ready_thread_waits_while_the_others_keep_getting_ready() {
        let gate = StartGate::new(Duration::from_millis(500));
        let mut waiting = gate.opening();
        let mut others: Vec<Opening> = (0..8).map(|_| gate.opening()).collect();
        std::thread::scope(|s| {
            let waiter = s.spawn(move || {
                waiting.ready(Duration::from_secs(30));
                Instant::now()
            });
            // One more gets ready every 100 ms: 800 ms in all, longer than the stall.
            let mut last = Instant::now();
            while let Some(mut next) = others.pop() {
                std::thread::sleep(Duration::from_millis(100));
                assert!(!waiter.is_finished(), "passed while the others got ready");
                last = Instant::now();
                next.ready(Duration::ZERO);
            }
            assert!(waiter.join().unwrap() >= last);
        });
    }

    #[test]
    fn a_ready_thread_stops_waiting_once_the_others_stall() {
        let gate = StartGate::new(Duration::from_millis(300));
        let _stuck = gate.opening();
        let started = Instant::now();
        gate.opening().ready(Duration::from_secs(30));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn only_the_first_ready_waits() {
        // A stall longer than the assertions: only the second call's own behaviour can pass it.
        let gate = StartGate::new(Duration::from_secs(30));
        let _stuck = gate.opening();
        let mut opening = gate.opening();
        opening.ready(Duration::from_millis(10));
        let started = Instant::now();
        opening.ready(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_bound_ends_the_wait_before_the_stall() {
        // `max_wait` is what keeps a held thread within the fence: it must end the wait on its
        // own, not the stall.
        let gate = StartGate::new(Duration::from_secs(30));
        let _stuck = gate.opening();
        let started = Instant::now();
        gate.opening().ready(Duration::from_millis(100));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    #[test]
    fn a_failed_attempt_is_not_progress() {
        // One stuck, another failing every 50 ms for 2 s: the waiter leaves after the stall.
        let gate = StartGate::new(Duration::from_millis(300));
        let _stuck = gate.opening();
        let mut waiting = gate.opening();
        std::thread::scope(|s| {
            let started = Instant::now();
            let waiter = s.spawn(move || {
                waiting.ready(Duration::from_secs(30));
                started.elapsed()
            });
            while started.elapsed() < Duration::from_secs(2) {
                drop(gate.opening()); // a connect refused
                std::thread::sleep(Duration::from_millis(50));
            }
            let waited = waiter.join().unwrap();
            assert!(waited < Duration::from_millis(1500), "{waited:?}");
        });
    }

    #[test]
    fn the_last_opening_failing_releases_the_waiter_at_once() {
        let gate = StartGate::new(Duration::from_secs(30));
        let (mut waiting, other) = (gate.opening(), gate.opening());
        std::thread::scope(|s| {
            let waiter = s.spawn(move || {
                waiting.ready(Duration::from_secs(30));
                Instant::now()
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!waiter.is_finished(), "passed while one was opening");
            let failed = Instant::now();
            drop(other);
            let left = waiter.join().unwrap();
            assert!(
                left - failed < Duration::from_secs(1),
                "{:?}",
                left - failed
            );
        });
    }
}
