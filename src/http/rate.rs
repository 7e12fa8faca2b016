//! Request rates: a token bucket per credential (the admin's, each tenant's, the metrics
//! token's) and, for requests without one (or with any credential on an open API), per client
//! address; so one caller cannot take every request thread from the others. Past its burst a
//! caller gets 429 with the seconds until its next request may come.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::guard::ClientKey;
use crate::ids::TenantId;

/// Whose bucket a request draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    Admin,
    Tenant(TenantId),
    Metrics,
    Address(ClientKey),
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bucket::Admin => f.write_str("the admin credential"),
            Bucket::Tenant(id) => write!(f, "tenant {id}'s token"),
            Bucket::Metrics => f.write_str("METRICS_TOKEN"),
            Bucket::Address(client) => write!(f, "address {client}"),
        }
    }
}

/// Buckets beyond this many are swept of the full ones (callers idle long enough to refill),
/// so addresses seen once do not accumulate.
const SWEEP_ABOVE: usize = 4096;

pub struct RateLimiter {
    /// Tokens a second; 0: no limit.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Bucket, Tokens>>,
}

#[derive(Clone, Copy)]
struct Tokens {
    left: f64,
    at: Instant,
}

impl RateLimiter {
    pub fn new(per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(per_sec),
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `bucket`, or says how long until one is there.
    pub fn take(&self, bucket: Bucket) -> Result<(), Duration> {
        self.take_at(bucket, Instant::now())
    }

    fn take_at(&self, bucket: Bucket, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() > SWEEP_ABOVE {
            buckets.retain(|_, t| self.refilled(*t, now) < self.burst);
        }
        let full = Tokens {
            left: self.burst,
            at: now,
        };
        let tokens = buckets.entry(bucket).or_insert(full);
        let left = self.refilled(*tokens, now);
        if left < 1.0 {
            return Err(Duration::from_secs_f64((1.0 - left) / self.rate));
        }
        *tokens = Tokens {
            left: left - 1.0,
            at: now,
        };
        Ok(())
    }

    fn refilled(&self, tokens: Tokens, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(tokens.at).as_secs_f64();
        (tokens.left + elapsed * self.rate).min(self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate_and_others_are_untouched() {
        let limiter = RateLimiter::new(10, 3);
        let start = Instant::now();
        let a = Bucket::Admin;
        for _ in 0..3 {
            assert!(limiter.take_at(a, start).is_ok());
        }
        let wait = limiter.take_at(a, start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(limiter.take_at(Bucket::Metrics, start).is_ok(), "another's");
        let later = start + Duration::from_millis(100);
        assert!(limiter.take_at(a, later).is_ok());
        assert!(limiter.take_at(a, later).is_err());
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(
                limiter.take_at(a, much_later).is_ok(),
                "no more than the burst"
            );
        }
        assert!(limiter.take_at(a, much_later).is_err());
    }

    #[test]
    fn no_rate_is_no_limit_and_idle_buckets_are_swept() {
        let unlimited = RateLimiter::new(0, 1);
        for _ in 0..100 {
            assert!(unlimited.take(Bucket::Admin).is_ok());
        }
        let limiter = RateLimiter::new(1000, 2);
        let start = Instant::now();
        for i in 0..=SWEEP_ABOVE as u32 {
            let ip = std::net::IpAddr::from(i.to_be_bytes());
            let _ = limiter.take_at(Bucket::Address(ClientKey::of(ip)), start);
        }
        let _ = limiter.take_at(Bucket::Admin, start + Duration::from_secs(1));
        assert_eq!(limiter.buckets.lock().len(), 1);
    }
}
