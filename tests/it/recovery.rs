//! Consumers facing a broker that refuses them and a database that stalls: they retry until
//! they run, readiness says when they do not, and waiting costs no CPU.

use std::time::Duration;

use serde_json::json;

use crate::support::logs::lines_with;
use crate::support::vhost::Vhost;
use crate::support::{partition_name, queue_name, tenant_thread, wait_until, Amqp, TestApp};

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
    // The admin connection and two consumers fit; four consumers are refused at start-up.
    vhost.limit_connections(3);
    app.restart();
    wait_until(Duration::from_secs(10), "four consumers to fail", || {
        gauge(&app.get("/metrics").text(), "tenantd_consumers_failing") == Some(4.0)
    });
    app.get("/readyz").assert_error(
        503,
        "4 tenants should run on this replica but cannot connect",
    );
    let retrying: Vec<serde_json::Value> = tenants
        .iter()
        .map(|t| app.get(&format!("/api/tenants/{t}")).json())
        .filter(|v| v["consumer"]["state"] == "retrying")
        .collect();
    assert_eq!(retrying.len(), 4);
    assert!(
        retrying[0]["consumer"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "GET says why: {}",
        retrying[0]
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

/// CPU ticks (1/100 s) used so far by this process's threads named `name`.
fn cpu_ticks(name: &str) -> u64 {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    tasks
        .filter_map(|t| {
            let path = t.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            if comm.trim_end() != name {
                return None;
            }
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?)
        })
        .sum()
}

#[test]
fn a_pause_waiting_for_a_blocked_batch_costs_no_cpu() {
    let app = TestApp::spawn_with(|c| c.statement_timeout = Duration::ZERO);
    let tenant = app.create_tenant("blocked");
    let mut locker = app.pg();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        partition_name(&tenant)
    ))
    .unwrap();
    let mut amqp = Amqp::connect();
    for i in 0..10 {
        amqp.publish(
            &queue_name(&tenant),
            json!({ "i": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    wait_until(
        Duration::from_secs(10),
        "the batch to reach the pool",
        || app.get(&format!("/api/tenants/{tenant}")).json()["counts"]["consumed"] == 10,
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
    let before = cpu_ticks(&tenant_thread(&tenant));
    std::thread::sleep(Duration::from_secs(1)); // the interval measured
    let used = cpu_ticks(&tenant_thread(&tenant)) - before;
    assert!(used < 5, "the draining tenant used {used}% of a core");
    lock.commit().unwrap();
    let paused = pause.join().unwrap();
    assert_eq!(paused.status, 200, "{}", paused.text());
    app.wait_rows(&tenant, 10);
}

#[test]
fn a_statement_that_hangs_is_cancelled_and_its_batch_retried() {
    let app = TestApp::spawn_with(|c| c.statement_timeout = Duration::from_millis(300));
    let tenant = app.create_tenant("stalled");
    let mut locker = app.pg();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        partition_name(&tenant)
    ))
    .unwrap();
    let mut amqp = Amqp::connect();
    for i in 0..10 {
        amqp.publish(
            &queue_name(&tenant),
            json!({ "i": i }).to_string().as_bytes(),
            None,
        );
    }
    amqp.wait_confirms();
    wait_until(
        Duration::from_secs(10),
        "the stalled insert to be cancelled",
        || !lines_with(&[&tenant, "storing 10 messages failed", "statement timeout"]).is_empty(),
    );
    lock.commit().unwrap();
    app.wait_rows(&tenant, 10);
}
