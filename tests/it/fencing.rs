//! The fence against the coordinator's own timing: a consumer this replica starts must be
//! covered by the fence exactly like one it already ran, and a hand-over must keep heartbeating
//! so the fence never cuts its drains short.

use std::time::Duration;

use postgres::Client;

use crate::support::{
    lock_partition, queue_name, tenant_thread, threads_named, wait_until, Amqp, TestApp,
};

/// Another replica on `app`'s database, with its own id.
fn second_replica(
    app: &TestApp,
    name: &str,
    adjust: impl FnOnce(&mut tenantd::Config),
) -> tenantd::App {
    let mut config = app.config.clone();
    config.replica_id = format!("{}-{name}", app.config.replica_id);
    config.http_addr = "127.0.0.1:0".into();
    adjust(&mut config);
    tenantd::start(config).expect("the second replica starts")
}

/// Whether one of the replica's sessions (its coordinator's, its heart's) waits on a lock in a
/// statement containing `what`.
fn coordinator_waits_in(pg: &mut Client, replica: &str, what: &str) -> bool {
    let names = session_names(replica);
    let pattern = format!("%{what}%");
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = ANY($1) AND wait_event_type = 'Lock' AND query LIKE $2",
        &[&names, &pattern],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// The application names of the replica's coordinator and heart sessions.
fn session_names(replica: &str) -> Vec<String> {
    vec![
        format!("tenantd coordinator {replica}"),
        format!("tenantd replica {replica}"),
    ]
}

fn is_live(pg: &mut Client, replica: &str) -> bool {
    pg.query_one(
        "SELECT count(*) FROM live_replicas WHERE id = $1",
        &[&replica],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

fn claim_of(pg: &mut Client, tenant: &str) -> (Option<String>, String) {
    let row = pg
        .query_one(
            "SELECT replica_id, state FROM consumers WHERE tenant_id = $1::text::uuid",
            &[&tenant],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// A claim behind a locked row must not stop the replica: the tenant is skipped and tried
/// again each tick, heartbeats go on, and the fence leaves the other consumer running. Once the row is free the tenant runs; when then the replica's heartbeats
/// block and its session ends, another replica takes the tenant (the last heartbeat is old),
/// and the first must not still consume it.
#[test]
fn a_claim_behind_a_locked_row_does_not_fence_the_replica() {
    let app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(2);
        c.shutdown_timeout = Duration::from_secs(3);
    });
    let replica = app.config.replica_id.clone();
    let fenced = app.create_tenant("fenced");
    let late = app.create_tenant("claimed-late");
    let paused = app.request(
        "PATCH",
        &format!("/api/tenants/{late}"),
        Some(r#"{"status":"inactive"}"#),
    );
    assert_eq!(paused.status, 200, "{}", paused.text());
    let mut pg = app.pg();
    let mut amqp = Amqp::connect();

    // The claim of `late` will wait on its row of `consumers`.
    let mut claim_blocker = app.pg();
    let mut claim_lock = claim_blocker.transaction().unwrap();
    claim_lock
        .execute(
            "SELECT 1 FROM consumers WHERE tenant_id = $1::text::uuid FOR UPDATE",
            &[&late],
        )
        .unwrap();
    // Resumed behind the API's back (the API would wait for the claim).
    pg.batch_execute(&format!(
        "UPDATE tenants SET status = 'active', version = version + 1 WHERE id = '{late}';
         SELECT pg_notify('tenantd', '{late}')"
    ))
    .unwrap();
    let seen = |pg: &mut Client| -> f64 {
        pg.query_one(
            "SELECT extract(epoch FROM seen_at)::float8 FROM replicas WHERE id = $1",
            &[&replica],
        )
        .unwrap()
        .get(0)
    };
    // Heartbeats go on past the fence's limit (F/2), the claim retried meanwhile.
    let before = seen(&mut pg);
    wait_until(Duration::from_secs(5), "heartbeats past F/2", || {
        seen(&mut pg) > before + 1.5
    });
    assert_ne!(threads_named(&tenant_thread(&fenced)), 0, "the fence fired");
    assert!(
        claim_of(&mut pg, &late).0.is_none(),
        "not claimed while its row is locked"
    );

    claim_lock.commit().unwrap();
    wait_until(Duration::from_secs(5), "the claim to succeed", || {
        claim_of(&mut pg, &late) == (Some(replica.clone()), "running".into())
    });
    // From here the replica's heartbeats (and its rejoining) wait on its row of `replicas`.
    let mut heartbeat_blocker = app.pg();
    let heartbeat_lock = block_heartbeats(&mut heartbeat_blocker, &replica);
    wait_until(Duration::from_secs(5), "the next heartbeat to wait", || {
        coordinator_waits_in(&mut pg, &replica, "UPDATE replicas SET seen_at")
    });
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = ANY($1)",
        &[&session_names(&replica)],
    )
    .unwrap();
    wait_until(Duration::from_secs(5), "the replica to look dead", || {
        !is_live(&mut pg, &replica)
    });

    // With a longer failover timeout: its own fence must not fire between two heartbeats.
    let other = second_replica(&app, "b", |c| c.failover_timeout = Duration::from_secs(4));
    let other_id = other.replica_id().to_string();
    wait_until(
        Duration::from_secs(10),
        "the other replica to run it",
        || claim_of(&mut pg, &late) == (Some(other_id.clone()), "running".into()),
    );
    wait_until(
        Duration::from_secs(3),
        "one consumer on the queue: the silent replica must not still consume it",
        || amqp.consumers(&queue_name(&late)) == 1,
    );
    drop(heartbeat_lock);
    other.shutdown().expect("the second replica stops cleanly");
}

/// Claims go many tenants to a statement: one row locked elsewhere (an operator's transaction,
/// a peer's release stalled mid-transaction) must hold back its own tenant only, not every
/// tenant claimed with it.
#[test]
fn a_locked_row_holds_back_its_own_claim_only() {
    let app = TestApp::spawn_with(|c| c.failover_timeout = Duration::from_secs(4));
    let replica = app.config.replica_id.clone();
    let locked = app.create_tenant("claim-locked");
    let free = app.create_tenant("claim-free");
    for t in [&locked, &free] {
        let paused = app.request(
            "PATCH",
            &format!("/api/tenants/{t}"),
            Some(r#"{"status":"inactive"}"#),
        );
        assert_eq!(paused.status, 200, "{}", paused.text());
    }
    let mut pg = app.pg();
    let mut blocker = app.pg();
    let mut lock = blocker.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM consumers WHERE tenant_id = $1::text::uuid FOR UPDATE",
        &[&locked],
    )
    .unwrap();
    // Both resumed at once behind the API's back (the API would wait for the claims).
    pg.batch_execute(&format!(
        "UPDATE tenants SET status = 'active', version = version + 1
         WHERE id IN ('{locked}', '{free}');
         SELECT pg_notify('tenantd', '{free}')"
    ))
    .unwrap();
    wait_until(Duration::from_secs(6), "the free tenant to run", || {
        claim_of(&mut pg, &free) == (Some(replica.clone()), "running".into())
    });
    lock.commit().unwrap();
    wait_until(
        Duration::from_secs(6),
        "the locked one to run once free",
        || claim_of(&mut pg, &locked) == (Some(replica.clone()), "running".into()),
    );
}

fn running_on(pg: &mut Client, replica: &str) -> Vec<String> {
    pg.query(
        "SELECT tenant_id::text FROM consumers WHERE replica_id = $1 AND state = 'running'
         ORDER BY tenant_id",
        &[&replica],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A SIGTERM hands the tenants over in waves, each waiting (up to 2 s) until another replica
/// runs it: the coordinator must heartbeat meanwhile, or its fence fires half the failover
/// timeout into the hand-over and stops the later waves' consumers with no time to drain —
/// a batch in flight is then both committed and back in the queue (stored twice without a
/// message id). Here the taker is slow (its broker is cut), so one wave takes the whole 2 s.
#[test]
fn a_hand_over_that_takes_longer_than_half_the_failover_timeout_still_drains_every_wave() {
    use crate::support::proxy::Proxy;
    use crate::support::{amqp_host_port, amqp_url_via};
    let mut app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(3);
        c.shutdown_timeout = Duration::from_secs(15);
    });
    let me = app.config.replica_id.clone();
    // 101 tenants: after the other replica joins, this one keeps 51, two waves (50 + 1).
    let base = app.base();
    std::thread::scope(|s| {
        for part in 0..4 {
            let base = &base;
            s.spawn(move || {
                for i in (part..101).step_by(4) {
                    let body = format!(r#"{{"name":"wave-{i}"}}"#);
                    let reply = crate::support::http::request(
                        base,
                        "POST",
                        "/api/tenants",
                        Some(body.as_bytes()),
                    );
                    assert_eq!(reply.status, 201, "{}", reply.text());
                }
            });
        }
    });
    let broker = Proxy::start(&amqp_host_port());
    let other = second_replica(&app, "b", |c| {
        c.rabbitmq_url = amqp_url_via(broker.port());
        c.failover_timeout = Duration::from_secs(4);
    });
    let other_id = other.replica_id().to_string();
    let mut pg = app.pg();
    wait_until(Duration::from_secs(30), "51 tenants here, 50 there", || {
        running_on(&mut pg, &me).len() == 51 && running_on(&mut pg, &other_id).len() == 50
    });
    // The taker cannot run what it takes: every wave waits its whole 2 s.
    broker.cut();
    let last_wave = running_on(&mut pg, &me).pop().unwrap();

    // A batch of the last wave's tenant, published without an id, waits on its partition.
    let mut amqp = Amqp::connect();
    let mut locker = app.pg();
    let lock = lock_partition(&mut locker, &last_wave);
    amqp.publish(&queue_name(&last_wave), br#"{"late":1}"#, None);
    amqp.wait_confirms();
    wait_until(Duration::from_secs(5), "the message taken", || {
        amqp.queue_stats(&queue_name(&last_wave)) == Some((0, 1))
    });

    let leaving = app.app.take().unwrap();
    let shutdown = std::thread::spawn(move || leaving.shutdown());
    wait_until(
        Duration::from_secs(10),
        "the last wave's consumer to be cancelled",
        || amqp.consumers(&queue_name(&last_wave)) == 0,
    );
    drop(lock); // the batch commits now
    let stopped = shutdown.join().unwrap();
    let (ready, _) = amqp.queue_stats(&queue_name(&last_wave)).unwrap();
    let rows = app.partition_rows(&last_wave);
    let cut_short = crate::support::logs::lines_with(&[&last_wave, "stop deadline passed"]);
    broker.restore();
    other.shutdown().expect("the other replica stops cleanly");
    stopped.expect("a clean shutdown");
    assert_eq!(
        (rows, ready),
        (1, 0),
        "the message is stored once and acked, not also back in the queue; drains cut short: \
         {cut_short:?}"
    );
}

/// Holds the replica's row of `replicas` locked until the transaction ends: its heartbeats (and
/// its rejoining) wait, as they would with its database connection frozen.
fn block_heartbeats<'a>(pg: &'a mut Client, replica: &str) -> postgres::Transaction<'a> {
    let mut lock = pg.transaction().unwrap();
    lock.execute(
        "SELECT 1 FROM replicas WHERE id = $1 FOR UPDATE",
        &[&replica],
    )
    .unwrap();
    lock
}

/// Whether the replica's coordinator has been waiting on a lock in a statement containing
/// `what` for longer than `at_least`.
fn coordinator_waited_in(pg: &mut Client, replica: &str, what: &str, at_least: Duration) -> bool {
    let names = session_names(replica);
    let pattern = format!("%{what}%");
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = ANY($1) AND wait_event_type = 'Lock' AND query LIKE $2
           AND now() - query_start > make_interval(secs => $3)",
        &[&names, &pattern, &at_least.as_secs_f64()],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A resize drains the consumer's channel (up to `SHUTDOWN_TIMEOUT` for a batch stuck in the
/// database) before it opens a new one. A stop that arrives meanwhile — here the fence's, the
/// replica's heartbeats being stuck too — must end the thread then, not after the resize's
/// drain, and above all must not let it open a new consumer on the queue first.
#[test]
fn a_stop_during_a_resize_drain_ends_the_consumer_without_consuming_again() {
    let app = TestApp::spawn_with(|c| {
        c.failover_timeout = Duration::from_secs(2);
        c.shutdown_timeout = Duration::from_secs(6);
    });
    let replica = app.config.replica_id.clone();
    let tenant = app.create_tenant("resized-then-fenced");
    let mut pg = app.pg();
    let mut amqp = Amqp::connect();
    let mut locker = app.pg();
    let lock = lock_partition(&mut locker, &tenant);
    amqp.publish(&queue_name(&tenant), br#"{"stuck":1}"#, None);
    amqp.wait_confirms();
    wait_until(Duration::from_secs(5), "the message taken", || {
        amqp.queue_stats(&queue_name(&tenant)) == Some((0, 1))
    });

    let base = app.base();
    let path = format!("/api/tenants/{tenant}/config/concurrency");
    let resize = std::thread::spawn(move || {
        crate::support::http::request(&base, "PUT", &path, Some(br#"{"workers":2}"#)).status
    });
    wait_until(
        Duration::from_secs(5),
        "the resize's drain to begin",
        || amqp.consumers(&queue_name(&tenant)) == 0,
    );
    // The replica's heartbeats now wait: its fence tells every consumer to stop, at once.
    let mut heartbeat_blocker = app.pg();
    let heartbeat_lock = block_heartbeats(&mut heartbeat_blocker, &replica);
    wait_until(Duration::from_secs(5), "the fence to have fired", || {
        coordinator_waited_in(
            &mut pg,
            &replica,
            "UPDATE replicas SET seen_at",
            Duration::from_millis(1500),
        )
    });
    let fenced_at = std::time::Instant::now();
    let started = || crate::support::logs::lines_with(&[&tenant, "consumer started"]).len();
    let mut ended_within = None;
    wait_until(
        Duration::from_secs(10),
        "the consumer thread to end",
        || {
            assert_eq!(started(), 1, "the fenced consumer started again");
            let ended = threads_named(&tenant_thread(&tenant)) == 0;
            if ended {
                ended_within = Some(fenced_at.elapsed());
            }
            ended
        },
    );
    heartbeat_lock.rollback().unwrap();
    drop(lock);
    let _ = resize.join();
    let ended_within = ended_within.unwrap();
    assert!(
        ended_within < Duration::from_secs(2),
        "the stop waited for the resize's drain: {ended_within:?}"
    );
}
