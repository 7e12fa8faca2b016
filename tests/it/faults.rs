//! Faults that leave a replica half alive — stopped by a signal, cut from the broker but not
//! from PostgreSQL — must not strand its tenants: another replica runs them within the failover
//! timeout and a margin, nothing is lost or stored twice, and when the fault heals each queue
//! has one consumer again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::child::Tenantd;
use crate::support::proxy::Proxy;
use crate::support::{amqp_host_port, amqp_url_via, pg_host_port, pg_url_via};
use crate::support::{queue_name, rabbitmq_url, wait_until};
use crate::support::{Amqp, TestDb};

/// The failover timeout of these tests, and the goal: every tenant consumed again within F + 5 s.
const F: u64 = 6;
const GOAL: Duration = Duration::from_secs(F + 5);

/// Replicas of the real binary on one fresh database; the tenants they share.
struct Fleet {
    db: TestDb,
    replicas: HashMap<&'static str, Tenantd>,
    tenants: Vec<String>,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet {
            db: TestDb::create(),
            replicas: HashMap::new(),
            tenants: Vec::new(),
        }
    }

    fn start(&mut self, name: &'static str, broker_url: String) {
        self.start_with(name, &[("RABBITMQ_URL", broker_url)]);
    }

    /// Starts a replica with settings of its own (over the defaults here).
    fn start_with(&mut self, name: &'static str, extra: &[(&str, String)]) {
        let mut env = vec![
            ("DATABASE_URL", self.db.url()),
            ("RABBITMQ_URL", rabbitmq_url()),
            ("REPLICA_ID", name.to_string()),
            ("WORKER_POOL_SIZE", "2".to_string()),
            ("FAILOVER_TIMEOUT", F.to_string()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        self.replicas.insert(name, Tenantd::start(&env));
    }

    fn create(&mut self, via: &str, count: usize) {
        for i in 0..count {
            let body = json!({ "name": format!("fault-{i}") }).to_string();
            let reply = self.replicas[via].request("POST", "/api/tenants", Some(&body));
            assert_eq!(reply.status, 201, "{}", reply.text());
            let id = reply.json()["id"].as_str().unwrap().to_string();
            self.tenants.push(id);
        }
    }

    /// Tenant → the replica whose consumer of it is running (from the claims).
    fn running(&self) -> HashMap<String, String> {
        let mut pg = self.db.client();
        pg.query(
            "SELECT tenant_id::text, replica_id FROM consumers
             WHERE state = 'running' AND replica_id IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    }

    /// Waits until every tenant runs on one replica and each queue has one consumer.
    fn settled(&self, within: Duration) -> HashMap<String, String> {
        let mut amqp = Amqp::connect();
        let deadline = Instant::now() + within;
        loop {
            let owners = self.running();
            let consumers: Vec<u32> = self
                .tenants
                .iter()
                .map(|t| amqp.consumers(&queue_name(t)))
                .collect();
            if self.tenants.iter().all(|t| owners.contains_key(t))
                && consumers.iter().all(|&n| n == 1)
            {
                return owners;
            }
            assert!(
                Instant::now() < deadline,
                "not settled within {within:?}: running {owners:?}, consumers {consumers:?}, \
                 logs {:#?}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> Vec<String> {
        let mut logs: Vec<String> = Vec::new();
        for (name, r) in &self.replicas {
            let lines = r.lines();
            let tail = lines.len().saturating_sub(30);
            logs.extend(lines[tail..].iter().map(|l| format!("{name}: {l}")));
        }
        logs
    }

    /// Publishes `count` messages with ids to each tenant, confirmed; how many in all.
    fn publish(&self, amqp: &mut Amqp, round: &str, count: usize) -> i64 {
        for t in &self.tenants {
            for i in 0..count {
                let id = uuid::Uuid::new_v4().to_string();
                let body = json!({ "round": round, "i": i }).to_string();
                amqp.publish(&queue_name(t), body.as_bytes(), Some(&id));
            }
        }
        amqp.wait_confirms();
        (self.tenants.len() * count) as i64
    }

    fn stored(&self) -> i64 {
        let mut pg = self.db.client();
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for r in self.replicas.values() {
            r.signal("-CONT");
        }
        self.replicas.clear();
        let mut amqp = Amqp::connect();
        for tenant in &self.tenants {
            amqp.delete_tenant_queues(tenant);
        }
    }
}

/// A SIGSTOPped replica keeps its database session (its kernel still answers), and with it its
/// liveness lock: its heartbeat's age must still hand its tenants to the other replica, and
/// when it continues it must stop its consumers rather than consume beside their new owner.
#[test]
fn a_stopped_replica_loses_its_tenants_and_does_not_take_them_back_twice() {
    let mut fleet = Fleet::new();
    fleet.start("a", rabbitmq_url());
    fleet.start("b", rabbitmq_url());
    fleet.create("a", 6);
    let owners = fleet.settled(Duration::from_secs(30));
    let on_a = owners.values().filter(|r| *r == "a").count();
    assert!(on_a > 0, "a runs some tenants: {owners:?}");
    let mut amqp = Amqp::connect();
    let mut published = fleet.publish(&mut amqp, "before", 5);

    fleet.replicas["a"].signal("-STOP");
    let stopped = Instant::now();
    published += fleet.publish(&mut amqp, "during", 5);
    wait_until(GOAL, "b to run every tenant", || {
        let now = fleet.running();
        fleet
            .tenants
            .iter()
            .all(|t| now.get(t).is_some_and(|r| r == "b"))
    });
    let took = stopped.elapsed();
    published += fleet.publish(&mut amqp, "taken", 5);

    fleet.replicas["a"].signal("-CONT");
    published += fleet.publish(&mut amqp, "continued", 5);
    fleet.settled(Duration::from_secs(30));
    wait_until(Duration::from_secs(20), "every message stored", || {
        fleet.stored() >= published
    });
    assert_eq!(fleet.stored(), published, "each message stored once");
    eprintln!("a stopped replica's tenants ran elsewhere after {took:?}");
}

/// A stopped replica's consumers stay registered with the broker until the broker misses its
/// AMQP heartbeats; another replica takes its tenants about F after the stop. With the default
/// broker heartbeat (30 s: a connection is dropped after a minute or more) the stopped
/// consumers must still be gone before the takeover, or each queue has two consumers, and the
/// messages the broker hands the stopped one wait for it.
#[test]
fn a_stopped_replica_leaves_the_broker_before_its_tenants_are_taken() {
    let mut fleet = Fleet::new();
    fleet.start("a", rabbitmq_url());
    fleet.start("b", rabbitmq_url());
    fleet.create("a", 6);
    let owners = fleet.settled(Duration::from_secs(30));
    assert!(owners.values().any(|r| r == "a"), "a runs some: {owners:?}");

    fleet.replicas["a"].signal("-STOP");
    let mut amqp = Amqp::connect();
    let mut most = 0;
    let mut sample = |amqp: &mut Amqp| {
        for t in &fleet.tenants {
            most = most.max(amqp.consumers(&queue_name(t)));
        }
    };
    wait_until(GOAL, "b to run every tenant", || {
        sample(&mut amqp);
        let now = fleet.running();
        fleet
            .tenants
            .iter()
            .all(|t| now.get(t).is_some_and(|r| r == "b"))
    });
    let taken = Instant::now();
    while taken.elapsed() < Duration::from_secs(2) {
        sample(&mut amqp); // each round is a passive declare per queue
    }
    fleet.replicas["a"].signal("-CONT");
    assert_eq!(most, 1, "two consumers on a queue while a was stopped");
    fleet.settled(Duration::from_secs(30));
}

/// A replica cut from the broker (not from PostgreSQL) cannot run its tenants: while another
/// replica can, it must give them up within the bound (F/2 of failed probes after the cut, then
/// a hand-over), and take tenants again once the broker answers.
#[test]
fn a_replica_cut_from_the_broker_gives_its_tenants_to_one_that_is_not() {
    let mut fleet = Fleet::new();
    let broker = Proxy::start(&amqp_host_port());
    fleet.start("a", amqp_url_via(broker.port()));
    fleet.start("b", rabbitmq_url());
    fleet.create("b", 6);
    let owners = fleet.settled(Duration::from_secs(30));
    assert!(owners.values().any(|r| r == "a"), "a runs some: {owners:?}");
    let mut amqp = Amqp::connect();
    let mut published = fleet.publish(&mut amqp, "before", 5);

    broker.cut();
    let cut = Instant::now();
    published += fleet.publish(&mut amqp, "during", 5);
    wait_until(GOAL, "b to run every tenant", || {
        let now = fleet.running();
        fleet
            .tenants
            .iter()
            .all(|t| now.get(t).is_some_and(|r| r == "b"))
    });
    let took = cut.elapsed();

    broker.restore();
    let owners = fleet.settled(Duration::from_secs(30));
    wait_until(Duration::from_secs(30), "a to take its share again", || {
        fleet.running().values().filter(|r| *r == "a").count() == 3
    });
    wait_until(Duration::from_secs(20), "every message stored", || {
        fleet.stored() >= published
    });
    assert_eq!(fleet.stored(), published, "each message stored once");
    eprintln!("a cut replica's tenants ran elsewhere after {took:?}; then {owners:?}");
}

/// A replica cut from the broker whose peer runs no consumer (fewer tenants than replicas) has
/// no sign that the broker answers others: it must still give its tenants to a peer that could
/// try, not keep them unconsumed for as long as the cut lasts.
#[test]
fn a_replica_cut_from_the_broker_gives_its_tenant_to_an_idle_peer() {
    let mut fleet = Fleet::new();
    let broker = Proxy::start(&amqp_host_port());
    fleet.start("a", amqp_url_via(broker.port()));
    fleet.create("a", 1);
    fleet.settled(Duration::from_secs(30));
    fleet.start("b", rabbitmq_url());
    wait_until(Duration::from_secs(10), "b to be live", || {
        let mut pg = fleet.db.client();
        pg.query_one("SELECT count(*) FROM live_replicas WHERE id = 'b'", &[])
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    assert_eq!(
        fleet.running()[&fleet.tenants[0]],
        "a",
        "the tenant stays on a"
    );

    broker.cut();
    wait_until(GOAL, "b to run the tenant", || {
        fleet
            .running()
            .get(&fleet.tenants[0])
            .is_some_and(|r| r == "b")
    });
    broker.restore();
}

/// Replica `a` reaching the broker through a proxy the test can cut, `b` directly, 6 tenants
/// shared between them and settled; and a session to read `a`'s row.
fn a_behind_a_broker_proxy_and_b() -> (Fleet, Proxy, postgres::Client) {
    let mut fleet = Fleet::new();
    let broker = Proxy::start(&amqp_host_port());
    fleet.start("a", amqp_url_via(broker.port()));
    fleet.start("b", rabbitmq_url());
    fleet.create("b", 6);
    wait_until(Duration::from_secs(30), "a to run some", || {
        fleet.running().values().any(|r| r == "a")
    });
    fleet.settled(Duration::from_secs(30));
    let pg = fleet.db.client();
    (fleet, broker, pg)
}

/// Whether replica `a` says, with its heartbeats, that it cannot reach the broker.
fn says_down(pg: &mut postgres::Client) -> bool {
    pg.query_one("SELECT broker_down FROM replicas WHERE id = 'a'", &[])
        .unwrap()
        .get(0)
}

/// A replica that says `broker_down` and loses its heart's session must say it again when it
/// joins again: a join that says the broker answers hands it tenants it cannot run, and
/// takes them from the replica running them, until the next heartbeat says otherwise.
#[test]
fn a_replica_cut_from_the_broker_still_says_so_after_its_session_is_lost() {
    let (fleet, broker, mut pg) = a_behind_a_broker_proxy_and_b();

    broker.cut();
    wait_until(GOAL, "a to say broker_down", || says_down(&mut pg));
    let heart_pids = |pg: &mut postgres::Client| -> Vec<i32> {
        pg.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'tenantd replica a'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let old = heart_pids(&mut pg)[0];
    pg.execute("SELECT pg_terminate_backend($1)", &[&old])
        .unwrap();
    let watched = Instant::now();
    let mut rejoined = false;
    while watched.elapsed() < Duration::from_secs(8) {
        assert!(says_down(&mut pg), "a said the broker answers while cut");
        rejoined |= heart_pids(&mut pg).iter().any(|&p| p != old);
        if rejoined && watched.elapsed() > Duration::from_secs(4) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20)); // a poll of the row
    }
    assert!(rejoined, "a joined again: {:#?}", fleet.logs());
    broker.restore();
}

/// A broker path that flaps — answering a moment, then cut again — must not bounce a replica's
/// share back and forth: the replica takes tenants again only once its probes have answered for
/// F/2, as long as it took them to give the tenants up.
#[test]
fn a_replica_whose_broker_answers_a_moment_does_not_take_tenants_back() {
    // The fleet runs until the end of the test.
    let (_fleet, broker, mut pg) = a_behind_a_broker_proxy_and_b();
    broker.cut();
    wait_until(GOAL, "a to say broker_down", || says_down(&mut pg));

    // Answers for 1.5 s (three probes), less than F/2, then cut again.
    broker.restore();
    let restored = Instant::now();
    while restored.elapsed() < Duration::from_millis(1500) {
        assert!(
            says_down(&mut pg),
            "a took tenants again after a moment's answer"
        );
        std::thread::sleep(Duration::from_millis(20)); // a poll of the row
    }
    broker.cut();
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_secs(2) {
        assert!(
            says_down(&mut pg),
            "a took tenants again after a moment's answer"
        );
        std::thread::sleep(Duration::from_millis(20)); // a poll of the row
    }
    broker.restore();
    wait_until(Duration::from_secs(20), "a to take tenants again", || {
        !says_down(&mut pg)
    });
}

/// Replicas with different failover timeouts: a takeover waits the owner's (it fences at half
/// of its own), not the taker's. Here the owner (F = 12 s) loses PostgreSQL — its session ends,
/// and with it its lock — while its consumers run on until its fence, 6 s later: a taker with
/// F = 4 s must not start them before, or two consumers share a queue.
#[test]
fn a_takeover_waits_the_failover_timeout_of_the_owner() {
    let mut fleet = Fleet::new();
    let db = Proxy::start(&pg_host_port());
    let via = pg_url_via(db.port(), &fleet.db);
    fleet.start_with(
        "a",
        &[("DATABASE_URL", via), ("FAILOVER_TIMEOUT", "12".into())],
    );
    fleet.start_with("b", &[("FAILOVER_TIMEOUT", "4".into())]);
    fleet.create("b", 6);
    let owners = fleet.settled(Duration::from_secs(30));
    assert!(owners.values().any(|r| r == "a"), "a runs some: {owners:?}");

    db.cut();
    let cut = Instant::now();
    let mut amqp = Amqp::connect();
    let mut most = 0;
    // What is held here is the lower bound and one consumer a queue; the deadline only ends a
    // test that would never see b take over (a loaded machine has taken over 20 s).
    wait_until(Duration::from_secs(45), "b to run every tenant", || {
        for t in &fleet.tenants {
            most = most.max(amqp.consumers(&queue_name(t)));
        }
        let now = fleet.running();
        fleet
            .tenants
            .iter()
            .all(|t| now.get(t).is_some_and(|r| r == "b"))
    });
    let took = cut.elapsed();
    db.restore();
    assert_eq!(most, 1, "two consumers on a queue: b took before a fenced");
    assert!(
        took >= Duration::from_secs(6),
        "b took a's tenants after {took:?}, before a's fence (6 s)"
    );
}

/// A fleet starting together: the first replica up finds itself alone where others ran a
/// moment ago, and waits a little for them instead of taking every tenant and then shedding
/// half; each takes its share once, and no consumer is stopped.
#[test]
fn a_fleet_starting_together_does_not_pile_every_tenant_on_the_first_replica() {
    let mut fleet = Fleet::new();
    fleet.start("a", rabbitmq_url());
    fleet.start("b", rabbitmq_url());
    fleet.create("a", 10);
    fleet.settled(Duration::from_secs(30));
    for name in ["a", "b"] {
        let mut replica = fleet.replicas.remove(name).unwrap();
        replica.stop_cleanly("-TERM");
    }

    fleet.start("a", rabbitmq_url());
    fleet.start("b", rabbitmq_url());
    let owners = fleet.settled(Duration::from_secs(30));
    let on_a = owners.values().filter(|r| *r == "a").count();
    let a = fleet.replicas["a"].lines();
    let b = fleet.replicas["b"].lines();
    assert!(
        a.iter()
            .any(|l| l.contains("took its share: 2 live replicas")),
        "a planned alone: {a:#?}"
    );
    let stopped: Vec<&String> = a
        .iter()
        .chain(&b)
        .filter(|l| l.contains("consumer stopped"))
        .collect();
    assert!(stopped.is_empty(), "tenants moved at start: {stopped:#?}");
    assert_eq!(on_a, 5, "{owners:?}");
}

/// `MAX_TENANTS` caps what one replica runs; the others run the rest.
#[test]
fn a_replica_runs_no_more_tenants_than_its_cap() {
    let mut fleet = Fleet::new();
    fleet.start_with("a", &[("MAX_TENANTS", "2".into())]);
    fleet.start("b", rabbitmq_url());
    fleet.create("a", 8);
    let owners = fleet.settled(Duration::from_secs(30));
    let on_a = owners.values().filter(|r| *r == "a").count();
    assert_eq!(on_a, 2, "{owners:?}");
}
