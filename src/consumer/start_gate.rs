//! The start gate: tenant threads opening their broker sessions together (a start, a failover,
//! a broker back after a restart) begin consuming together, so no tenant's first message waits
//! for the backlogs the first ones already pull.
//!
//! Without it the first consumers' backlogs saturate the broker while the rest are still in
//! their AMQP handshakes, each a few round trips through a broker busy delivering: at 1,000
//! tenants with backlogs the last handshakes took 5–25 s (some timing out and backing off). A
//! thread counts as opening from before its connect until it is ready to consume (or its
//! attempt failed); one that is ready waits while others are opening, at most `MAX_WAIT`. A lone
//! start (a tenant created over HTTP) finds nobody opening and consumes at once.

use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// The longest a ready consumer waits for the others: 1,000 consumers open in about a second
/// on an idle broker, and a thread stuck connecting (a broker that does not answer) holds the
/// others back no longer than this.
pub const MAX_WAIT: Duration = Duration::from_secs(3);

#[derive(Default)]
pub struct StartGate {
    opening: Mutex<usize>,
    none_opening: Condvar,
}

/// One thread's opening, counted until it is ready or dropped.
pub struct Opening<'a> {
    gate: &'a StartGate,
    counted: bool,
    since: Instant,
}

impl StartGate {
    /// Counts the calling thread as opening a session.
    pub fn opening(&self) -> Opening<'_> {
        *self.opening.lock() += 1;
        Opening {
            gate: self,
            counted: true,
            since: Instant::now(),
        }
    }

    fn leave(&self) {
        let mut opening = self.opening.lock();
        *opening -= 1;
        if *opening == 0 {
            self.none_opening.notify_all();
        }
    }
}

impl Opening<'_> {
    /// The thread is ready to consume: waits until no other thread is opening, or `max_wait`.
    /// Only the first call waits; later ones (a new channel after a resize) pass.
    pub fn ready(&mut self, max_wait: Duration) {
        if !std::mem::take(&mut self.counted) {
            return;
        }
        self.gate.leave();
        let now = Instant::now();
        log::debug!("session opened in {:?}", now - self.since);
        let deadline = now + max_wait;
        let mut opening = self.gate.opening.lock();
        while *opening > 0 {
            if self
                .gate
                .none_opening
                .wait_until(&mut opening, deadline)
                .timed_out()
            {
                return;
            }
        }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.gate.leave();
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
    fn only_the_first_ready_waits() {
        let gate = StartGate::default();
        let _stuck = gate.opening();
        let mut opening = gate.opening();
        opening.ready(Duration::from_millis(10));
        let started = Instant::now();
        opening.ready(Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
