//! The nemesis: one fault at a time, each kind in turn — a replica SIGKILLed during a burst
//! (and started again), SIGSTOPped (and continued), cut from PostgreSQL only, cut from the broker only; the
//! broker restarted; PostgreSQL restarted. A fault on a replica lasts until its tenants are all
//! consumed again (but at least long enough for the fault to be felt), or until one has gone
//! longer than the goal without a consumer: the verdict is in either way.

use std::time::{Duration, Instant};

use super::fleet::{Fleet, NAMES};
use super::servers::Servers;
use super::traffic::Burst;
use super::watch::Watch;
use super::Settings;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Kill,
    Stop,
    DbCut,
    BrokerCut,
    BrokerRestart,
    DbRestart,
}

pub const KINDS: [Kind; 6] = [
    Kind::Kill,
    Kind::Stop,
    Kind::DbCut,
    Kind::BrokerCut,
    Kind::BrokerRestart,
    Kind::DbRestart,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Stop => "stop",
            Kind::DbCut => "db-cut",
            Kind::BrokerCut => "broker-cut",
            Kind::BrokerRestart => "broker-restart",
            Kind::DbRestart => "db-restart",
        }
    }

    /// The summary's keys for this kind: longest time without a consumer, with two.
    pub fn keys(self) -> (&'static str, &'static str) {
        match self {
            Kind::Kill => ("no_consumer_max_s_kill", "two_consumers_max_s_kill"),
            Kind::Stop => ("no_consumer_max_s_stop", "two_consumers_max_s_stop"),
            Kind::DbCut => ("no_consumer_max_s_db_cut", "two_consumers_max_s_db_cut"),
            Kind::BrokerCut => (
                "no_consumer_max_s_broker_cut",
                "two_consumers_max_s_broker_cut",
            ),
            Kind::BrokerRestart => (
                "no_consumer_max_s_broker_restart",
                "two_consumers_max_s_broker_restart",
            ),
            Kind::DbRestart => (
                "no_consumer_max_s_db_restart",
                "two_consumers_max_s_db_restart",
            ),
        }
    }

    /// The fault takes a whole server away: nobody can consume until it is back, so the time
    /// without a consumer counts from its return.
    pub fn whole_server(self) -> bool {
        matches!(self, Kind::BrokerRestart | Kind::DbRestart)
    }
}

/// One fault as it happened.
pub struct Fault {
    pub kind: Kind,
    pub replica: Option<&'static str>,
    /// Tenants running on that replica when the fault began.
    pub replica_tenants: Option<i64>,
    pub start: Instant,
    /// When the blow landed: the SIGKILL (after the burst it waits for), else the start.
    pub struck: Instant,
    /// When it was healed: the replica continued, restarted or reconnected, the server back.
    pub healed: Instant,
    /// When the next fault could start: everything consumed again (or given up on), and a calm
    /// half second after it.
    pub end: Instant,
}

pub struct Nemesis<'a> {
    pub fleet: &'a Fleet,
    pub servers: &'a mut Servers,
    pub watch: &'a Watch,
    pub settings: &'a Settings,
    pub burst: &'a Burst,
    /// A session on the soak's database, for who runs what (reopened after a restart).
    pub pg: Option<postgres::Client>,
}

impl Nemesis<'_> {
    /// Every kind once, then more rounds while `settings.seconds` last.
    pub fn run(&mut self) -> Vec<Fault> {
        let began = Instant::now();
        let mut rng = fastrand::Rng::with_seed(self.settings.seed);
        let mut faults = Vec::new();
        for (n, &kind) in KINDS.iter().cycle().enumerate() {
            if n >= KINDS.len() && began.elapsed() >= self.settings.seconds {
                break;
            }
            let replica = (!kind.whole_server()).then(|| rng.usize(..NAMES.len()));
            let target = replica.map_or("", |i| NAMES[i]);
            eprintln!(
                "  {:>6.1} s  fault {}: {} {target}",
                began.elapsed().as_secs_f64(),
                n + 1,
                kind.name()
            );
            faults.push(self.inject(kind, replica));
        }
        faults
    }

    fn inject(&mut self, kind: Kind, replica: Option<usize>) -> Fault {
        let replica_tenants = replica.and_then(|i| Some(self.loads()?[i]));
        let start = Instant::now();
        let mut struck = start;
        let i = replica.unwrap_or(0);
        match kind {
            Kind::Kill => {
                self.kill_during_a_burst(i);
                struck = Instant::now();
                self.hold(kind, start);
                self.fleet.restart(i);
            }
            Kind::Stop => {
                self.fleet.freeze(i);
                self.hold(kind, start);
                self.fleet.thaw(i);
            }
            Kind::DbCut | Kind::BrokerCut => {
                match kind {
                    Kind::DbCut => self.fleet.cut_db(i),
                    _ => self.fleet.cut_broker(i),
                }
                self.hold(kind, start);
                self.fleet.restore(i);
            }
            Kind::BrokerRestart => {
                self.servers.stop_broker();
                self.servers.start_broker();
            }
            Kind::DbRestart => {
                self.servers.stop_pg();
                self.servers.start_pg();
            }
        }
        let healed = Instant::now();
        if kind.whole_server() {
            self.verdict(start, healed, healed + Duration::from_secs(1));
        }
        self.settle(healed);
        self.settings.sleep(Duration::from_millis(500)); // calm between two faults
        Fault {
            kind,
            replica: replica.map(|i| NAMES[i]),
            replica_tenants,
            start,
            struck,
            healed,
            end: Instant::now(),
        }
    }

    /// A SIGKILL while the replicas ingest a backlog (200 messages a tenant): many batches in
    /// flight, poison messages among them between their copy's confirm and their own ack.
    fn kill_during_a_burst(&self, i: usize) {
        self.burst.ask(200 * self.settings.tenants as u64);
        let asked = Instant::now();
        while self.burst.pending() && asked.elapsed() < Duration::from_secs(5) {
            self.settings.sleep(Duration::from_millis(5)); // the publisher takes it at once
        }
        self.fleet.kill(i);
    }

    /// Holds a replica's fault until the verdict, and at least until it must have been felt:
    /// a kill or a cut broker path at once; a stopped replica once the broker has missed its
    /// heartbeats; a cut database path once the replica's fence has stopped its consumers
    /// (F/2) and the others could claim them (a second later).
    fn hold(&self, kind: Kind, start: Instant) {
        let felt = match kind {
            Kind::Stop => self.settings.heartbeat * 3,
            Kind::DbCut => self.settings.failover / 2 + Duration::from_secs(1),
            _ => Duration::ZERO,
        };
        self.verdict(start, start, start + felt + Duration::from_secs(2));
    }

    /// Waits until every tenant left without a consumer since `since` has one again (judged
    /// no earlier than `earliest`), or until one has gone longer than the goal without (counted
    /// from `from`), or 90 s.
    fn verdict(&self, since: Instant, from: Instant, earliest: Instant) {
        let past_goal = self.settings.goal() + Duration::from_millis(500);
        loop {
            let now = Instant::now();
            let (open, longest) = self.watch.open_gaps(since, from);
            let recovered = now >= earliest && open == 0 && self.watch.sampled_after(earliest);
            if recovered || longest > past_goal || now > since + Duration::from_secs(90) {
                return;
            }
            self.settings.sleep(Duration::from_millis(100)); // a poll of the watch
        }
    }

    /// After the fault is healed: until every tenant is consumed again and the replicas share
    /// them evenly again (so that the next fault meets a replica with its share), or 30 s.
    fn settle(&mut self, healed: Instant) {
        let deadline = healed + Duration::from_secs(30);
        let judged = healed + Duration::from_millis(500);
        while Instant::now() < deadline && !self.watch.all_consumed_after(judged) {
            self.settings.sleep(Duration::from_millis(100)); // a poll of the watch
        }
        while Instant::now() < deadline && !self.loads().is_some_and(balanced) {
            self.settings.sleep(Duration::from_millis(200)); // a poll of the claims
        }
    }

    /// Tenants running on each replica, by the claims in the database.
    fn loads(&mut self) -> Option<[i64; 3]> {
        if self.pg.is_none() {
            self.pg = postgres::Client::connect(&self.fleet.pg_url(), postgres::NoTls).ok();
        }
        let sql = "SELECT replica_id, count(*) FROM consumers
                   WHERE state = 'running' GROUP BY replica_id";
        let Ok(rows) = self.pg.as_mut()?.query(sql, &[]) else {
            self.pg = None;
            return None;
        };
        let mut loads = [0; 3];
        for row in rows {
            let replica: Option<String> = row.get(0);
            if let Some(i) = NAMES.iter().position(|n| Some(*n) == replica.as_deref()) {
                loads[i] = row.get(1);
            }
        }
        Some(loads)
    }
}

/// No replica runs more than two tenants beyond another.
fn balanced(loads: [i64; 3]) -> bool {
    let (min, max) = (loads.iter().min(), loads.iter().max());
    max.zip(min).is_some_and(|(max, min)| max - min <= 2)
}
