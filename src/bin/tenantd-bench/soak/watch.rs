//! Who consumes each tenant's queue, sampled every ~150 ms straight from the private servers:
//! the `tenants` table says which tenants should be consumed, a passive declare of each queue
//! how many consumers it has. Keeps every span in which an active tenant's queue had no
//! consumer, or two. While a server cannot be read the last answer stands; while the broker
//! cannot be read nothing is sampled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amiquip::{Channel, Connection};
use parking_lot::Mutex;
use postgres::{Client, NoTls};
use uuid::Uuid;

const EVERY: Duration = Duration::from_millis(150);

/// A span of time in which one tenant's queue had no consumer (or two).
#[derive(Clone, Copy)]
pub struct Span {
    pub start: Instant,
    pub end: Instant,
}

#[derive(Default)]
struct Track {
    zero_since: Option<Instant>,
    two_since: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    tracks: HashMap<Uuid, Track>,
    gaps: Vec<Span>,
    doubles: Vec<Span>,
    last_sample: Option<Instant>,
    samples: u64,
}

#[derive(Default)]
pub struct Watch {
    inner: Mutex<Inner>,
}

/// Every span seen, once the watch has ended.
pub struct Seen {
    pub gaps: Vec<Span>,
    pub doubles: Vec<Span>,
    pub samples: u64,
}

impl Watch {
    /// Samples until `stop`.
    pub fn run(&self, pg_url: &str, amqp_url: &str, stop: &AtomicBool) {
        let mut pg: Option<Client> = None;
        let mut broker: Option<(Connection, Channel)> = None;
        let mut statuses: HashMap<Uuid, bool> = HashMap::new();
        while !stop.load(Ordering::SeqCst) {
            let round = Instant::now();
            if let Some(read) = read_statuses(&mut pg, pg_url) {
                statuses = read;
            }
            if let Some(counts) = count_consumers(&mut broker, amqp_url, &statuses) {
                self.update(Instant::now(), &statuses, &counts);
            }
            std::thread::sleep(EVERY.saturating_sub(round.elapsed()));
        }
        if let Some((connection, _)) = broker {
            let _ = connection.close();
        }
    }

    fn update(&self, now: Instant, active: &HashMap<Uuid, bool>, counts: &HashMap<Uuid, u32>) {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        for (tenant, &is_active) in active {
            let Some(&count) = counts.get(tenant) else {
                continue; // no queue (yet, or any more)
            };
            let track = inner.tracks.entry(*tenant).or_default();
            let none = is_active && count == 0;
            step(&mut track.zero_since, none, now, &mut inner.gaps);
            step(&mut track.two_since, count >= 2, now, &mut inner.doubles);
        }
        for (tenant, track) in &mut inner.tracks {
            if !active.contains_key(tenant) {
                step(&mut track.zero_since, false, now, &mut inner.gaps);
                step(&mut track.two_since, false, now, &mut inner.doubles);
            }
        }
        inner.last_sample = Some(now);
        inner.samples += 1;
    }

    /// Open spans without a consumer that began at or after `since`: how many, and the
    /// longest, counted from `since` or from `from` when later.
    pub fn open_gaps(&self, since: Instant, from: Instant) -> (usize, Duration) {
        let inner = self.inner.lock();
        let now = Instant::now();
        let open: Vec<Instant> = inner
            .tracks
            .values()
            .filter_map(|t| t.zero_since)
            .filter(|&s| s >= since)
            .collect();
        let longest = open
            .iter()
            .map(|&s| now.saturating_duration_since(s.max(from)))
            .max()
            .unwrap_or_default();
        (open.len(), longest)
    }

    /// Whether a sample was taken after `t`.
    pub fn sampled_after(&self, t: Instant) -> bool {
        self.inner.lock().last_sample.is_some_and(|s| s > t)
    }

    /// Every tenant that should be consumed is, by a sample taken after `t`.
    pub fn all_consumed_after(&self, t: Instant) -> bool {
        let inner = self.inner.lock();
        let open = inner.tracks.values().any(|t| t.zero_since.is_some());
        inner.last_sample.is_some_and(|s| s > t) && !open
    }

    /// Ends every open span now and hands over all of them.
    pub fn finish(&self) -> Seen {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        for track in inner.tracks.values_mut() {
            step(&mut track.zero_since, false, now, &mut inner.gaps);
            step(&mut track.two_since, false, now, &mut inner.doubles);
        }
        Seen {
            gaps: std::mem::take(&mut inner.gaps),
            doubles: std::mem::take(&mut inner.doubles),
            samples: inner.samples,
        }
    }
}

/// Opens a span when `on` starts, closes it into `done` when `on` ends.
fn step(since: &mut Option<Instant>, on: bool, now: Instant, done: &mut Vec<Span>) {
    match (*since, on) {
        (None, true) => *since = Some(now),
        (Some(start), false) => {
            done.push(Span { start, end: now });
            *since = None;
        }
        _ => {}
    }
}

/// Which tenants should be consumed (`status = 'active'`), or `None` when the database does
/// not answer.
fn read_statuses(pg: &mut Option<Client>, url: &str) -> Option<HashMap<Uuid, bool>> {
    if pg.is_none() {
        let mut config: postgres::Config = url.parse().ok()?;
        config.connect_timeout(Duration::from_secs(1));
        *pg = config.connect(NoTls).ok();
    }
    let rows = pg
        .as_mut()?
        .query("SELECT id, status = 'active' FROM tenants", &[]);
    match rows {
        Ok(rows) => Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect()),
        Err(_) => {
            *pg = None;
            None
        }
    }
}

/// Consumers on each tenant's queue (a missing queue has no entry), or `None` when the broker
/// does not answer.
fn count_consumers(
    broker: &mut Option<(Connection, Channel)>,
    url: &str,
    tenants: &HashMap<Uuid, bool>,
) -> Option<HashMap<Uuid, u32>> {
    if broker.is_none() {
        *broker = open(url);
    }
    let mut counts = HashMap::new();
    for tenant in tenants.keys() {
        let (connection, channel) = broker.as_mut()?;
        match channel.queue_declare_passive(format!("tenant_{tenant}_queue")) {
            Ok(queue) => {
                counts.insert(*tenant, queue.declared_consumer_count().unwrap_or(0));
            }
            // The queue is missing (its channel is closed by the broker), or the connection
            // is gone: a new channel tells which.
            Err(_) => match connection.open_channel(None) {
                Ok(fresh) => *channel = fresh,
                Err(_) => {
                    *broker = None;
                    return None;
                }
            },
        }
    }
    Some(counts)
}

fn open(url: &str) -> Option<(Connection, Channel)> {
    let addr = tenantd::BrokerAddr::parse(url).ok()?;
    let mut connection =
        tenantd::connect_broker(&addr, Duration::from_secs(2), "soak watch").ok()?;
    let channel = connection.open_channel(None).ok()?;
    Some((connection, channel))
}
