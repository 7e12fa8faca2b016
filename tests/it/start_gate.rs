//! Tenants started together: claim waves follow each other only while they start consumers, and
//! a consumer held at the start gate does not consume past the replica's fence.

use std::time::{Duration, Instant};

use crate::support::proxy::Proxy;
use crate::support::{
    amqp_host_port, amqp_url_via, logs, rabbitmq_url, thread_ticks, wait_until, TestApp,
};

fn commits(pg: &mut postgres::Client) -> i64 {
    pg.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
    let sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()";
    pg.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn refused_claims_of_more_than_a_wave_do_not_spin_the_coordinator() {
    let app = TestApp::spawn();
    let mut pg = app.pg();
    pg.batch_execute(
        "INSERT INTO tenants (id, name, status)
           SELECT gen_random_uuid(), 'refused-' || n, 'inactive' FROM generate_series(1, 300) n;
         INSERT INTO consumers (tenant_id, replica_id, state)
           SELECT id, NULL, 'stopped' FROM tenants WHERE name LIKE 'refused-%'",
    )
    .unwrap();
    // Another transaction holds their claims' rows: every claim of them is refused.
    let mut blocker = app.pg();
    let mut lock = blocker.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM consumers c JOIN tenants t ON t.id = c.tenant_id
         WHERE t.name LIKE 'refused-%' FOR UPDATE OF c",
        &[],
    )
    .unwrap();
    pg.batch_execute(
        "UPDATE tenants SET status = 'active', version = version + 1 WHERE name LIKE 'refused-%';
         SELECT pg_notify('tenantd', 'all')",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, tx0, t0) = (
        thread_ticks("coordinator"),
        commits(&mut pg),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(3));
    let (cpu1, tx1) = (thread_ticks("coordinator"), commits(&mut pg));
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu1 - cpu0) as f64 / 100.0 / secs;
    let rate = (tx1 - tx0) as f64 / secs;
    lock.rollback().unwrap();
    assert!(
        rate < 50.0,
        "{rate:.0} transactions/s while the claims are refused"
    );
    assert!(cpu < 0.2, "the coordinator at {:.0}% CPU", cpu * 100.0);
}

#[test]
fn a_consumer_ready_before_the_fence_does_not_start_consuming_after_it() {
    // The first broker address hangs every connect for CONNECT_TIMEOUT_MS, then the next is
    // tried: one tenant's thread is ready and held at the gate while the other is stuck.
    let proxy = Proxy::start(&amqp_host_port());
    let url = format!("{},{}", amqp_url_via(proxy.port()), rabbitmq_url());
    let app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(2); // fence at F/2 = 1 s: before the gate's stall ends
        c.rabbitmq_url = url;
    });
    let replica = app.config.replica_id.clone();
    let tenants = [app.create_tenant("gated-a"), app.create_tenant("gated-b")];
    for t in &tenants {
        let body = r#"{"status":"inactive"}"#;
        let r = app.request("PATCH", &format!("/api/tenants/{t}"), Some(body));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    proxy.freeze();
    // The log is the whole test binary's: only what comes after this point is this test's.
    let before = logs::lines_with(&[]).len();
    let since_here = move || logs::lines_with(&[]).split_off(before);
    // The heart's row is held: no heartbeat from now on, and the fence fires at F/2.
    let mut pg = app.pg();
    let mut blocker = app.pg();
    let mut lock = blocker.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM replicas WHERE id = $1 FOR UPDATE",
        &[&replica],
    )
    .unwrap();
    pg.batch_execute(&format!(
        "UPDATE tenants SET status = 'active', version = version + 1 WHERE id IN ('{}', '{}');
         SELECT pg_notify('tenantd', 'x')",
        tenants[0], tenants[1]
    ))
    .unwrap();
    let fenced = || since_here().iter().any(|l| l.contains("no heartbeat for"));
    wait_until(Duration::from_secs(15), "the fence to fire", fenced);
    // Both threads' connects and the gate's wait end well within this; neither consumes while
    // the replica is fenced (nor before: the fence came before either was let through).
    let watched = Instant::now() + Duration::from_secs(5);
    let mut started = 0;
    while Instant::now() < watched {
        started = since_here()
            .iter()
            .filter(|l| l.contains("consumer started") && tenants.iter().any(|t| l.contains(t)))
            .count();
        assert_eq!(
            started, 0,
            "a consumer started while the replica was fenced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The fence's stop reached both before they consumed.
    let stopped = || {
        tenants.iter().all(|t| {
            since_here()
                .iter()
                .any(|l| l.contains("consumer stopped before it consumed") && l.contains(t))
        })
    };
    wait_until(
        Duration::from_secs(10),
        "both threads to stop unconsumed",
        stopped,
    );
    lock.rollback().unwrap();
    assert_eq!(started, 0);
}
