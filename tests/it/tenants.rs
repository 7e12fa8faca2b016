//! Creating and reading tenants, the seed's three checks, and every way a request can be wrong.

use serde_json::json;

use crate::support::{partition_name, queue_name, wait_until, TestApp};
use std::time::Duration;

#[test]
fn seed_checks_partition_and_consumer_exist_after_create() {
    let app = TestApp::spawn();
    let body = json!({
        "name": "Test Partition",
        "description": "Test tenant for partition verification",
        "status": "active"
    });
    let reply = app.request("POST", "/api/tenants", Some(&body.to_string()));
    assert_eq!(reply.status, 201, "{}", reply.text());
    let tenant = reply.json();
    let id = tenant["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "id is a UUID: {id}");
    assert_eq!(tenant["name"], "Test Partition");
    assert_eq!(
        tenant["description"],
        "Test tenant for partition verification"
    );
    assert_eq!(tenant["status"], "active");
    for field in ["created_at", "updated_at"] {
        let at = tenant[field].as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339");
        assert_eq!(parsed.offset().local_minus_utc(), 0, "{field} is UTC: {at}");
        assert!(at.ends_with('Z'), "{at}");
    }

    // psql -c "SELECT tablename FROM pg_tables WHERE tablename LIKE 'messages_%'"
    let tables: Vec<String> = app
        .pg()
        .query(
            "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'messages_%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec![partition_name(id)]);
    let attached: bool = app
        .pg()
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = 'messages'::regclass
                             AND inhrelid = $1::text::regclass)",
            &[&partition_name(id)],
        )
        .unwrap()
        .get(0);
    assert!(attached, "the partition is attached to messages");

    // rabbitmqctl list_consumers: one consumer on tenant_<id>_queue
    let mut amqp = crate::support::Amqp::connect();
    assert_eq!(amqp.consumers(&queue_name(id)), 1);
}

#[test]
fn get_and_list_show_created_tenants() {
    let app = TestApp::spawn();
    let a = app.create_tenant("a");
    let b = app.create_tenant_with(json!({"name": "b", "status": "inactive"}));
    let got = app.get(&format!("/api/tenants/{a}"));
    assert_eq!(got.status, 200);
    let got = got.json();
    assert_eq!(got["id"], a.as_str());
    assert_eq!(got["workers"], 3);
    assert_eq!(got["description"], serde_json::Value::Null);
    assert_eq!(got["queue"]["name"], queue_name(&a));
    assert_eq!(got["queue"]["consumers"], 1);

    let list = app.get("/api/tenants").json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![a.as_str(), b["id"].as_str().unwrap()]);
    assert_eq!(list["next_cursor"], serde_json::Value::Null);
}

#[test]
fn inactive_tenant_has_queue_and_partition_but_no_consumer() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "paused", "status": "inactive"}));
    let id = tenant["id"].as_str().unwrap();
    let mut amqp = crate::support::Amqp::connect();
    assert_eq!(amqp.queue_stats(&queue_name(id)), Some((0, 0)));
    assert_eq!(app.partition_rows(id), 0);
}

#[test]
fn bad_requests_get_a_json_error_and_create_nothing() {
    let app = TestApp::spawn();
    let post = |body: &str| app.request("POST", "/api/tenants", Some(body));
    post("{not json").assert_error(400, "invalid json");
    post("").assert_error(400, "empty");
    post(r#"{"name": 5}"#).assert_error(400, "invalid type");
    post(r#"{"description": "no name"}"#).assert_error(400, "missing field `name`");
    post(r#"{"name": "x", "status": "sleeping"}"#).assert_error(400, "unknown variant");
    post(r#"{"name": "x", "status": "deleting"}"#).assert_error(400, "unknown variant");
    post(r#"{"name": "x", "status": null}"#).assert_error(400, "invalid type: null");
    post(r#"{"name": "x", "colour": "red"}"#).assert_error(400, "unknown field");
    post(r#"{"name": ""}"#).assert_error(400, "name must not be empty");
    post(&json!({ "name": "é".repeat(201) }).to_string()).assert_error(400, "at most 200");
    post(r#"{"name": "nul\u0000"}"#).assert_error(400, "nul");
    post(r#"[1, 2]"#).assert_error(400, "invalid type");
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(1024 * 1024));
    post(&big).assert_error(413, "larger than");

    app.get("/api/tenants/not-a-uuid")
        .assert_error(400, "not a tenant id");
    let unknown = uuid::Uuid::new_v4();
    app.get(&format!("/api/tenants/{unknown}"))
        .assert_error(404, "not found");
    app.request(
        "POST",
        &format!("/api/tenants/{unknown}/messages"),
        Some("{}"),
    )
    .assert_error(404, "not found");
    app.get("/api/nothing-here")
        .assert_error(404, "no such path");
    app.get("/").assert_error(404, "no such path");
    let reply = app.request("DELETE", "/api/tenants", None);
    reply.assert_error(405, "not allowed");
    assert_eq!(reply.header("allow"), Some("GET, POST"));

    // A name of exactly 200 characters is fine.
    app.create_tenant(&"é".repeat(200));
    assert_eq!(
        app.tenant_ids().len(),
        1,
        "only the valid request created a tenant"
    );
    let partitions: i64 = app
        .pg()
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'messages'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(partitions, 1);
}

#[test]
fn healthz_answers_once_tenantd_accepts_requests() {
    let app = TestApp::spawn();
    let reply = app.get("/healthz");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["status"], "ok");
}

#[test]
fn create_is_all_or_nothing_when_the_broker_is_down() {
    let proxy = crate::support::proxy::Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let app = TestApp::spawn_with(|c| c.rabbitmq_url = url);
    let before = app.create_tenant("before the outage");
    proxy.cut();
    let reply = app.request("POST", "/api/tenants", Some(r#"{"name": "during"}"#));
    reply.assert_error(503, "broker");
    app.get("/readyz")
        .assert_error(503, "message broker unavailable");
    assert_eq!(
        app.get("/healthz").status,
        200,
        "liveness does not depend on the broker"
    );
    assert_eq!(
        app.tenant_ids(),
        vec![before.clone()],
        "no row was left behind"
    );
    let partitions: i64 = app
        .pg()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'messages_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(partitions, 1, "no partition was left behind");
    proxy.restore();
    // The tenant that existed gets its consumer back by itself.
    let mut amqp = crate::support::Amqp::connect();
    wait_until(Duration::from_secs(20), "the consumer to reconnect", || {
        amqp.consumers(&queue_name(&before)) == 1
    });
    app.create_tenant("after the outage");
    assert_eq!(app.get("/readyz").status, 200);
}
