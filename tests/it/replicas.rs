//! Several tenantd replicas on one database and broker, as child processes: they share the
//! tenants evenly, apply each other's changes, take over from one that dies or stops, and give
//! their share to one that joins, losing and doubling nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::child::Tenantd;
use crate::support::proxy::Proxy;
use crate::support::{
    pg_host_port, pg_url_via, queue_name, rabbitmq_url, wait_until, Amqp, TestDb,
};

/// Replicas sharing one database; each tenant they create is cleaned up from the broker.
struct Replicas {
    db: TestDb,
    running: HashMap<String, Tenantd>,
    tenants: Vec<String>,
}

impl Replicas {
    fn new() -> Replicas {
        Replicas {
            db: TestDb::create(),
            running: HashMap::new(),
            tenants: Vec::new(),
        }
    }

    fn start(&mut self, name: &str) {
        self.start_with(name, &[]);
    }

    /// Starts a replica with settings of its own (over the defaults here).
    fn start_with(&mut self, name: &str, extra: &[(&str, String)]) {
        let mut env = vec![
            ("DATABASE_URL", self.db.url()),
            ("RABBITMQ_URL", rabbitmq_url()),
            ("REPLICA_ID", name.to_string()),
            ("WORKER_POOL_SIZE", "2".to_string()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        self.running.insert(name.to_string(), Tenantd::start(&env));
    }

    /// Sampled for `during`: the most consumers seen at once on each tenant's queue.
    fn most_consumers(&self, during: Duration) -> HashMap<String, u32> {
        let mut amqp = Amqp::connect();
        let mut most: HashMap<String, u32> = HashMap::new();
        let end = Instant::now() + during;
        while Instant::now() < end {
            for t in &self.tenants {
                let n = amqp.consumers(&queue_name(t));
                let m = most.entry(t.clone()).or_default();
                *m = (*m).max(n);
            }
        }
        most
    }

    fn get(&self, name: &str) -> &Tenantd {
        &self.running[name]
    }

    fn create(&mut self, via: &str, count: usize) {
        for i in 0..count {
            let body = json!({ "name": format!("shared-{i}") }).to_string();
            let reply = self.get(via).request("POST", "/api/tenants", Some(&body));
            assert_eq!(reply.status, 201, "{}", reply.text());
            self.tenants
                .push(reply.json()["id"].as_str().unwrap().to_string());
        }
    }

    fn view(&self, via: &str, tenant: &str) -> Value {
        self.get(via)
            .request("GET", &format!("/api/tenants/{tenant}"), None)
            .json()
    }

    /// Replica → tenants whose consumer it runs, as `via` sees them; `None` while a tenant
    /// has no running consumer.
    fn owners(&self, via: &str) -> Option<HashMap<String, Vec<String>>> {
        let mut owners: HashMap<String, Vec<String>> = HashMap::new();
        for tenant in &self.tenants {
            let view = self.view(via, tenant);
            if view["status"] != "active" {
                continue;
            }
            if view["consumer"]["state"] != "running" {
                return None;
            }
            let replica = view["consumer"]["replica"].as_str()?.to_string();
            owners.entry(replica).or_default().push(tenant.clone());
        }
        Some(owners)
    }

    /// Waits until every active tenant runs on one of `live`, each running at most
    /// ⌈T/N⌉ + 1, each queue with exactly one consumer; returns the owners.
    fn settled(&self, via: &str, live: &[&str], within: Duration) -> HashMap<String, Vec<String>> {
        let mut amqp = Amqp::connect();
        let mut owners = HashMap::new();
        wait_until(within, "the tenants spread over the live replicas", || {
            let Some(now) = self.owners(via) else {
                return false;
            };
            let total: usize = now.values().map(Vec::len).sum();
            let cap = total.div_ceil(live.len()) + 1;
            let spread = now.keys().all(|r| live.contains(&r.as_str()))
                && now.values().all(|ts| ts.len() <= cap);
            let single = now
                .values()
                .flatten()
                .all(|t| amqp.consumers(&queue_name(t)) == 1);
            owners = now;
            spread && single
        });
        owners
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        // Stopped first: a running consumer would declare its queues again.
        self.running.clear();
        let mut amqp = Amqp::connect();
        for tenant in &self.tenants {
            amqp.delete_tenant_queues(tenant);
        }
    }
}

#[test]
fn replicas_share_tenants_evenly_apply_each_others_changes_and_take_a_joiners_share() {
    let mut replicas = Replicas::new();
    replicas.start("a");
    replicas.start("b");
    replicas.create("a", 12);
    let owners = replicas.settled("a", &["a", "b"], Duration::from_secs(20));
    assert_eq!(owners.len(), 2, "both replicas run tenants: {owners:?}");

    // A change made through a runs on b, the tenant's owner, within a second.
    let on_b = owners["b"].clone();
    let started = Instant::now();
    let paused = replicas.get("a").request(
        "PATCH",
        &format!("/api/tenants/{}", on_b[0]),
        Some(r#"{"status":"inactive"}"#),
    );
    assert_eq!(paused.status, 200, "{}", paused.text());
    let resized = replicas.get("a").request(
        "PUT",
        &format!("/api/tenants/{}/config/concurrency", on_b[1]),
        Some(r#"{"workers": 5}"#),
    );
    assert_eq!(resized.status, 200, "{}", resized.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let mut amqp = Amqp::connect();
    assert_eq!(
        amqp.consumers(&queue_name(&on_b[0])),
        0,
        "b stopped the paused tenant"
    );
    let seen_by_b = replicas.view("b", &on_b[1]);
    assert_eq!(seen_by_b["consumer"]["replica"], "b");
    assert_eq!(seen_by_b["consumer"]["workers"], 5, "{seen_by_b}");
    let b_metrics = replicas.get("b").request("GET", "/metrics", None).text();
    let gauge = format!("tenantd_tenant_workers{{tenant_id=\"{}\"}} 5", on_b[1]);
    assert!(
        b_metrics.contains(&gauge),
        "b's live prefetch follows: {gauge}"
    );

    // A third replica joins and takes its share.
    replicas.start("c");
    let owners = replicas.settled("b", &["a", "b", "c"], Duration::from_secs(20));
    assert!(
        owners.get("c").is_some_and(|ts| !ts.is_empty()),
        "{owners:?}"
    );
    let listed = replicas
        .get("c")
        .request("GET", "/api/replicas", None)
        .json();
    let counts: HashMap<String, i64> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["tenants"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts.len(), 3, "{listed}");
    assert_eq!(
        counts.values().sum::<i64>(),
        11,
        "every active tenant counted once: {listed}"
    );
}

/// Publishes `count` messages with ids over the tenants (round robin) from a thread; the ids.
fn publish_with_ids(
    tenants: &[String],
    count: usize,
) -> (Vec<String>, std::thread::JoinHandle<()>) {
    let plan: Vec<(String, String)> = (0..count)
        .map(|i| {
            (
                tenants[i % tenants.len()].clone(),
                Uuid::new_v4().to_string(),
            )
        })
        .collect();
    let ids = plan.iter().map(|p| p.1.clone()).collect();
    let publisher = std::thread::spawn(move || {
        let mut amqp = Amqp::connect();
        for (i, (tenant, id)) in plan.iter().enumerate() {
            let body = json!({ "i": i }).to_string();
            amqp.publish(&queue_name(tenant), body.as_bytes(), Some(id));
            if i % 500 == 499 {
                amqp.wait_confirms();
            }
        }
        amqp.wait_confirms();
    });
    (ids, publisher)
}

fn stored_ids(db: &TestDb) -> Vec<String> {
    db.client()
        .query("SELECT id::text FROM messages", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn a_killed_replicas_tenants_run_elsewhere_in_time_and_nothing_is_lost_or_doubled() {
    let mut replicas = Replicas::new();
    for name in ["a", "b", "c"] {
        replicas.start(name);
    }
    replicas.create("a", 9);
    let owners = replicas.settled("a", &["a", "b", "c"], Duration::from_secs(20));
    let (ids, publisher) = publish_with_ids(&replicas.tenants, 20_000);
    let mut pg = replicas.db.client();
    wait_until(Duration::from_secs(60), "5,000 rows", || {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get::<_, i64>(0)
            > 5_000
    });
    let victim = owners
        .iter()
        .max_by_key(|(_, ts)| ts.len())
        .unwrap()
        .0
        .clone();
    let orphans = owners[&victim].clone();
    let mut dead = replicas.running.remove(&victim).unwrap();
    dead.kill();
    let killed = Instant::now();
    let survivor = ["a", "b", "c"].into_iter().find(|r| *r != victim).unwrap();
    wait_until(
        Duration::from_secs(15),
        "the dead replica's tenants running elsewhere",
        || {
            orphans.iter().all(|t| {
                let view = replicas.view(survivor, t);
                view["consumer"]["state"] == "running"
                    && view["consumer"]["replica"] != victim.as_str()
            })
        },
    );
    let failover = killed.elapsed();
    eprintln!(
        "replica {victim} killed: its {} tenants ran elsewhere after {failover:?}",
        orphans.len()
    );
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    publisher.join().unwrap();
    wait_until(Duration::from_secs(60), "every message stored", || {
        stored_ids(&replicas.db).len() >= ids.len()
    });
    let stored = stored_ids(&replicas.db);
    assert_eq!(stored.len(), ids.len(), "nothing stored twice");
    let stored: HashSet<String> = stored.into_iter().collect();
    assert!(ids.iter().all(|id| stored.contains(id)), "nothing lost");
}

/// The longest pause between two rows committed for `tenant` in the interval.
fn longest_gap(db: &TestDb, tenant: &str) -> Duration {
    let row = db
        .client()
        .query_one(
            "SELECT coalesce(max(gap), 0)::float8 FROM (
                 SELECT extract(epoch FROM created_at - lag(created_at) OVER (ORDER BY created_at))
                        AS gap
                 FROM messages WHERE tenant_id = $1::text::uuid) g",
            &[&tenant],
        )
        .unwrap();
    Duration::from_secs_f64(row.get::<_, f64>(0))
}

#[test]
fn a_replica_stopped_with_sigterm_hands_its_tenants_over_with_short_gaps() {
    let mut replicas = Replicas::new();
    replicas.start("a");
    replicas.start("b");
    replicas.create("a", 6);
    let owners = replicas.settled("a", &["a", "b"], Duration::from_secs(20));
    assert!(owners.contains_key("b"), "{owners:?}");
    // A steady flow: 50 messages a second to every tenant, for four seconds.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (tenants, stop) = (replicas.tenants.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut amqp = Amqp::connect();
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                for t in &tenants {
                    amqp.publish(&queue_name(t), b"{}", Some(&Uuid::new_v4().to_string()));
                }
                sent += 1;
                let due = started + Duration::from_millis(20 * sent);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            amqp.wait_confirms();
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(1500)); // flow before the hand-over
    let mut leaving = replicas.running.remove("b").unwrap();
    let log = leaving.stop_cleanly("-TERM");
    assert!(log.contains("stopping"), "{log}");
    std::thread::sleep(Duration::from_millis(2500)); // flow after it
    stop.store(true, Ordering::SeqCst);
    let rounds = publisher.join().unwrap();
    let expected = rounds as i64 * replicas.tenants.len() as i64;
    let mut pg = replicas.db.client();
    wait_until(Duration::from_secs(30), "every message stored", || {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get::<_, i64>(0)
            >= expected
    });
    for tenant in &owners["b"] {
        let gap = longest_gap(&replicas.db, tenant);
        eprintln!("tenant {tenant} handed over by b: longest pause {gap:?}");
        assert!(
            gap < Duration::from_secs(2),
            "tenant {tenant} paused for {gap:?}"
        );
    }
    replicas.settled("a", &["a"], Duration::from_secs(10));
}

/// Ends the coordinator and heart sessions of these replicas, as a PostgreSQL restart does.
fn end_sessions(db: &TestDb, replicas: &[&str]) -> i64 {
    let names: Vec<String> = replicas
        .iter()
        .flat_map(|r| {
            [
                format!("tenantd replica {r}"),
                format!("tenantd coordinator {r}"),
            ]
        })
        .collect();
    db.client()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = ANY($1)",
            &[&names],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_short_database_blip_of_one_replica_moves_no_tenant_and_doubles_no_consumer() {
    let mut replicas = Replicas::new();
    let proxy = Proxy::start(&pg_host_port());
    replicas.start("a");
    replicas.start("b");
    let via = pg_url_via(proxy.port(), &replicas.db);
    replicas.start_with("c", &[("DATABASE_URL", via)]);
    replicas.create("a", 9);
    let before = replicas.settled("a", &["a", "b", "c"], Duration::from_secs(30));
    proxy.cut(); // c's sessions end, and for 2 s c cannot reconnect
    let blip = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2)); // the blip itself
        proxy.restore();
        proxy
    });
    let most = replicas.most_consumers(Duration::from_secs(6));
    let _proxy = blip.join().unwrap();
    let after = replicas.settled("a", &["a", "b", "c"], Duration::from_secs(30));
    let doubled: Vec<_> = most.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "queues with two consumers: {doubled:?}");
    assert_eq!(before, after, "no tenant moved");
}

#[test]
fn a_silent_partition_stops_the_old_owner_before_another_takes_over_or_a_pause_answers() {
    let mut replicas = Replicas::new();
    let proxy = Proxy::start(&pg_host_port());
    let via = pg_url_via(proxy.port(), &replicas.db);
    replicas.start_with("a", &[("DATABASE_URL", via)]);
    replicas.start("b");
    replicas.create("b", 4);
    let owners = replicas.settled("b", &["a", "b"], Duration::from_secs(30));
    let on_a = owners["a"].clone();
    assert!(on_a.len() >= 2, "{owners:?}");
    let (paused, watched) = (on_a[0].clone(), on_a[1].clone());
    // a's path to PostgreSQL goes silent at t0; the server drops a's session at t0 + 6 s (as
    // its keepalives would); a's own client gives up at t0 + 10 s (as tcp_user_timeout would).
    // The pause is asked at once, while a still consumes: it must wait until a has stopped.
    let mut amqp = Amqp::connect();
    let t0 = Instant::now();
    proxy.freeze();
    let base = replicas.get("b").base.clone();
    let path = format!("/api/tenants/{paused}");
    let pause = std::thread::spawn(move || {
        let reply =
            crate::support::http::request(&base, "PATCH", &path, Some(br#"{"status":"inactive"}"#));
        (reply.status, Instant::now())
    });
    let (mut doubled_at, mut left_at, mut ended, mut cut) = (None, None, false, false);
    while t0.elapsed() < Duration::from_secs(14) {
        if !ended && t0.elapsed() >= Duration::from_secs(6) {
            // a's first session, and any it opened since (held by the silence too).
            assert!(end_sessions(&replicas.db, &["a"]) >= 1);
            ended = true;
        }
        if !cut && t0.elapsed() >= Duration::from_secs(10) {
            proxy.cut();
            cut = true;
        }
        if doubled_at.is_none() && amqp.consumers(&queue_name(&watched)) == 2 {
            doubled_at = Some(t0.elapsed());
        }
        if left_at.is_none() && amqp.consumers(&queue_name(&paused)) == 0 {
            left_at = Some(Instant::now());
        }
    }
    let (status, answered) = pause.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        doubled_at, None,
        "b ran {watched} while a still consumed it"
    );
    assert!(
        left_at.is_some_and(|t| t <= answered),
        "the pause was answered before a's consumer left"
    );
}

#[test]
fn a_consumer_that_keeps_failing_right_after_it_starts_neither_spins_nor_stalls_failover() {
    let vhost = crate::support::vhost::Vhost::create();
    // The DLQs refuse every message: a poison message's copy is nacked, its session fails and
    // the message comes back, again and again.
    vhost.set_policy(
        "dlq-cap",
        "_dlq$",
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    let mut replicas = Replicas::new();
    let extra = [
        ("RABBITMQ_URL", vhost.url()),
        ("RETRY_DELAYS_MS", "none".to_string()),
    ];
    replicas.start_with("a", &extra);
    replicas.start_with("b", &extra);
    replicas.create("a", 4);
    let mut owners = HashMap::new();
    wait_until(Duration::from_secs(30), "every tenant running", || {
        owners = replicas.owners("a").unwrap_or_default();
        owners.values().map(Vec::len).sum::<usize>() == 4 && owners.len() == 2
    });
    let (flapping, orphan) = (owners["a"][0].clone(), owners["b"][0].clone());
    let mut amqp = Amqp::connect_to(&vhost.url());
    amqp.publish(
        &queue_name(&flapping),
        b"not json",
        Some(&Uuid::new_v4().to_string()),
    );
    amqp.wait_confirms();
    let sessions = |replicas: &Replicas| {
        replicas
            .get("a")
            .lines()
            .iter()
            .filter(|l| l.contains("consumer started") && l.contains(&flapping))
            .count()
    };
    wait_until(Duration::from_secs(10), "the session to fail", || {
        sessions(&replicas) > 1
    });
    let mut killed = replicas.running.remove("b").unwrap();
    killed.kill();
    let started = Instant::now();
    wait_until(Duration::from_secs(10), "b's tenant running on a", || {
        let view = replicas.view("a", &orphan);
        view["consumer"]["replica"] == "a" && view["consumer"]["state"] == "running"
    });
    let failover = started.elapsed();
    let flaps = sessions(&replicas);
    // Backing off (100 ms doubling to 30 s) gives some ten sessions here; without, hundreds.
    assert!(
        flaps < 15,
        "{flaps} sessions in {failover:?}: the failing consumer backs off"
    );
}
