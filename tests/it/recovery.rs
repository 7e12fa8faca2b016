//! Consumers facing a broker that refuses them and a database that stalls: they retry until
//! they run, readiness says when they do not, and waiting costs no CPU.

use std::time::Duration;

use crate::support::logs::lines_with;
use crate::support::vhost::Vhost;
use crate::support::{
    lock_partition, queue_name, tenant_thread, threads_named, wait_until, Amqp, TestApp,
};

/// The value of an unlabelled series in a Prometheus scrape.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn consumers_refused_by_the_broker_retry_until_they_run_and_readiness_says_so() {
    let vhost = Vhost::create();
    let mut app = TestApp::spawn_with(|c| {
        c.rabbitmq_url = vhost.url();
        c.connect_timeout = Duration::from_secs(2);
    });
    let tenants: Vec<String> = (0..6)
        .map(|i| app.create_tenant(&format!("t{i}")))
        .collect();
    app.stop();
    // Three connections fit: the admin session's and two consumers' (three consumers', when a
    // consumer connects before the admin session does); the others are refused at start-up. On
    // a loaded broker a connection that would fit may time out too: at least 3 of 6 fail.
    vhost.limit_connections(3);
    app.restart();
    let retrying = || -> Vec<serde_json::Value> {
        tenants
            .iter()
            .map(|t| app.get(&format!("/api/tenants/{t}")).json())
            .filter(|v| v["consumer"]["state"] == "retrying")
            .collect()
    };
    let mut failing = 0;
    wait_until(
        Duration::from_secs(30),
        "at least three consumers to fail, and GET to say so of as many",
        || {
            let gauge = gauge(&app.get("/metrics").text(), "tenantd_consumers_failing");
            failing = gauge.unwrap_or(0.0) as usize;
            let states = retrying().len();
            eprintln!("failing gauge {failing}, retrying in GET {states}");
            (3..=6).contains(&failing) && states == failing
        },
    );
    app.get("/readyz").assert_error(
        503,
        &format!("{failing} tenants should run on this replica but cannot connect"),
    );
    let refused = retrying();
    assert!(
        refused[0]["consumer"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "GET says why: {}",
        refused[0]
    );

    vhost.clear_limits();
    let mut amqp = Amqp::connect_to(&vhost.url());
    wait_until(
        Duration::from_secs(20),
        "every tenant's consumer back",
        || tenants.iter().all(|t| amqp.consumers(&queue_name(t)) == 1),
    );
    wait_until(Duration::from_secs(5), "ready again", || {
        app.get("/readyz").status == 200
    });
    assert_eq!(
        gauge(&app.get("/metrics").text(), "tenantd_consumers_failing"),
        Some(0.0)
    );
    app.stop();
}

#[test]
fn a_pause_waiting_for_a_blocked_batch_costs_no_cpu() {
    let app = TestApp::spawn_with(|c| c.statement_timeout = Duration::ZERO);
    let tenant = app.create_tenant("blocked");
    let mut locker = app.pg();
    let lock = lock_partition(&mut locker, &tenant);
    let mut amqp = Amqp::connect();
    amqp.publish_numbered(&queue_name(&tenant), 10);
    // How the 10 deliveries group into batches depends on timing; at least one batch waits.
    wait_until(
        Duration::from_secs(10),
        "a batch to wait for the partition's lock",
        || worker_waiting_for_a_lock(&mut app.pg()),
    );
    let view = app.get(&format!("/api/tenants/{tenant}")).json();
    assert!(
        view["rows"].is_null(),
        "a locked partition is not waited for: {view}"
    );
    let base = app.base();
    let path = format!("/api/tenants/{tenant}");
    let pause = std::thread::spawn(move || {
        crate::support::http::request(&base, "PATCH", &path, Some(br#"{"status":"inactive"}"#))
    });
    wait_until(
        Duration::from_secs(10),
        "the consumer to be cancelled",
        || amqp.consumers(&queue_name(&tenant)) == 0,
    );
    let before = crate::support::thread_ticks(&tenant_thread(&tenant));
    std::thread::sleep(Duration::from_secs(1)); // the interval measured
    let used = crate::support::thread_ticks(&tenant_thread(&tenant)) - before;
    assert!(used < 5, "the draining tenant used {used}% of a core");
    lock.commit().unwrap();
    let paused = pause.join().unwrap();
    assert_eq!(paused.status, 200, "{}", paused.text());
    let stored = app.partition_rows(&tenant);
    let (queued, _) = amqp.queue_stats(&queue_name(&tenant)).unwrap();
    assert_eq!(
        stored + i64::from(queued),
        10,
        "stored {stored}, queued {queued}"
    );
    let path = format!("/api/tenants/{tenant}");
    let resumed = app.request("PATCH", &path, Some(r#"{"status":"active"}"#));
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    app.wait_rows(&tenant, 10);
}

/// Whether a tenantd worker of this database waits for a lock someone else holds.
fn worker_waiting_for_a_lock(pg: &mut postgres::Client) -> bool {
    let sql = "SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database() AND wait_event_type = 'Lock'
                 AND application_name = 'tenantd worker'";
    pg.query_one(sql, &[]).unwrap().get::<_, i64>(0) > 0
}

#[test]
fn a_statement_that_hangs_is_cancelled_and_its_batch_retried() {
    let app = TestApp::spawn_with(|c| c.statement_timeout = Duration::from_millis(300));
    let tenant = app.create_tenant("stalled");
    let mut locker = app.pg();
    let lock = lock_partition(&mut locker, &tenant);
    let mut amqp = Amqp::connect();
    amqp.publish_numbered(&queue_name(&tenant), 10);
    wait_until(
        Duration::from_secs(10),
        "the stalled insert to be cancelled",
        || !lines_with(&[&tenant, "storing 10 messages failed", "statement timeout"]).is_empty(),
    );
    lock.commit().unwrap();
    app.wait_rows(&tenant, 10);
}

/// The replicas' liveness lock class (`REPLICA_LOCK` in store/replicas.rs).
const REPLICA_LOCK: i32 = 0x746e_6472;

/// Ends the replica's liveness session, its heart's (a backend killed, an idle-session killer,
/// a reset), and waits until the server has released its liveness lock.
fn kill_coordinator_session(pg: &mut postgres::Client, replica: &str) {
    let name = format!("tenantd replica {replica}");
    let n: i64 = pg
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "one liveness session");
    wait_until(Duration::from_secs(5), "the replica to look dead", || {
        live_replicas(pg) == 0
    });
}

fn live_replicas(pg: &mut postgres::Client) -> i64 {
    pg.query_one("SELECT count(*) FROM live_replicas", &[])
        .unwrap()
        .get(0)
}

fn view(app: &TestApp, tenant: &str) -> serde_json::Value {
    app.get(&format!("/api/tenants/{tenant}")).json()
}

fn wait_running(app: &TestApp, tenant: &str) {
    wait_until(Duration::from_secs(10), "the consumer to run", || {
        view(app, tenant)["consumer"]["state"] == "running"
    });
}

#[test]
fn a_claim_whose_consumer_ended_while_the_session_was_down_is_released() {
    let app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(2);
        c.shutdown_timeout = Duration::from_secs(2);
    });
    let tenant = app.create_tenant("orphaned");
    wait_running(&app, &tenant);
    let replica = app.config.replica_id.clone();
    let mut pg = app.pg();
    let key: i32 = pg
        .query_one("SELECT lock_key FROM replicas WHERE id = $1", &[&replica])
        .unwrap()
        .get(0);
    // The session is gone but its lock is held elsewhere (as by a backend that has not yet
    // noticed its client left): the coordinator cannot rejoin, and fences its consumers.
    kill_coordinator_session(&mut pg, &replica);
    let mut holder = app.pg();
    wait_until(Duration::from_secs(5), "the lock taken", || {
        holder
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&REPLICA_LOCK, &key],
            )
            .unwrap()
            .get(0)
    });
    wait_until(
        Duration::from_secs(10),
        "the fence to stop the consumer",
        || threads_named(&tenant_thread(&tenant)) == 0,
    );
    let paused = app.request(
        "PATCH",
        &format!("/api/tenants/{tenant}"),
        Some(r#"{"status":"inactive"}"#),
    );
    assert!([200, 202].contains(&paused.status), "{}", paused.text());
    drop(holder);
    wait_until(Duration::from_secs(15), "the replica to rejoin", || {
        live_replicas(&mut pg) == 1
    });
    wait_until(Duration::from_secs(5), "the stale claim released", || {
        view(&app, &tenant)["consumer"].is_null()
    });
    let deleted = app.request("DELETE", &format!("/api/tenants/{tenant}"), None);
    assert_eq!(deleted.status, 204, "{}", deleted.text());
}

#[test]
fn a_pause_is_answered_only_once_no_replica_can_still_consume() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("paused");
    wait_running(&app, &tenant);
    let mut pg = app.pg();
    kill_coordinator_session(&mut pg, &app.config.replica_id);
    let paused = app.request(
        "PATCH",
        &format!("/api/tenants/{tenant}"),
        Some(r#"{"status":"inactive"}"#),
    );
    assert_eq!(paused.status, 200, "{}", paused.text());
    assert_eq!(
        threads_named(&tenant_thread(&tenant)),
        0,
        "nothing consumes it"
    );
    let mut amqp = Amqp::connect();
    amqp.publish(&queue_name(&tenant), br#"{"after":"pause"}"#, None);
    amqp.wait_confirms();
    wait_until(
        Duration::from_secs(5),
        "the message waiting in the queue",
        || amqp.queue_stats(&queue_name(&tenant)) == Some((1, 0)),
    );
    assert_eq!(app.partition_rows(&tenant), 0);
}

#[test]
fn a_resize_that_meets_a_dying_connection_is_applied_after_the_reconnect() {
    let proxy = crate::support::proxy::Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let app = TestApp::spawn_with(|c| {
        c.rabbitmq_url = url;
        c.shutdown_timeout = Duration::from_secs(2);
    });
    let tenant = app.create_tenant("resized");
    wait_running(&app, &tenant);
    proxy.freeze(); // the consumer's channel gets no answer from here on
    let base = app.base();
    let path = format!("/api/tenants/{tenant}/config/concurrency");
    let put = std::thread::spawn(move || {
        crate::support::http::request(&base, "PUT", &path, Some(br#"{"workers":5}"#))
    });
    // The row changes first; the coordinator hands the resize on at once. (Read from
    // PostgreSQL: GET also asks the broker, which is frozen.)
    let mut pg = app.pg();
    wait_until(Duration::from_secs(5), "the resize saved", || {
        let row = pg
            .query_one(
                "SELECT workers FROM tenants WHERE id = $1::text::uuid",
                &[&tenant],
            )
            .unwrap();
        row.get::<_, i32>(0) == 5
    });
    proxy.cut();
    proxy.restore();
    let put = put.join().unwrap();
    assert_eq!(put.json()["workers"], 5, "{}", put.text());
    wait_until(Duration::from_secs(15), "the consumer running at 5", || {
        let v = view(&app, &tenant);
        v["consumer"]["state"] == "running" && v["consumer"]["workers"] == 5
    });
}

#[test]
fn readiness_names_every_dependency_that_is_down_as_the_consumers_see_it() {
    use crate::support::proxy::Proxy;
    use crate::support::{amqp_host_port, amqp_url_via, pg_host_port};
    let pg = Proxy::start(&pg_host_port());
    let mq = Proxy::start(&amqp_host_port());
    let via_pg = format!("127.0.0.1:{}", pg.port());
    let app = TestApp::spawn_with(|c| {
        c.database_url = c.database_url.replace(&pg_host_port(), &via_pg);
        c.rabbitmq_url = amqp_url_via(mq.port());
        c.connect_timeout = Duration::from_secs(1);
    });
    let tenant = app.create_tenant("watched");
    wait_running(&app, &tenant);
    assert_eq!(app.get("/readyz").status, 200);
    mq.cut();
    wait_until(Duration::from_secs(10), "the broker reported down", || {
        let reply = app.get("/readyz");
        reply.status == 503
            && reply.text().contains("message broker unavailable")
            && reply
                .text()
                .contains("1 tenants should run on this replica but cannot connect")
    });
    pg.cut();
    wait_until(Duration::from_secs(10), "both reported down", || {
        let text = app.get("/readyz").text();
        text.contains("database unavailable") && text.contains("message broker unavailable")
    });
    pg.restore();
    mq.restore();
    wait_until(Duration::from_secs(30), "ready again", || {
        app.get("/readyz").status == 200
    });
}

/// A broker that stops answering but keeps its sockets open (a hung node, a frozen VM): the API
/// answers 503 within seconds rather than when the heartbeats of a 30 s interval give up
/// (60–120 s), and works again once the broker does.
#[test]
fn api_calls_meeting_a_hung_broker_answer_503_within_seconds() {
    use std::time::Instant;
    let proxy = crate::support::proxy::Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let app = TestApp::spawn_with(|c| c.rabbitmq_url = url);
    let tenant = app.create_tenant("hung");
    let path = format!("/api/tenants/{tenant}/messages");
    // Concurrent publishes leave several sessions in the API's pool: each call below then
    // starts on a kept session, whose broker stops answering mid-call.
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (base, path) = (app.base(), path.clone());
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let reply = crate::support::http::request(&base, "POST", &path, Some(b"{}"));
                    assert_eq!(reply.status, 202, "{}", reply.text());
                }
            })
        })
        .collect();
    publishers.into_iter().for_each(|p| p.join().unwrap());
    proxy.freeze(); // every byte held from here on, the sockets kept open
    let base = app.base();
    let create = std::thread::spawn(move || {
        let started = Instant::now();
        let reply = crate::support::http::request(
            &base,
            "POST",
            "/api/tenants",
            Some(br#"{"name":"late"}"#),
        );
        (reply, started.elapsed())
    });
    let started = Instant::now();
    let publish = app.request("POST", &path, Some(r#"{"a":2}"#));
    let publish_took = started.elapsed();
    let (created, create_took) = create.join().unwrap();
    eprintln!(
        "publish {} after {publish_took:?}, create {} after {create_took:?}",
        publish.status, created.status
    );
    publish.assert_error(503, "broker");
    publish.assert_error(503, "may have reached the queue"); // its confirm never came
    publish.assert_error(503, "did not confirm"); // the first attempt's error is kept
    created.assert_error(503, "broker");
    // A confirm waited for CONNECT_TIMEOUT_MS (3 s here), then a fresh connection as long.
    assert!(
        publish_took < Duration::from_secs(12),
        "publish answered after {publish_took:?}"
    );
    // A declare waits until 2–4 missed heartbeats of 5 s, then a fresh connection 3 s.
    assert!(
        create_took < Duration::from_secs(30),
        "create answered after {create_took:?}"
    );
    proxy.cut();
    // Refused outright, nothing was sent: the answer does not say it may have been published.
    wait_until(Duration::from_secs(10), "the cut broker refused", || {
        let refused = app.request("POST", &path, Some(r#"{"a":"refused"}"#));
        refused.status == 503 && !refused.text().contains("may have reached")
    });
    proxy.restore();
    assert_eq!(app.request("POST", &path, Some(r#"{"a":3}"#)).status, 202);
    let rows_with = |payload: &str| -> Vec<String> {
        let sql = format!(
            "SELECT id::text FROM {} WHERE payload = $1::text::jsonb",
            crate::support::partition_name(&tenant)
        );
        let rows = app.pg().query(&sql, &[&payload]).unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    };
    wait_until(
        Duration::from_secs(15),
        "the publishes before and after the outage stored",
        || rows_with(r#"{"a":3}"#).len() == 1 && rows_with("{}").len() == 20,
    );
    // The unconfirmed publish may have been stored, once at most and under the id it was told.
    let error = publish.json()["error"].as_str().unwrap().to_string();
    for id in rows_with(r#"{"a":2}"#) {
        assert!(
            error.contains(&format!("message {id} may have reached")),
            "{id}: {error}"
        );
    }
    assert!(rows_with(r#"{"a":2}"#).len() <= 1);
    assert!(
        rows_with(r#"{"a":"refused"}"#).is_empty(),
        "a refused publish was stored"
    );
}
