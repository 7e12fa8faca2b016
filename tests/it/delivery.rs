//! Delivery guarantees: failing messages are retried then dead-lettered with the reason, outages
//! lose nothing, a shutdown under load stores everything once.

use std::collections::HashSet;
use std::time::Duration;

use amiquip::AmqpValue;
use serde_json::json;
use uuid::Uuid;

use crate::support::child::Tenantd;
use crate::support::logs::lines_with;
use crate::support::proxy::Proxy;
use crate::support::{
    dlq_name, partition_name, pg_host_port, pg_url_via, queue_name, rabbitmq_url, retry_name,
    wait_until, Amqp, TestApp, TestDb,
};

fn header(properties: &amiquip::AmqpProperties, name: &str) -> Option<AmqpValue> {
    properties.headers().as_ref()?.get(name).cloned()
}

#[test]
fn a_failing_message_is_retried_then_dead_lettered_with_its_reason_and_attempts() {
    let delay = Duration::from_millis(400);
    let app = TestApp::spawn_with(|c| c.retry_delays = vec![delay; 3]);
    let tenant = app.create_tenant("poison");
    let mut amqp = Amqp::connect();
    let queue = queue_name(&tenant);
    let poison_id = Uuid::new_v4().to_string();
    amqp.publish(&queue, b"{\"ok\": 1}", None);
    amqp.publish(&queue, b"this is not json", Some(&poison_id));
    amqp.publish(&queue, br#"{"nul": "\u0000"}"#, None); // JSON that jsonb refuses
    amqp.publish(&queue, b"{\"ok\": 2}", None);
    amqp.wait_confirms();
    app.wait_rows(&tenant, 2);
    assert_eq!(
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0),
        Some(0),
        "the good messages behind the poison were stored while it waits for its retries"
    );
    wait_until(Duration::from_secs(20), "two messages in the DLQ", || {
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0) == Some(2)
    });
    let mut reasons = Vec::new();
    while let Some((body, properties)) = amqp.take(&dlq_name(&tenant)) {
        assert_eq!(
            header(&properties, "x-tenantd-attempts"),
            Some(AmqpValue::LongInt(4))
        );
        let Some(AmqpValue::LongString(reason)) = header(&properties, "x-tenantd-reason") else {
            panic!("no reason header");
        };
        if body == b"this is not json" {
            assert_eq!(properties.message_id().as_deref(), Some(poison_id.as_str()));
        }
        reasons.push(reason);
    }
    reasons.sort();
    assert!(reasons[0].contains("not JSON"), "{reasons:?}");
    assert!(reasons[1].contains("rejected by PostgreSQL"), "{reasons:?}");

    let view = app.get(&format!("/api/tenants/{tenant}")).json();
    assert_eq!(view["counts"]["stored"], 2);
    assert_eq!(view["counts"]["retried"], 6);
    assert_eq!(view["counts"]["dead_lettered"], 2);
    assert_eq!(view["queue"]["retrying"], 0);
    assert_eq!(
        lines_with(&["dead-lettered after 4 attempts", &tenant]).len(),
        2
    );
}

#[test]
fn the_attempt_count_survives_a_restart() {
    let mut app = TestApp::spawn_with(|c| {
        c.retry_delays = vec![Duration::from_millis(1500), Duration::from_millis(10)];
    });
    let tenant = app.create_tenant("restarted poison");
    let mut amqp = Amqp::connect();
    amqp.publish(&queue_name(&tenant), b"not json", None);
    amqp.wait_confirms();
    wait_until(
        Duration::from_secs(10),
        "the message to wait for its retry",
        || !lines_with(&[&tenant, "(attempt 1), retrying in"]).is_empty(),
    );
    app.restart();
    wait_until(Duration::from_secs(20), "the message in the DLQ", || {
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0) == Some(1)
    });
    let (_, properties) = amqp.take(&dlq_name(&tenant)).unwrap();
    assert_eq!(
        header(&properties, "x-tenantd-attempts"),
        Some(AmqpValue::LongInt(3))
    );
}

#[test]
fn a_database_outage_retries_without_dead_letters_and_loses_nothing() {
    let proxy = Proxy::start(&pg_host_port());
    let via_proxy = format!("127.0.0.1:{}", proxy.port());
    let app = TestApp::spawn_with(|c| {
        c.database_url = c.database_url.replace(&pg_host_port(), &via_proxy);
        c.retry_delays = vec![Duration::from_millis(10)];
    });
    let tenant = app.create_tenant("outage");
    proxy.cut();
    app.get("/readyz").assert_error(503, "database unavailable");
    assert_eq!(app.get("/healthz").status, 200);
    let mut amqp = Amqp::connect();
    let ids: Vec<String> = (0..300).map(|_| Uuid::new_v4().to_string()).collect();
    for (i, id) in ids.iter().enumerate() {
        amqp.publish(
            &queue_name(&tenant),
            json!({ "i": i }).to_string().as_bytes(),
            Some(id),
        );
    }
    amqp.wait_confirms();
    wait_until(
        Duration::from_secs(10),
        "a failed store to be logged",
        || !lines_with(&["storing", "retrying in", &tenant]).is_empty(),
    );
    assert_eq!(app.partition_rows(&tenant), 0);
    proxy.restore();
    app.wait_rows(&tenant, 300);
    assert_eq!(amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0), Some(0));
    assert_eq!(amqp.queue_stats(&retry_name(&tenant)).map(|s| s.0), Some(0));
    wait_until(Duration::from_secs(10), "ready again", || {
        app.get("/readyz").status == 200
    });
}

#[test]
fn sigterm_under_load_drains_exits_0_and_stores_everything_once() {
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", rabbitmq_url()),
        // Slowed down, so that the SIGTERM surely lands while messages are in flight.
        ("WORKER_POOL_SIZE", "1".to_string()),
        ("BATCH_SIZE", "5".to_string()),
    ];
    let mut first = Tenantd::start(&env);
    let reply = first.request("POST", "/api/tenants", Some(r#"{"name": "drained"}"#));
    let tenant = reply.json()["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    const N: i64 = 10_000;
    for i in 0..N {
        // No message_id: a message stored twice would show as two rows.
        amqp.publish(
            &queue_name(&tenant),
            json!({ "n": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    let mut pg = db.client();
    let count = |pg: &mut postgres::Client| -> i64 {
        let sql = format!("SELECT count(*) FROM {}", partition_name(&tenant));
        pg.query_one(&sql, &[]).unwrap().get(0)
    };
    wait_until(Duration::from_secs(30), "some rows", || {
        count(&mut pg) > 200
    });
    let log = first.stop_cleanly("-TERM");
    for step in [
        "received SIGTERM",
        "HTTP stops taking requests",
        "consumer stopped",
        "every consumer stopped",
        "shutdown complete",
    ] {
        assert!(log.contains(step), "the log lacks {step:?}: {log}");
    }
    let stored_at_exit = count(&mut pg);
    assert!(stored_at_exit < N, "the shutdown happened under load");

    let mut second = Tenantd::start(&env);
    wait_until(Duration::from_secs(60), "every message stored", || {
        count(&mut pg) >= N
    });
    let sql = format!(
        "SELECT count(DISTINCT payload->>'n'), count(*) FROM {}",
        partition_name(&tenant)
    );
    let row = pg.query_one(&sql, &[]).unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (N, N),
        "nothing lost, nothing doubled"
    );
    second.kill(); // before deleting its queues, which its consumer would declare again
    amqp.delete_tenant_queues(&tenant);
}

#[test]
fn every_good_message_is_stored_once_and_every_poison_dead_lettered_through_faults() {
    let pg_proxy = Proxy::start(&pg_host_port());
    let amqp_proxy = Proxy::start(&crate::support::amqp_host_port());
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", pg_url_via(pg_proxy.port(), &db)),
        (
            "RABBITMQ_URL",
            crate::support::amqp_url_via(amqp_proxy.port()),
        ),
        ("RETRY_DELAYS_MS", "50,50,50".to_string()),
        ("CONNECT_TIMEOUT_MS", "2000".to_string()),
    ];
    let mut tenantd = Tenantd::start(&env);
    let tenants: Vec<String> = (0..10)
        .map(|i| {
            let reply = tenantd.request(
                "POST",
                "/api/tenants",
                Some(&format!(r#"{{"name": "t{i}"}}"#)),
            );
            assert_eq!(reply.status, 201, "{}", reply.text());
            reply.json()["id"].as_str().unwrap().to_string()
        })
        .collect();

    // 50,000 messages with ids over 10 tenants; every 100th is not JSON.
    let plan: Vec<(usize, String, bool)> = (0..50_000)
        .map(|i| (i % 10, Uuid::new_v4().to_string(), i % 100 == 99))
        .collect();
    let publisher = {
        let (plan, tenants) = (plan.clone(), tenants.clone());
        std::thread::spawn(move || Amqp::connect().publish_plan(&tenants, &plan, 1000))
    };
    let mut pg = db.client();
    let mut rows = move || -> i64 {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get(0)
    };
    let deadline = Duration::from_secs(120);

    wait_until(deadline, "5,000 rows", || rows() > 5_000);
    tenantd.kill();
    tenantd = Tenantd::start(&env);
    wait_until(deadline, "15,000 rows", || rows() > 15_000);
    amqp_proxy.cut();
    std::thread::sleep(Duration::from_millis(500)); // the outage itself
    amqp_proxy.restore();
    wait_until(deadline, "25,000 rows", || rows() > 25_000);
    pg_proxy.cut();
    std::thread::sleep(Duration::from_millis(500)); // the outage itself
    pg_proxy.restore();
    wait_until(deadline, "35,000 rows", || rows() > 35_000);
    tenantd.kill();
    let mut tenantd = Tenantd::start(&env);
    publisher.join().unwrap();

    let good: HashSet<&str> = plan.iter().filter(|p| !p.2).map(|p| p.1.as_str()).collect();
    wait_until(deadline, "every good message stored", || {
        rows() == good.len() as i64
    });
    let stored: HashSet<String> = db
        .client()
        .query("SELECT id::text FROM messages", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), good.len());
    assert!(
        stored.iter().all(|id| good.contains(id.as_str())),
        "only good ids were stored"
    );

    let mut amqp = Amqp::connect();
    for (t, tenant) in tenants.iter().enumerate() {
        let expected: HashSet<&str> = plan
            .iter()
            .filter(|p| p.2 && p.0 == t)
            .map(|p| p.1.as_str())
            .collect();
        let mut dead: HashSet<String> = HashSet::new();
        wait_until(deadline, "every poison message in its DLQ", || {
            while let Some((_, properties)) = amqp.take(&dlq_name(tenant)) {
                dead.extend(properties.message_id().clone());
            }
            dead.len() == expected.len()
        });
        assert!(
            dead.iter().all(|id| expected.contains(id.as_str())),
            "only poison in the DLQ"
        );
    }
    // Stopped first: a running consumer would declare its queues again.
    tenantd.kill();
    for tenant in &tenants {
        amqp.delete_tenant_queues(tenant);
    }
}

#[test]
fn a_post_to_a_tenant_whose_queue_is_gone_is_refused_not_lost() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "queueless", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    amqp.delete_tenant_queues(&tenant);
    let reply = app.request(
        "POST",
        &format!("/api/tenants/{tenant}/messages"),
        Some(r#"{"a": 1}"#),
    );
    reply.assert_error(503, "could not route");
}

#[test]
fn a_dead_letter_whose_dlq_is_gone_is_kept_until_the_dlq_is_back() {
    let app = TestApp::spawn_with(|c| c.retry_delays = Vec::new());
    let tenant = app.create_tenant("dlq deleted");
    let mut amqp = Amqp::connect();
    amqp.delete_queue(&dlq_name(&tenant));
    let id = Uuid::new_v4().to_string();
    amqp.publish(&queue_name(&tenant), b"not json", Some(&id));
    amqp.wait_confirms();
    // The broker returns the copy (no queue); the original stays unacked, the session starts
    // again and declares the DLQ, and the copy goes there on the next delivery.
    wait_until(Duration::from_secs(20), "the message in the DLQ", || {
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0) == Some(1)
    });
    let (_, properties) = amqp.take(&dlq_name(&tenant)).unwrap();
    assert_eq!(properties.message_id().as_deref(), Some(id.as_str()));
    assert!(
        !lines_with(&[
            &tenant,
            "could not route the message to",
            &dlq_name(&tenant)
        ])
        .is_empty(),
        "the returned copy was noticed"
    );
}
