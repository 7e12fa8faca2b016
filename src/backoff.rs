//! Capped exponential backoff with jitter, for reconnects and for retrying a batch.

use std::time::Duration;

/// Capped exponential backoff with jitter, so a thousand tenants do not reconnect in step.
pub struct Backoff {
    first: Duration,
    cap: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            current: first,
        }
    }

    pub fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.cap);
        // Uniform in [base/2, base]: a thousand tenants losing the broker together spread their
        // reconnects over the interval.
        base / 2 + base.mul_f64(fastrand::f64() / 2.0)
    }

    pub fn reset(&mut self) {
        self.current = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_below_each_step() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let steps: Vec<Duration> = (0..5).map(|_| b.next()).collect();
        let bases = [100, 200, 400, 400, 400];
        for (step, base) in steps.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(*step >= base / 2 && *step <= base, "{step:?} vs {base:?}");
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let delays: std::collections::HashSet<Duration> = (0..100)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next())
            .collect();
        assert!(delays.len() > 90, "{} distinct delays of 100", delays.len());
    }
}
