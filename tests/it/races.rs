//! Two requests meeting one tenant, raced a hundred times each: whatever the interleaving, GET
//! tells the truth afterwards (a consumer exactly when active, running at the tenant's
//! concurrency), and a deleted tenant leaves no queue, no consumer and no thread behind.

use std::sync::Barrier;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{queue_name, tenant_thread, threads_named, wait_until, Amqp, Reply, TestApp};

const RACES: usize = 100;

/// Sends both requests at the same moment; their replies in order.
fn race(app: &TestApp, a: (&str, &str, Value), b: (&str, &str, Value)) -> (Reply, Reply) {
    let barrier = Barrier::new(2);
    let base = app.base();
    let send = |(method, path, body): (&str, &str, Value)| {
        let body = (!body.is_null()).then(|| body.to_string());
        barrier.wait();
        crate::support::http::request(&base, method, path, body.as_deref().map(str::as_bytes))
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| send(a));
        let second = send(b);
        (first.join().unwrap(), second)
    })
}

/// What GET says agrees with the broker and with this process's threads.
fn assert_truthful(app: &TestApp, amqp: &mut Amqp, tenant: &str) -> Value {
    let view = app.get(&format!("/api/tenants/{tenant}")).json();
    let consumers = amqp.consumers(&queue_name(tenant));
    match view["status"].as_str() {
        Some("active") => {
            assert_eq!(view["consumer"]["state"], "running", "{view}");
            assert_eq!(view["consumer"]["workers"], view["workers"], "{view}");
            assert_eq!(consumers, 1, "one consumer on the queue: {view}");
        }
        Some("inactive") => {
            assert_eq!(view["consumer"], Value::Null, "{view}");
            assert_eq!(consumers, 0, "no consumer on the queue: {view}");
            assert_no_threads(tenant);
        }
        other => panic!("status {other:?}: {view}"),
    }
    view
}

fn assert_no_threads(tenant: &str) {
    wait_until(
        Duration::from_secs(2),
        "the tenant's threads to end",
        || threads_named(&tenant_thread(tenant)) == 0,
    );
}

fn path(tenant: &str) -> String {
    format!("/api/tenants/{tenant}")
}

#[test]
fn delete_racing_a_resume_leaves_nothing_behind() {
    let app = TestApp::spawn();
    let mut amqp = Amqp::connect();
    for _ in 0..RACES {
        let tenant = app.create_tenant_with(json!({"name": "doomed", "status": "inactive"}));
        let tenant = tenant["id"].as_str().unwrap().to_string();
        let (deleted, resumed) = race(
            &app,
            ("DELETE", &path(&tenant), Value::Null),
            ("PATCH", &path(&tenant), json!({"status": "active"})),
        );
        assert_eq!(deleted.status, 204, "{}", deleted.text());
        assert!(
            [200, 404].contains(&resumed.status),
            "resume: {} {}",
            resumed.status,
            resumed.text()
        );
        app.get(&path(&tenant)).assert_error(404, "not found");
        assert_eq!(
            amqp.queue_stats(&queue_name(&tenant)),
            None,
            "queue deleted"
        );
        assert_no_threads(&tenant);
    }
    assert!(app.tenant_ids().is_empty());
}

#[test]
fn pause_racing_resume_ends_with_a_consumer_exactly_when_active() {
    let app = TestApp::spawn();
    let mut amqp = Amqp::connect();
    let tenant = app.create_tenant("toggled");
    let mut outcomes = std::collections::HashSet::new();
    for i in 0..RACES {
        let (first, second) = if i % 2 == 0 {
            ("active", "inactive")
        } else {
            ("inactive", "active")
        };
        let (a, b) = race(
            &app,
            ("PATCH", &path(&tenant), json!({ "status": first })),
            ("PATCH", &path(&tenant), json!({ "status": second })),
        );
        assert_eq!(
            (a.status, b.status),
            (200, 200),
            "{} / {}",
            a.text(),
            b.text()
        );
        let view = assert_truthful(&app, &mut amqp, &tenant);
        outcomes.insert(view["status"].as_str().unwrap().to_string());
    }
    assert_eq!(outcomes.len(), 2, "both orders happened: {outcomes:?}");
    let unclean = crate::support::logs::lines_with(&[&tenant, "closing the consumer failed"]);
    assert!(unclean.is_empty(), "every stop closed cleanly: {unclean:?}");
}

#[test]
fn resize_racing_pause_or_resume_keeps_the_answered_concurrency() {
    let app = TestApp::spawn();
    let mut amqp = Amqp::connect();
    let tenant = app.create_tenant("resized");
    let concurrency = format!("{}/config/concurrency", path(&tenant));
    for i in 0..RACES {
        // Alternately racing a pause of a running consumer and a resume of a paused one,
        // where the resize lands while the consumer is still connecting.
        let status = if i % 2 == 0 { "inactive" } else { "active" };
        let workers = 1 + (i % 7) as u64;
        let (resized, changed) = race(
            &app,
            ("PUT", &concurrency, json!({ "workers": workers })),
            ("PATCH", &path(&tenant), json!({ "status": status })),
        );
        assert_eq!(resized.status, 200, "{}", resized.text());
        assert_eq!(resized.json()["workers"], workers);
        assert_eq!(changed.status, 200, "{}", changed.text());
        let view = assert_truthful(&app, &mut amqp, &tenant);
        assert_eq!(view["status"], status);
        assert_eq!(view["workers"], workers, "the row keeps what PUT answered");
    }
}
