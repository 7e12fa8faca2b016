//! The shared pool serves tenants in turn: a tenant's batch does not wait behind every batch
//! another tenant has queued before it.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::support::{lock_partition, partition_name, queue_name, wait_until, TestApp};

/// The value of a series without labels in `/metrics`.
fn gauge(app: &TestApp, series: &str) -> f64 {
    app.get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn waiting(app: &TestApp, n: f64) {
    wait_until(
        Duration::from_secs(10),
        &format!("{n} batches waiting"),
        || gauge(app, "tenantd_batches_waiting") == n,
    )
}

/// When each stored row's transaction began, oldest first: one value per batch.
fn stored_at(app: &TestApp, tenant: &str) -> Vec<DateTime<Utc>> {
    let sql = format!(
        "SELECT DISTINCT created_at FROM {} ORDER BY 1",
        partition_name(tenant)
    );
    let rows = app.pg().query(&sql, &[]).expect("reading created_at");
    rows.iter().map(|r| r.get(0)).collect()
}

#[test]
fn a_tenant_arriving_later_is_stored_before_the_busy_tenants_queued_batches() {
    // One thread and one message per batch: every message is a batch, and the order in which
    // the thread takes them is the order in which their transactions begin.
    let mut app = TestApp::spawn_with(|c| {
        c.pool_size = 1;
        c.batch_size = 1;
        c.default_workers = 3;
    });
    let busy = app.create_tenant("busy");
    let quiet = app.create_tenant("quiet");

    // The only thread blocks on the busy tenant's first batch; its next two wait for it.
    let mut locker = app.pg();
    let lock = lock_partition(&mut locker, &busy);
    for i in 0..3 {
        app.amqp.publish(
            &queue_name(&busy),
            format!("{{\"n\":{i}}}").as_bytes(),
            None,
        );
    }
    waiting(&app, 2.0);
    app.amqp.publish(&queue_name(&quiet), b"{\"n\":0}", None);
    waiting(&app, 3.0);
    lock.commit().expect("releasing the partition");

    app.wait_rows(&busy, 3);
    app.wait_rows(&quiet, 1);
    let busy_batches = stored_at(&app, &busy);
    let quiet_batch = stored_at(&app, &quiet)[0];
    assert_eq!(busy_batches.len(), 3, "one transaction per busy batch");
    assert!(
        busy_batches[0] < quiet_batch && quiet_batch < busy_batches[1],
        "the quiet tenant's batch ({quiet_batch}) went between the busy tenant's first and \
         second ({busy_batches:?})"
    );
    app.stop();
}
