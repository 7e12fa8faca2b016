//! Queues a create left without a tenant (interrupted between declaring them and inserting the
//! row) are removed once the grace has passed, with a log line and a metric; queues of a create
//! still within the grace, and a tenant's own, are left alone.

use std::time::Duration;

use uuid::Uuid;

use crate::support::logs::lines_with;
use crate::support::{dlq_name, queue_name, retry_name, wait_until, Amqp, TestApp};

fn names(id: &str) -> [String; 3] {
    [queue_name(id), retry_name(id), dlq_name(id)]
}

fn records(app: &TestApp, id: &str) -> i64 {
    app.pg()
        .query_one(
            "SELECT count(*) FROM tenant_creates WHERE tenant_id = $1::text::uuid",
            &[&id],
        )
        .unwrap()
        .get(0)
}

fn scrape(app: &TestApp, series: &str) -> Option<f64> {
    let text = app.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn queues_a_create_left_without_a_tenant_are_swept_after_the_grace_and_no_others() {
    let app = TestApp::spawn();
    let tenant = app.create_tenant("kept");
    assert_eq!(
        records(&app, &tenant),
        0,
        "a finished create leaves no record"
    );
    let mut amqp = Amqp::connect();
    // What two interrupted creates leave: their record and their queues, one older than the
    // grace (ten minutes), one younger (its create may still be under way).
    let (old, young) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    for id in [&old, &young] {
        for name in names(id) {
            amqp.declare(&name);
        }
    }
    app.pg()
        .execute(
            "INSERT INTO tenant_creates (tenant_id, started_at)
             VALUES ($1::text::uuid, now() - interval '11 minutes'), ($2::text::uuid, now())",
            &[&old, &young],
        )
        .unwrap();

    wait_until(
        Duration::from_secs(40),
        "the old create's queues and record removed",
        || {
            records(&app, &old) == 0
                && names(&old)
                    .iter()
                    .all(|name| amqp.queue_stats(name).is_none())
        },
    );
    let logged = lines_with(&[&old, "orphan queues removed"]);
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(
        scrape(&app, "tenantd_orphan_queues_removed_total"),
        Some(3.0)
    );

    // The same sweep left the younger create and the tenant alone.
    assert_eq!(records(&app, &young), 1);
    for name in names(&young).iter().chain(names(&tenant).iter()) {
        assert!(amqp.queue_stats(name).is_some(), "{name} is still there");
    }
    assert_eq!(amqp.consumers(&queue_name(&tenant)), 1);
    for name in names(&young) {
        amqp.delete_queue(&name);
    }
}

#[test]
fn a_sweep_waiting_on_the_database_does_not_hold_up_shutdown() {
    let mut app = TestApp::spawn_with(|c| c.statement_timeout = Duration::from_secs(300));
    let mut pg = app.pg();
    let mut lock = pg.transaction().unwrap();
    lock.batch_execute("LOCK TABLE tenant_creates IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let mut watch = app.pg();
    wait_until(
        Duration::from_secs(30),
        "a sweep waiting on the database",
        || {
            let waiting: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE '%tenant_creates%'",
                    &[],
                )
                .unwrap()
                .get(0);
            waiting > 0
        },
    );
    let limit = app.config.shutdown_timeout + Duration::from_secs(2);
    let stopping = std::thread::spawn(move || {
        app.stop();
        app
    });
    wait_until(limit, "the shutdown, within SHUTDOWN_TIMEOUT", || {
        stopping.is_finished()
    });
    lock.rollback().unwrap();
    drop(stopping.join().unwrap());
}
