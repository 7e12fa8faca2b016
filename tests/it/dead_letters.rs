//! Dead letters an operator can act on: looked at without being taken (with their reasons, in a
//! stable order, a page at a time), dropped, replayed into a paused tenant; bad requests refused.

use std::time::Duration;

use amiquip::AmqpProperties;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::http::request_with;
use crate::support::logs::lines_with;
use crate::support::{dlq_name, queue_name, wait_until, Amqp, Reply, TestApp};

/// `GET /api/tenants/{tenant}/dead-letters?{query}`, asserted 200.
pub fn peek(base: &str, tenant: &str, query: &str) -> Value {
    let path = format!("/api/tenants/{tenant}/dead-letters?{query}");
    let reply = crate::support::http::request(base, "GET", &path, None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// Every dead letter a walk through the pages shows, oldest first.
pub fn peek_all(base: &str, tenant: &str) -> Vec<Value> {
    let mut letters = Vec::new();
    let mut query = "limit=100".to_string();
    loop {
        let page = peek(base, tenant, &query);
        letters.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=100&cursor={cursor}"),
            None => return letters,
        }
    }
}

/// Letters ready in the tenant's DLQ, as the broker counts them.
pub fn dlq_depth(amqp: &mut Amqp, tenant: &str) -> u32 {
    amqp.queue_stats(&dlq_name(tenant))
        .expect("the DLQ exists")
        .0
}

fn post_replay(app: &TestApp, tenant: &str, body: Option<&str>) -> Reply {
    app.request(
        "POST",
        &format!("/api/tenants/{tenant}/dead-letters/replay"),
        body,
    )
}

fn drop_letters(app: &TestApp, tenant: &str, body: Option<&str>) -> Reply {
    app.request(
        "DELETE",
        &format!("/api/tenants/{tenant}/dead-letters"),
        body,
    )
}

/// Puts letters straight into the tenant's DLQ, as a dead-lettering long done would have.
fn fill_dlq(amqp: &mut Amqp, tenant: &str, n: usize) {
    for i in 0..n {
        let body = json!({ "n": i }).to_string();
        amqp.publish(&dlq_name(tenant), body.as_bytes(), None);
    }
    amqp.wait_confirms();
}

fn scrape(app: &TestApp, series: &str) -> Option<f64> {
    let text = app.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn the_peek_shows_each_dead_letter_with_its_reason_and_leaves_them_in_place() {
    let app = TestApp::spawn_with(|c| c.retry_delays = Vec::new());
    let tenant = app.create_tenant("peeked");
    let mut amqp = Amqp::connect();
    let queue = queue_name(&tenant);
    let (not_json, refused) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    amqp.publish(&queue, b"not json", Some(&not_json));
    amqp.publish(&queue, br#"{"nul": "\u0000"}"#, Some(&refused)); // JSON that jsonb refuses
    amqp.publish(&queue, b"{\"good\": 1}", None);
    amqp.publish(&queue, b"\xff\xfe", None); // no id: tenantd gives its copy one
    amqp.wait_confirms();
    app.wait_rows(&tenant, 1);
    wait_until(Duration::from_secs(20), "three dead letters", || {
        dlq_depth(&mut amqp, &tenant) == 3
    });

    let base = app.base();
    let page = peek(&base, &tenant, "");
    assert_eq!(page["total"], 3);
    assert_eq!(page["next_cursor"], Value::Null);
    let letters = page["data"].as_array().unwrap();
    assert_eq!(letters.len(), 3);
    let by_id = |id: &str| letters.iter().find(|l| l["message_id"] == id).unwrap();
    let a = by_id(&not_json);
    assert_eq!(a["payload_encoding"], "base64");
    assert_eq!(a["payload"], "bm90IGpzb24="); // "not json"
    assert_eq!(a["size"], 8);
    assert!(a["reason"].as_str().unwrap().contains("not JSON"), "{a}");
    assert_eq!(a["attempts"], 1);
    let said = lines_with(&["dead-lettered after 1 attempt:", &tenant]);
    assert_eq!(said.len(), 3, "{said:?}");
    let b = by_id(&refused);
    assert_eq!(b["payload_encoding"], "json");
    assert_eq!(b["payload"], json!({"nul": "\u{0}"}));
    assert!(b["reason"]
        .as_str()
        .unwrap()
        .contains("rejected by PostgreSQL"));
    let c = letters.iter().find(|l| l["payload"] == "//4=").unwrap();
    let given = c["message_id"]
        .as_str()
        .expect("tenantd gave the copy an id");
    assert!(Uuid::parse_str(given).is_ok(), "{given}");
    for letter in letters {
        let at = letter["dead_lettered_at"].as_str().unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
        let age = chrono::Utc::now().signed_duration_since(at);
        assert!(age.num_seconds().abs() < 60, "dead-lettered just now: {at}");
    }

    // Looking takes nothing and keeps the order; pages walk the same letters.
    assert_eq!(peek(&base, &tenant, ""), page);
    assert_eq!(dlq_depth(&mut amqp, &tenant), 3);
    let view = app.get(&format!("/api/tenants/{tenant}")).json();
    assert_eq!(view["queue"]["dead_letters"], 3);
    let first = peek(&base, &tenant, "limit=2");
    assert_eq!(first["data"].as_array().unwrap()[..], letters[..2]);
    let cursor = first["next_cursor"].as_str().expect("a second page");
    let second = peek(&base, &tenant, &format!("limit=2&cursor={cursor}"));
    assert_eq!(second["data"].as_array().unwrap()[..], letters[2..]);
    assert_eq!(second["next_cursor"], Value::Null);

    let depth = format!("tenantd_dead_letters{{tenant_id=\"{tenant}\"}}");
    assert_eq!(scrape(&app, &depth), Some(3.0), "the DLQ depth in /metrics");
}

#[test]
fn letters_from_before_show_the_publishers_time_or_none() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "old letters", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    let stamped = AmqpProperties::default().with_timestamp(1_700_000_000);
    amqp.publish_with(&dlq_name(&tenant), b"{\"old\": 1}", stamped);
    amqp.publish_with(
        &dlq_name(&tenant),
        b"{\"old\": 2}",
        AmqpProperties::default(),
    );
    amqp.wait_confirms();
    let letters = peek_all(&app.base(), &tenant);
    let when: Vec<&Value> = letters.iter().map(|l| &l["dead_lettered_at"]).collect();
    assert_eq!(when, [&json!("2023-11-14T22:13:20Z"), &Value::Null]);
    assert_eq!(letters[0]["reason"], Value::Null);
    assert_eq!(letters[0]["attempts"], 0);
    assert_eq!(letters[0]["message_id"], Value::Null);
}

#[test]
fn the_pages_walk_the_oldest_letters_in_order_down_to_the_documented_depth() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "deep", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 1005);
    let base = app.base();
    let letters = peek_all(&base, &tenant);
    let seen: Vec<i64> = letters
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seen,
        (0..1000).collect::<Vec<_>>(),
        "the oldest 1,000, in order"
    );
    assert_eq!(peek(&base, &tenant, "limit=1")["total"], 1005);
    assert_eq!(dlq_depth(&mut amqp, &tenant), 1005, "nothing was taken");
    let past = format!("/api/tenants/{tenant}/dead-letters?cursor=o1000");
    app.get(&past).assert_error(400, "invalid cursor");
}

#[test]
fn drop_empties_what_it_says_and_logs_it_with_the_request_id() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "dropped", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 10);

    let base = app.base();
    let path = format!("/api/tenants/{tenant}/dead-letters");
    let headers = [
        ("Content-Type", "application/json"),
        ("X-Request-Id", "drop-3-oldest"),
    ];
    let reply = request_with(&base, "DELETE", &path, &headers, Some(b"{\"limit\": 3}"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"dropped": 3, "remaining": 7}));
    assert_eq!(dlq_depth(&mut amqp, &tenant), 7);
    let left: Vec<i64> = peek_all(&base, &tenant)
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(left, (3..10).collect::<Vec<_>>(), "the oldest went");
    let logged = lines_with(&["dead letters dropped", &tenant, "request_id=drop-3-oldest"]);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains("dropped=3"), "{logged:?}");

    let reply = drop_letters(&app, &tenant, None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"dropped": 7, "remaining": 0}));
    assert_eq!(dlq_depth(&mut amqp, &tenant), 0);
    let reply = drop_letters(&app, &tenant, Some("{}"));
    assert_eq!(reply.json(), json!({"dropped": 0, "remaining": 0}));
    let dropped = format!("tenantd_dead_letters_dropped_total{{tenant_id=\"{tenant}\"}}");
    assert_eq!(scrape(&app, &dropped), Some(10.0));
}

#[test]
fn a_replay_into_a_paused_tenant_waits_in_its_queue_until_it_resumes() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "paused", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 5);
    let reply = post_replay(&app, &tenant, Some("{}"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"moved": 5, "remaining": 0}));
    assert_eq!(amqp.queue_stats(&queue_name(&tenant)).map(|s| s.0), Some(5));
    assert_eq!(app.partition_rows(&tenant), 0, "paused: nothing stored yet");
    let resume = app.request(
        "PATCH",
        &format!("/api/tenants/{tenant}"),
        Some(r#"{"status": "active"}"#),
    );
    assert_eq!(resume.status, 200, "{}", resume.text());
    app.wait_rows(&tenant, 5);
    let replayed = format!("tenantd_dead_letters_replayed_total{{tenant_id=\"{tenant}\"}}");
    assert_eq!(scrape(&app, &replayed), Some(5.0));
}

#[test]
fn bad_bodies_cursors_and_ids_are_refused_and_unknown_tenants_are_not_found() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "strict", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 2);
    let bodies = [
        r#"{"limit": 0}"#,
        r#"{"limit": -1}"#,
        r#"{"limit": 1.5}"#,
        r#"{"limit": "2"}"#,
        r#"{"limit": null}"#,
        r#"{"limit": 1000000001}"#,
        r#"{"all": true}"#,
        r#"[1]"#,
        "not json",
    ];
    for body in bodies {
        post_replay(&app, &tenant, Some(body)).assert_error(400, "");
        drop_letters(&app, &tenant, Some(body)).assert_error(400, "");
    }
    post_replay(&app, &tenant, Some(r#"{"limit": 0}"#)).assert_error(400, "limit");
    let path = format!("/api/tenants/{tenant}/dead-letters");
    for query in [
        "limit=0",
        "limit=101",
        "limit=x",
        "cursor=bogus",
        "cursor=o0",
    ] {
        app.get(&format!("{path}?{query}")).assert_error(400, "");
    }
    app.get("/api/tenants/nope/dead-letters")
        .assert_error(400, "not a tenant id");
    let unknown = Uuid::new_v4();
    app.get(&format!("/api/tenants/{unknown}/dead-letters"))
        .assert_error(404, "not found");
    post_replay(&app, &unknown.to_string(), None).assert_error(404, "not found");
    drop_letters(&app, &unknown.to_string(), None).assert_error(404, "not found");
    assert_eq!(
        dlq_depth(&mut amqp, &tenant),
        2,
        "nothing was moved or dropped"
    );
    for method in ["PUT", "PATCH"] {
        let reply = app.request(method, &path, Some("{}"));
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("GET, DELETE"));
    }
}

#[test]
fn a_look_at_a_quorum_dead_letter_queue_keeps_its_order_and_count_too() {
    let app = TestApp::spawn_with(|c| c.queue_type = tenantd::QueueType::Quorum);
    let tenant = app.create_tenant_with(json!({"name": "quorum", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 30);
    let base = app.base();
    let first = peek_all(&base, &tenant);
    let order: Vec<i64> = first
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..30).collect::<Vec<_>>());
    assert_eq!(
        peek_all(&base, &tenant),
        first,
        "the same letters, in the same order"
    );
    assert_eq!(dlq_depth(&mut amqp, &tenant), 30);
    let reply = post_replay(&app, &tenant, Some(r#"{"limit": 10}"#));
    assert_eq!(reply.json(), json!({"moved": 10, "remaining": 20}));
    let left: Vec<i64> = peek_all(&base, &tenant)
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(left, (10..30).collect::<Vec<_>>(), "the oldest were moved");
    // Its looks never make the broker drop a letter (RabbitMQ 4 drops a quorum queue's
    // message after 20 deliveries unless told otherwise).
    let arguments = crate::support::vhost::queue_arguments(&dlq_name(&tenant));
    assert!(arguments.contains("x-delivery-limit"), "{arguments}");
    assert!(arguments.contains("2147483647"), "{arguments}");
}

#[test]
fn one_look_replay_or_drop_runs_per_tenant_at_a_time() {
    use crate::support::proxy::Proxy;
    let proxy = Proxy::start(&crate::support::amqp_host_port());
    let url = crate::support::amqp_url_via(proxy.port());
    let app = TestApp::spawn_with(|c| c.rabbitmq_url = url);
    let tenant = app.create_tenant_with(json!({"name": "busy letters", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    fill_dlq(&mut amqp, &tenant, 1000);
    let (base, path) = (
        app.base(),
        format!("/api/tenants/{tenant}/dead-letters/replay"),
    );
    let replay = std::thread::spawn(move || {
        crate::support::http::request(&base, "POST", &path, Some(b"{}"))
    });
    // A replay under way, held there by a broker that stops answering.
    wait_until(Duration::from_secs(60), "the replay under way", || {
        dlq_depth(&mut amqp, &tenant) < 1000
    });
    proxy.freeze();
    let letters = format!("/api/tenants/{tenant}/dead-letters");
    app.get(&letters).assert_error(409, "already running");
    post_replay(&app, &tenant, Some("{}")).assert_error(409, "already running");
    drop_letters(&app, &tenant, Some("{}")).assert_error(409, "already running");
    proxy.cut();
    replay
        .join()
        .unwrap()
        .assert_error(503, "before it stopped");
    proxy.restore();
    // Served again once it answered; what it had not acked is back in the DLQ.
    let left = peek(&app.base(), &tenant, "")["total"].as_u64().unwrap();
    assert!(0 < left && left <= 1000, "{left}");
}

#[test]
fn a_look_holds_at_most_4_mib_of_payloads_and_its_pages_still_reach_every_letter() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant_with(json!({"name": "heavy letters", "status": "inactive"}));
    let tenant = tenant["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    let pad = "x".repeat(60_000);
    for n in 0..100 {
        let body = json!({ "n": n, "pad": pad }).to_string();
        amqp.publish(&dlq_name(&tenant), body.as_bytes(), None);
    }
    amqp.wait_confirms();
    let first = peek(&app.base(), &tenant, "limit=100");
    let shown = first["data"].as_array().unwrap().len();
    assert!(
        (60..=70).contains(&shown),
        "{shown} letters of 60 KB in a page"
    );
    assert_eq!(first["next_cursor"], format!("o{shown}"));
    let n: Vec<i64> = peek_all(&app.base(), &tenant)
        .iter()
        .map(|l| l["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(n, (0..100).collect::<Vec<_>>());
}
