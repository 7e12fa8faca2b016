//! The order of a tenant's session: everything but the consume is made before the start gate
//! (the retry relay's consume included), and the tenant's queue is consumed by name (a missing
//! one answers 404). What a user sees of it: retries still flow, a missing or refused retry
//! queue stores nothing twice, a relay that fails mid-session ends its session in time and keeps
//! its copy, a dead letter refused mid-session drains the session as the relay's failure does,
//! and the queues of a tenant that is gone are never declared again.

use std::time::{Duration, Instant};

use amiquip::{Connection, ConsumerOptions};
use serde_json::json;

use crate::support::{
    dlq_name, logs, queue_name, rabbitmq_url, retry_name, tenant_thread, thread_ticks, wait_until,
    Amqp, TestApp,
};

/// A bare connection that looks queues up passively (one round trip each), for the consumer
/// counts of queues that may not exist.
struct Watch {
    connection: Connection,
}

impl Watch {
    fn new() -> Watch {
        let addr = tenantd::BrokerAddr::parse(&rabbitmq_url()).unwrap();
        let connection =
            tenantd::connect_broker(&addr, Duration::from_secs(5), "review watch").unwrap();
        Watch { connection }
    }

    /// Consumers on `queue` (0 when it does not exist).
    fn consumers(&mut self, queue: &str) -> u32 {
        let channel = self.connection.open_channel(None).unwrap();
        let n = channel
            .queue_declare_passive(queue)
            .ok()
            .and_then(|q| q.declared_consumer_count())
            .unwrap_or(0);
        let _ = channel.close();
        n
    }

    fn exists(&mut self, queue: &str) -> bool {
        let channel = self.connection.open_channel(None).unwrap();
        let found = channel.queue_declare_passive(queue).is_ok();
        let _ = channel.close();
        found
    }
}

/// A paused tenant with `messages` numbered messages (no ids) in its queue.
fn paused_with_backlog(name: &str, messages: i64) -> (TestApp, String, Amqp) {
    let app = TestApp::spawn();
    let tenant = paused_tenant(&app, name);
    let mut amqp = Amqp::connect();
    amqp.publish_numbered(&queue_name(&tenant), messages as usize);
    (app, tenant, amqp)
}

/// A paused tenant's id: its queues are there, nothing consumes them until `activate`.
fn paused_tenant(app: &TestApp, name: &str) -> String {
    let tenant = app.create_tenant_with(json!({"name": name, "status": "inactive"}));
    tenant["id"].as_str().unwrap().to_string()
}

fn activate(app: &TestApp, tenants: &[String]) {
    let ids = tenants
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    app.pg()
        .batch_execute(&format!(
            "UPDATE tenants SET status = 'active', version = version + 1 WHERE id IN ({ids});
             SELECT pg_notify('tenantd', 'x')"
        ))
        .unwrap();
}

fn pause(app: &TestApp, tenant: &str) {
    let r = app.request(
        "PATCH",
        &format!("/api/tenants/{tenant}"),
        Some(r#"{"status":"inactive"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A retry queue missing at a start: the relay's consume fails (404) before the tenant's queue
/// is consumed, and the next session declares the queue. Messages without a UUID `message_id`
/// get a new id at each delivery, so one delivered again after its commit would be stored
/// twice: each is stored once.
#[test]
fn a_retry_queue_missing_at_start_stores_a_backlog_without_ids_once() {
    const N: i64 = 500;
    let (app, tenant, mut amqp) = paused_with_backlog("retryless", N);
    amqp.delete_queue(&retry_name(&tenant));
    activate(&app, std::slice::from_ref(&tenant));
    let mut watch = Watch::new();
    wait_until(Duration::from_secs(30), "the retry queue consumed", || {
        watch.consumers(&retry_name(&tenant)) == 1
    });
    wait_until(Duration::from_secs(30), "the backlog taken", || {
        amqp.queue_stats(&queue_name(&tenant)).map(|s| s.0) == Some(0)
            && app.partition_rows(&tenant) >= N
    });
    let failed = logs::lines_with(&[&tenant, "retrying in"]).len();
    assert!(
        failed >= 1,
        "the relay's consume did not fail: the test proves nothing"
    );
    assert_stored_once(&app, &tenant, N);
}

/// The same where the relay's consume keeps failing (another connection consumes the retry
/// queue exclusively, 403): session after session fails before it takes anything, so no
/// message is stored twice.
#[test]
fn a_relay_that_cannot_consume_does_not_store_the_same_messages_over_and_over() {
    const N: i64 = 100;
    let (app, tenant, _amqp) = paused_with_backlog("retry-held", N);
    // Another client holds the retry queue exclusively: tenantd's consume of it is refused.
    let addr = tenantd::BrokerAddr::parse(&rabbitmq_url()).unwrap();
    let mut holder = tenantd::connect_broker(&addr, Duration::from_secs(5), "holder").unwrap();
    let channel = holder.open_channel(None).unwrap();
    let options = ConsumerOptions {
        exclusive: true,
        ..Default::default()
    };
    let exclusive = channel.basic_consume(retry_name(&tenant), options).unwrap();
    activate(&app, std::slice::from_ref(&tenant));
    wait_until(Duration::from_secs(30), "three failed sessions", || {
        logs::lines_with(&[&tenant, "retrying in"]).len() >= 3
    });
    let rows = app.partition_rows(&tenant);
    drop(exclusive);
    let _ = channel.close();
    let _ = holder.close();
    assert!(
        rows <= N,
        "{rows} rows stored from {N} messages while the relay could not consume"
    );
}

/// The tenant's queue is looked up by consuming it: missing on a thread's first session, the
/// queues are declared and consumed; gone after the thread consumed, the thread ends.
#[test]
fn a_main_queue_missing_is_declared_on_a_first_session_and_ends_a_thread_that_consumed() {
    let app = TestApp::spawn();
    let tenant = paused_tenant(&app, "queueless start");
    let mut amqp = Amqp::connect();
    amqp.delete_queue(&queue_name(&tenant));
    activate(&app, std::slice::from_ref(&tenant));
    let mut watch = Watch::new();
    wait_until(
        Duration::from_secs(20),
        "the queue declared and consumed",
        || {
            watch.consumers(&queue_name(&tenant)) == 1
                && watch.consumers(&retry_name(&tenant)) == 1
                && watch.exists(&dlq_name(&tenant))
        },
    );
    assert!(
        !logs::lines_with(&[&tenant, "does not exist"]).is_empty(),
        "the first session said the queue was missing"
    );
    amqp.publish(&queue_name(&tenant), br#"{"a": 1}"#, None);
    amqp.wait_confirms();
    app.wait_rows(&tenant, 1);

    // Now the main queue goes under the running consumer: the thread ends, declaring nothing.
    amqp.delete_queue(&queue_name(&tenant));
    wait_until(Duration::from_secs(20), "the thread to end", || {
        !logs::lines_with(&[&tenant, "its queue is gone"]).is_empty()
    });
}

/// Queues of a tenant whose row says `deleting` are deleted under a running consumer (the
/// API's order: main, retry, DLQ), at several moments after its consume: every thread ends, and
/// none brings any of them back.
#[test]
fn a_thread_outliving_its_tenant_declares_nothing() {
    let app = TestApp::spawn_with(|c| c.retry_delays = vec![Duration::from_millis(50)]);
    let mut amqp = Amqp::connect();
    let mut watch = Watch::new();
    let delays = [0u64, 100, 300];
    let tenants: Vec<String> = delays
        .iter()
        .map(|d| paused_tenant(&app, &format!("outlived {d}")))
        .collect();
    for (tenant, delay) in tenants.iter().zip(delays) {
        activate(&app, std::slice::from_ref(tenant));
        wait_until(Duration::from_secs(20), "running", || {
            watch.consumers(&queue_name(tenant)) == 1
        });
        std::thread::sleep(Duration::from_millis(delay));
        app.pg()
            .execute(
                "UPDATE tenants SET status = 'deleting' WHERE id = $1::text::uuid",
                &[tenant],
            )
            .unwrap();
        amqp.delete_tenant_queues(tenant);
    }
    for tenant in &tenants {
        wait_until(
            Duration::from_secs(20),
            "the tenant's thread to end",
            || crate::support::threads_named(&tenant_thread(tenant)) == 0,
        );
    }
    for tenant in &tenants {
        for q in [queue_name(tenant), retry_name(tenant), dlq_name(tenant)] {
            assert!(!watch.exists(&q), "{q} came back");
        }
    }
}

/// Resizes open a new channel and a new relay each time: the relay consumes again (once), and
/// a retry copy still goes back and is dead-lettered after its attempts.
#[test]
fn resizes_reopen_the_relay_and_retries_still_flow() {
    let app = TestApp::spawn_with(|c| c.retry_delays = vec![Duration::from_millis(300); 3]);
    let tenant = app.create_tenant("resized relay");
    let mut amqp = Amqp::connect();
    let mut watch = Watch::new();
    amqp.publish(&queue_name(&tenant), b"not json", None);
    amqp.wait_confirms();
    for workers in [2, 3, 1, 4, 2, 1] {
        let r = app.request(
            "PUT",
            &format!("/api/tenants/{tenant}/config/concurrency"),
            Some(&format!(r#"{{"workers":{workers}}}"#)),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(150));
    }
    wait_until(Duration::from_secs(5), "one relay consumer", || {
        watch.consumers(&retry_name(&tenant)) == 1
    });
    assert_eq!(watch.consumers(&queue_name(&tenant)), 1);
    wait_until(Duration::from_secs(20), "the poison in the DLQ", || {
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0) == Some(1)
    });
}

/// An idle tenant's thread sleeps: nothing in its loop (the relay's timers included) spins it.
#[test]
fn an_idle_tenant_thread_costs_no_cpu() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("idle relay");
    let mut watch = Watch::new();
    wait_until(Duration::from_secs(10), "relay consuming", || {
        watch.consumers(&retry_name(&tenant)) == 1
    });
    let name = tenant_thread(&tenant);
    let ticks = || thread_ticks(&name);
    let t0 = ticks();
    std::thread::sleep(Duration::from_secs(1)); // the interval measured
    let used = ticks() - t0;
    assert!(used <= 2, "{used}% of a core while idle");
}

/// A poison message at the head of a backlog without ids, the retry queue missing at the start:
/// the poison's retry copy could not be routed, and a session that had consumed before finding
/// that out would end with committed batches unacked. The relay finds it first: every message
/// is stored once and the poison is dead-lettered.
#[test]
fn a_poison_message_with_the_retry_queue_missing_at_start_stores_nothing_twice() {
    const N: i64 = 300;
    let app = TestApp::spawn_with(|c| c.retry_delays = vec![Duration::from_millis(100)]);
    let tenant = paused_tenant(&app, "retryless poison");
    let mut amqp = Amqp::connect();
    amqp.publish(&queue_name(&tenant), b"poison", None);
    amqp.wait_confirms();
    amqp.publish_numbered(&queue_name(&tenant), N as usize);
    amqp.delete_queue(&retry_name(&tenant));
    activate(&app, std::slice::from_ref(&tenant));
    stored_and_lettered(&app, &mut amqp, &tenant, N);
    assert_stored_once(&app, &tenant, N);
}

/// The relay's republish is refused (the tenant's queue rejects publishes): each session's relay
/// fails on a channel still open, the session drains and reconnects; a stop still ends the
/// thread at once, and the retry copy is not lost.
#[test]
fn a_relay_whose_republish_is_refused_stops_in_time_and_keeps_its_copy() {
    let vhost = crate::support::vhost::Vhost::create();
    let app = TestApp::spawn_with(|c| {
        c.rabbitmq_url = vhost.url();
        c.retry_delays = vec![Duration::from_millis(1000); 2];
    });
    let tenant = app.create_tenant("refused relay");
    let mut amqp = Amqp::connect_to(&vhost.url());
    amqp.publish(&queue_name(&tenant), b"not json", None);
    amqp.wait_confirms();
    wait_until(Duration::from_secs(20), "first attempt", || {
        !logs::lines_with(&[&tenant, "message failed (attempt 1)"]).is_empty()
    });
    vhost.set_policy(
        "refuse-main",
        &format!("^{}$", queue_name(&tenant)),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    wait_until(Duration::from_secs(30), "two failed releases", || {
        logs::lines_with(&[&tenant, "retrying in", "moving a retry back"]).len() >= 2
    });
    let asked = Instant::now();
    pause(&app, &tenant);
    let name = tenant_thread(&tenant);
    wait_until(Duration::from_secs(20), "the thread to end", || {
        crate::support::threads_named(&name) == 0
    });
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    wait_until(
        Duration::from_secs(5),
        "the copy back in the retry queue",
        || amqp.queue_stats(&retry_name(&tenant)).map(|s| s.0) == Some(1),
    );
}

/// The DLQ is deleted before a poison message among a backlog without ids is taken (no retries:
/// it is dead-lettered at once). Its letter is refused while batches of its own and other
/// messages are committed or in the pool: the session acks what they commit before it ends,
/// so each message is stored once, and the next session declares the DLQ again and takes the
/// letter.
#[test]
fn a_dead_letter_refused_mid_session_stores_nothing_twice() {
    const N: i64 = 2000;
    let app = TestApp::spawn_with(|c| c.retry_delays = Vec::new());
    let tenant = paused_tenant(&app, "letter refused");
    let mut amqp = Amqp::connect();
    for i in 0..N {
        if i == N / 2 {
            amqp.publish(&queue_name(&tenant), b"poison", None);
        }
        amqp.publish(
            &queue_name(&tenant),
            json!({ "i": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    amqp.delete_queue(&dlq_name(&tenant));
    activate(&app, std::slice::from_ref(&tenant));
    stored_and_lettered(&app, &mut amqp, &tenant, N);
    assert!(
        !logs::lines_with(&[&tenant, "copying a failed message"]).is_empty(),
        "the letter was not refused: the test proves nothing"
    );
    assert_stored_once(&app, &tenant, N);
}

/// Waits until the tenant's backlog of `n` messages is stored and its one poison message
/// dead-lettered.
fn stored_and_lettered(app: &TestApp, amqp: &mut Amqp, tenant: &str, n: i64) {
    wait_until(
        Duration::from_secs(60),
        "the backlog stored, the poison dead-lettered",
        || {
            amqp.queue_stats(&queue_name(tenant)).map(|s| s.0) == Some(0)
                && amqp.queue_stats(&dlq_name(tenant)).map(|s| s.0) == Some(1)
                && app.partition_rows(tenant) >= n
        },
    );
}

/// `n` numbered messages (`{"i": …}`, no ids), each stored once.
fn assert_stored_once(app: &TestApp, tenant: &str, n: i64) {
    let distinct: i64 = app
        .pg()
        .query_one(
            &format!(
                "SELECT count(DISTINCT payload->>'i') FROM {}",
                crate::support::partition_name(tenant)
            ),
            &[],
        )
        .unwrap()
        .get(0);
    let rows = app.partition_rows(tenant);
    assert_eq!(distinct, n, "messages missing");
    assert_eq!(rows, n, "messages stored more than once");
}
