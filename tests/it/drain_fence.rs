//! The fence ends a drain already under way: a consumer told to stop with a long deadline,
//! waiting for a batch the database holds, stops when the replica goes F/2 without a heartbeat,
//! not at its own deadline. Nothing it did not commit is acked; the batch that commits after
//! the fence is stored once, its message back in the queue for the tenant's next owner.

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::support::logs::lines_with;
use crate::support::{
    lock_partition, queue_name, tenant_thread, threads_named, wait_until, Amqp, TestApp,
};

#[test]
fn the_fence_ends_a_drain_under_way_and_acks_nothing_uncommitted() {
    let app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(2);
        c.shutdown_timeout = Duration::from_secs(30);
    });
    let replica = app.config.replica_id.clone();
    let tenant = app.create_tenant("draining");
    let mut amqp = Amqp::connect();
    let mut pg = app.pg();

    // A batch the database holds: the consumer's drain will wait for it.
    let mut partition_holder = app.pg();
    let partition_lock = lock_partition(&mut partition_holder, &tenant);
    let id = Uuid::new_v4().to_string();
    amqp.publish(&queue_name(&tenant), br#"{"held": true}"#, Some(&id));
    amqp.wait_confirms();
    wait_until(Duration::from_secs(10), "the insert to wait", || {
        let waiting: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::text::regclass",
                &[&crate::support::partition_name(&tenant)],
            )
            .unwrap()
            .get(0);
        waiting > 0
    });

    // Paused: the consumer drains, with up to SHUTDOWN_TIMEOUT (30 s) for the batch.
    let base = app.base();
    let path = format!("/api/tenants/{tenant}");
    let pause = std::thread::spawn(move || {
        crate::support::http::request(&base, "PATCH", &path, Some(br#"{"status":"inactive"}"#))
    });
    wait_until(Duration::from_secs(10), "the drain to begin", || {
        amqp.consumers(&queue_name(&tenant)) == 0
    });
    assert!(threads_named(&tenant_thread(&tenant)) > 0, "still draining");

    // The replica's heartbeats stop: its fence fires F/2 = 1 s after the last one.
    let mut heartbeat_holder = app.pg();
    let mut heartbeat_lock = heartbeat_holder.transaction().unwrap();
    heartbeat_lock
        .execute(
            "SELECT 1 FROM replicas WHERE id = $1 FOR UPDATE",
            &[&replica],
        )
        .unwrap();
    let silent_from = Instant::now();
    wait_until(
        Duration::from_secs(6),
        "the drain to end at the fence",
        || threads_named(&tenant_thread(&tenant)) == 0,
    );
    let took = silent_from.elapsed();
    assert!(took < Duration::from_secs(6), "{took:?}");
    let fenced = lines_with(&[&tenant, "fenced: no heartbeat, the drain ends"]);
    assert_eq!(fenced.len(), 1, "{fenced:?}");

    // Nothing was acked: the message is back in the queue. The batch commits once the
    // database lets it (after the fence): stored once, under its id.
    wait_until(
        Duration::from_secs(10),
        "the message back in the queue",
        || amqp.queue_stats(&queue_name(&tenant)) == Some((1, 0)),
    );
    drop(heartbeat_lock);
    partition_lock.rollback().unwrap();
    app.wait_rows(&tenant, 1);
    let reply = pause.join().unwrap();
    assert!(matches!(reply.status, 200 | 202), "{}", reply.text());
    assert_eq!(amqp.queue_stats(&queue_name(&tenant)), Some((1, 0)));
    let stored: i64 = pg
        .query_one(
            "SELECT count(*) FROM messages WHERE tenant_id = $1::text::uuid AND id = $2::text::uuid",
            &[&tenant, &id],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
}
