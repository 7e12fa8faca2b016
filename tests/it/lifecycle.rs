//! A tenant's life after creation: delete, pause and resume, concurrency changes, all while
//! messages flow, with nothing lost and nothing doubled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::logs::lines_with;
use crate::support::{
    dlq_name, partition_name, queue_name, tenant_thread, threads_named, wait_until, Amqp, TestApp,
};

/// Publishes `{"n": i}` for i in 0..count (no message_id, so a redelivery would show as a
/// second row), then waits for the broker's confirms.
fn publish_numbered(queue: String, count: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut amqp = Amqp::connect();
        for i in 0..count {
            amqp.publish(&queue, json!({ "n": i }).to_string().as_bytes(), None);
            if i % 200 == 0 {
                amqp.wait_confirms();
            }
        }
        amqp.wait_confirms();
    })
}

fn assert_each_number_once(app: &TestApp, tenant: &str, count: i64) {
    app.wait_rows(tenant, count);
    let sql = format!(
        "SELECT count(DISTINCT (payload->>'n')::int) FROM {}",
        partition_name(tenant)
    );
    let distinct: i64 = app.pg().query_one(&sql, &[]).unwrap().get(0);
    assert_eq!(distinct, count, "every message stored once, none doubled");
}

#[test]
fn delete_while_messages_flow_removes_everything_and_spares_other_tenants() {
    let app = TestApp::spawn();
    let doomed = app.create_tenant("doomed");
    let survivor = app.create_tenant("survivor");
    // The tenant's thread (amiquip's threads, started from it, carry its name too).
    assert!(
        threads_named(&tenant_thread(&doomed)) >= 1,
        "the tenant's thread runs"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let (queue, stop) = (queue_name(&doomed), stop.clone());
        std::thread::spawn(move || {
            let mut amqp = Amqp::connect();
            for i in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                amqp.publish(&queue, json!({ "n": i }).to_string().as_bytes(), None);
            }
        })
    };
    let steady = publish_numbered(queue_name(&survivor), 2000);
    wait_until(
        Duration::from_secs(20),
        "the doomed tenant to store some rows",
        || app.partition_rows(&doomed) > 100,
    );

    let reply = app.request("DELETE", &format!("/api/tenants/{doomed}"), None);
    assert_eq!(reply.status, 204, "{}", reply.text());
    assert!(reply.body.is_empty());
    stop.store(true, Ordering::SeqCst);
    flood.join().unwrap();
    steady.join().unwrap();

    app.get(&format!("/api/tenants/{doomed}"))
        .assert_error(404, "not found");
    app.request("DELETE", &format!("/api/tenants/{doomed}"), None)
        .assert_error(404, "not found");
    let mut amqp = Amqp::connect();
    assert_eq!(
        amqp.queue_stats(&queue_name(&doomed)),
        None,
        "queue deleted"
    );
    assert_eq!(
        amqp.queue_stats(&dlq_name(&doomed)),
        None,
        "dead-letter queue deleted"
    );
    let tables: i64 = app
        .pg()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = $1",
            &[&partition_name(&doomed)],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "partition dropped");
    assert_eq!(app.tenant_ids(), vec![survivor.clone()], "row deleted");
    wait_until(
        Duration::from_secs(5),
        "the tenant's threads to end",
        || threads_named(&tenant_thread(&doomed)) == 0,
    );
    assert_each_number_once(&app, &survivor, 2000);
}

#[test]
fn resizing_under_load_applies_at_once_persists_and_loses_nothing() {
    let mut app = TestApp::spawn();
    let tenant = app.create_tenant("resized");
    let publisher = publish_numbered(queue_name(&tenant), 4000);
    let mut expected_log = Vec::new();
    let mut was = 3;
    for workers in [8, 1, 5] {
        let rows = app.partition_rows(&tenant);
        let reply = app.request(
            "PUT",
            &format!("/api/tenants/{tenant}/config/concurrency"),
            Some(&json!({ "workers": workers }).to_string()),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["workers"], workers);
        expected_log.push(format!(
            "concurrency changed {was} -> {workers} tenant_id={tenant}"
        ));
        was = workers;
        wait_until(Duration::from_secs(20), "progress after the resize", || {
            app.partition_rows(&tenant) > rows || app.partition_rows(&tenant) == 4000
        });
    }
    publisher.join().unwrap();
    assert_each_number_once(&app, &tenant, 4000);
    for line in &expected_log {
        wait_until(Duration::from_secs(5), line, || {
            !lines_with(&[line]).is_empty()
        });
    }
    let mut amqp = Amqp::connect();
    assert_eq!(
        amqp.queue_stats(&queue_name(&tenant)),
        Some((0, 1)),
        "no queue was recreated"
    );

    let started = format!("tenant_id={tenant}");
    let at_500 = || lines_with(&["consumer started", "prefetch=500", &started]).len();
    // The resize to 5 logged one already.
    let before = at_500();
    app.restart();
    let view = app.get(&format!("/api/tenants/{tenant}")).json();
    assert_eq!(view["workers"], 5);
    assert_eq!(view["rows"], 4000, "what is stored survives the restart");
    assert_eq!(
        view["counts"]["stored"], 0,
        "this replica's counters start again"
    );
    wait_until(
        Duration::from_secs(10),
        "prefetch 500 after the restart",
        || at_500() == before + 1,
    );
}

#[test]
fn concurrency_outside_its_bounds_is_refused() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("bounds");
    let path = format!("/api/tenants/{tenant}/config/concurrency");
    for body in [
        r#"{"workers": 0}"#,
        r#"{"workers": 65}"#,
        r#"{"workers": -1}"#,
        r#"{"workers": 2.5}"#,
        r#"{"workers": "4"}"#,
    ] {
        app.request("PUT", &path, Some(body))
            .assert_error(400, "workers");
    }
    app.request("PUT", &path, Some("{}"))
        .assert_error(400, "missing field");
    let unknown = uuid::Uuid::new_v4();
    app.request(
        "PUT",
        &format!("/api/tenants/{unknown}/config/concurrency"),
        Some(r#"{"workers": 2}"#),
    )
    .assert_error(404, "not found");
    assert_eq!(
        app.get(&format!("/api/tenants/{tenant}")).json()["workers"],
        3
    );
}

#[test]
fn pausing_keeps_messages_in_the_queue_and_resuming_stores_them() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("pausable");
    let path = format!("/api/tenants/{tenant}");
    let paused = app.request(
        "PATCH",
        &path,
        Some(r#"{"status": "inactive", "name": "renamed"}"#),
    );
    assert_eq!(paused.status, 200, "{}", paused.text());
    let paused = paused.json();
    assert_eq!(paused["status"], "inactive");
    assert_eq!(paused["name"], "renamed");
    assert!(paused["updated_at"].as_str() > paused["created_at"].as_str());

    let mut amqp = Amqp::connect();
    assert_eq!(
        amqp.consumers(&queue_name(&tenant)),
        0,
        "the consumer stopped"
    );
    publish_numbered(queue_name(&tenant), 100).join().unwrap();
    wait_until(Duration::from_secs(5), "the queue to hold 100", || {
        app.get(&path).json()["queue"]["messages"] == 100
    });
    assert_eq!(app.partition_rows(&tenant), 0);

    let resumed = app.request("PATCH", &path, Some(r#"{"status": "active"}"#));
    assert_eq!(resumed.json()["status"], "active");
    assert_each_number_once(&app, &tenant, 100);
    assert_eq!(amqp.consumers(&queue_name(&tenant)), 1);
    assert_eq!(app.get(&path).json()["name"], "renamed");
}

#[test]
fn bad_patches_are_refused_and_change_nothing() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("strict");
    let path = format!("/api/tenants/{tenant}");
    app.request("PATCH", &path, Some(r#"{"status": "paused"}"#))
        .assert_error(400, "unknown variant");
    app.request("PATCH", &path, Some(r#"{"status": null}"#))
        .assert_error(400, "invalid type: null");
    app.request("PATCH", &path, Some(r#"{"name": null}"#))
        .assert_error(400, "invalid type: null");
    app.request("PATCH", &path, Some(r#"{"name": ""}"#))
        .assert_error(400, "empty");
    app.request("PATCH", &path, Some(r#"{"id": "x"}"#))
        .assert_error(400, "unknown field");
    app.request("PATCH", &path, Some("["))
        .assert_error(400, "invalid json");
    let unknown = uuid::Uuid::new_v4();
    app.request("PATCH", &format!("/api/tenants/{unknown}"), Some("{}"))
        .assert_error(404, "not found");
    let cleared = app
        .request("PATCH", &path, Some(r#"{"description": null}"#))
        .json();
    assert_eq!(cleared["description"], serde_json::Value::Null);
    assert_eq!(cleared["name"], "strict");
    assert_eq!(cleared["status"], "active");
}

#[test]
fn a_shutdown_during_an_operation_waiting_for_its_tenant_ends_in_time() {
    let mut app = TestApp::spawn();
    let tenant = app.create_tenant("waited on");
    // Another replica's operation holds the tenant's lock (a DELETE waiting for a drain, say).
    let id: uuid::Uuid = tenant.parse().unwrap();
    let b = id.as_bytes();
    let word = |i: usize| i32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let key = word(0) ^ word(4) ^ word(8) ^ word(12);
    let mut holder = app.pg();
    holder
        .execute("SELECT pg_advisory_lock($1, $2)", &[&0x746e_6474i32, &key])
        .unwrap();
    let base = app.base();
    let path = format!("/api/tenants/{tenant}/config/concurrency");
    let put = std::thread::spawn(move || {
        crate::support::http::request(&base, "PUT", &path, Some(br#"{"workers":2}"#))
    });
    wait_until(
        Duration::from_secs(5),
        "the PUT waiting for the lock",
        || {
            let waiting: i64 = holder
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                    &[],
                )
                .unwrap()
                .get(0);
            waiting == 1
        },
    );
    let started = std::time::Instant::now();
    app.app
        .take()
        .unwrap()
        .shutdown()
        .expect("a clean shutdown");
    assert!(
        started.elapsed() < app.config.shutdown_timeout,
        "{:?}",
        started.elapsed()
    );
    put.join().unwrap().assert_error(503, "shutting down");
}
