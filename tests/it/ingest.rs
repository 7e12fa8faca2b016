//! Messages published to a tenant's queue end up as rows of its partition, once each.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::support::{partition_name, queue_name, wait_until, Amqp, TestApp};

#[test]
fn every_published_message_is_stored_once_in_its_own_partition() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("ingest");
    let other = app.create_tenant("bystander");
    let mut amqp = Amqp::connect();
    const N: usize = 1000;
    for i in 0..N {
        let body = json!({ "n": i, "text": "hello" }).to_string();
        amqp.publish(&queue_name(&tenant), body.as_bytes(), None);
    }
    amqp.wait_confirms();
    app.wait_rows(&tenant, N as i64);
    assert_eq!(app.partition_rows(&other), 0, "no row in another partition");
    assert_eq!(app.total_rows(), N as i64);
    let distinct: i64 = app
        .pg()
        .query_one("SELECT count(DISTINCT payload->>'n') FROM messages", &[])
        .unwrap()
        .get(0);
    assert_eq!(distinct, N as i64, "each message exactly once");
    wait_until(
        Duration::from_secs(10),
        "the queue to be fully acked",
        || amqp.queue_stats(&queue_name(&tenant)) == Some((0, 1)),
    );
}

#[test]
fn two_tenants_are_isolated() {
    let app = TestApp::spawn();
    let a = app.create_tenant("a");
    let b = app.create_tenant("b");
    let mut amqp = Amqp::connect();
    for i in 0..50 {
        amqp.publish(
            &queue_name(&a),
            json!({ "tenant": "a", "i": i }).to_string().as_bytes(),
            None,
        );
    }
    for i in 0..30 {
        amqp.publish(
            &queue_name(&b),
            json!({ "tenant": "b", "i": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    app.wait_rows(&a, 50);
    app.wait_rows(&b, 30);
    let mut pg = app.pg();
    let table_of = |t: &str| crate::support::partition_name(t);
    let wrong: i64 = pg
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {} WHERE payload->>'tenant' <> 'a')
                      + (SELECT count(*) FROM {} WHERE payload->>'tenant' <> 'b')",
                table_of(&a),
                table_of(&b)
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
}

#[test]
fn a_redelivered_message_id_is_stored_once_with_that_id() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("dedup");
    let mut amqp = Amqp::connect();
    let id = Uuid::new_v4().to_string();
    for _ in 0..3 {
        amqp.publish(&queue_name(&tenant), br#"{"same": true}"#, Some(&id));
    }
    amqp.publish(
        &queue_name(&tenant),
        br#"{"last": true}"#,
        Some("not-a-uuid"),
    );
    amqp.wait_confirms();
    app.wait_rows(&tenant, 2);
    wait_until(Duration::from_secs(10), "all four acked", || {
        amqp.queue_stats(&queue_name(&tenant)) == Some((0, 1))
    });
    assert_eq!(
        app.partition_rows(&tenant),
        2,
        "the three copies made one row"
    );
    let stored: i64 = app
        .pg()
        .query_one(
            "SELECT count(*) FROM messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 1, "the row carries the publisher's message_id");
    let counts = app.get(&format!("/api/tenants/{tenant}")).json()["counts"].clone();
    assert_eq!(counts["stored"], 2, "{counts}");
    assert_eq!(counts["duplicates"], 2, "{counts}");
}

#[test]
fn a_batch_that_meets_a_stored_id_stores_its_new_messages_once() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("overlap");
    let path = format!("/api/tenants/{tenant}");
    let mut amqp = Amqp::connect();
    let ids: Vec<String> = (0..50).map(|_| Uuid::new_v4().to_string()).collect();
    for id in &ids[..10] {
        amqp.publish(&queue_name(&tenant), br#"{"first": true}"#, Some(id));
    }
    amqp.wait_confirms();
    app.wait_rows(&tenant, 10);
    let paused = app.request("PATCH", &path, Some(r#"{"status":"inactive"}"#));
    assert_eq!(paused.status, 200, "{}", paused.text());
    // Redeliveries of the first 10 among 40 new ones, queued while paused: one burst.
    for id in &ids {
        amqp.publish(&queue_name(&tenant), br#"{"again": true}"#, Some(id));
    }
    amqp.wait_confirms();
    let resumed = app.request("PATCH", &path, Some(r#"{"status":"active"}"#));
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    app.wait_rows(&tenant, 50);
    wait_until(Duration::from_secs(10), "all 60 acked", || {
        amqp.queue_stats(&queue_name(&tenant)) == Some((0, 1))
    });
    let counts = app.get(&path).json()["counts"].clone();
    assert_eq!(counts["stored"], 50, "{counts}");
    assert_eq!(counts["duplicates"], 10, "{counts}");
    let first: i64 = app
        .pg()
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE payload ? 'first'",
                partition_name(&tenant)
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(first, 10, "a redelivery never overwrites what was stored");
}

#[test]
fn post_messages_publishes_to_the_tenant_queue_with_a_confirm() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("curl");
    let reply = app.request(
        "POST",
        &format!("/api/tenants/{tenant}/messages"),
        Some(r#"{"a": 1}"#),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    let id = reply.json()["id"].as_str().unwrap().to_string();
    app.wait_rows(&tenant, 1);
    let payload: serde_json::Value = app
        .pg()
        .query_one(
            "SELECT payload FROM messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(payload, json!({"a": 1}));
    app.request(
        "POST",
        &format!("/api/tenants/{tenant}/messages"),
        Some("nope"),
    )
    .assert_error(400, "invalid json");
}

#[test]
fn consumers_come_back_after_a_restart_without_any_request() {
    let mut app = TestApp::spawn();
    let a = app.create_tenant("a");
    let b = app.create_tenant("b");
    let paused = app.create_tenant_with(json!({"name": "p", "status": "inactive"}));
    let paused = paused["id"].as_str().unwrap().to_string();
    app.restart();
    let mut amqp = Amqp::connect();
    for t in [&a, &b] {
        wait_until(
            Duration::from_secs(10),
            "a consumer per active tenant",
            || amqp.consumers(&queue_name(t)) == 1,
        );
    }
    assert_eq!(amqp.consumers(&queue_name(&paused)), 0);
    amqp.publish(&queue_name(&a), b"{\"after\": \"restart\"}", None);
    amqp.wait_confirms();
    app.wait_rows(&a, 1);
    let replica = app.app.as_ref().unwrap().replica_id().to_string();
    let share = format!("replica {replica} took its share");
    assert_eq!(
        crate::support::logs::lines_with(&[&share, "2 active tenants, 2 started here"]).len(),
        1
    );
}
