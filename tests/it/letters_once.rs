//! Each dead message is in its tenant's DLQ once: a copy of a message already dead-lettered
//! (the original redelivered after its letter was confirmed, or a duplicated retry copy) is
//! acked without a second letter, and a replayed letter that fails again is dead-lettered again.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::dead_letters::{dlq_depth, peek_all};
use crate::support::logs::lines_with;
use crate::support::proxy::Proxy;
use crate::support::{pg_host_port, queue_name, retry_name, wait_until, Amqp, TestApp};

const WAIT: Duration = Duration::from_secs(20);

/// tenantd with these retry delays, its tenants consuming one batch at a time (what was
/// published first is settled first).
fn spawn(retry_delays: Vec<Duration>) -> TestApp {
    TestApp::spawn_with(|c| {
        c.retry_delays = retry_delays;
        c.default_workers = 1;
    })
}

/// Publishes `{"good": n}` and waits until the tenant holds `rows` rows: everything published
/// before it has been settled.
fn settle_behind(app: &TestApp, amqp: &mut Amqp, tenant: &str, rows: i64) {
    let body = json!({ "good": rows }).to_string();
    amqp.publish(&queue_name(tenant), body.as_bytes(), None);
    amqp.wait_confirms();
    app.wait_rows(tenant, rows);
}

fn ledger_rows(app: &TestApp, tenant: &str) -> i64 {
    app.pg()
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE tenant_id = $1::text::uuid",
            &[&tenant],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_delivery_redelivered_after_its_letter_was_confirmed_yields_one_letter() {
    let app = spawn(Vec::new());
    let tenant = app.create_tenant("once");
    let mut amqp = Amqp::connect();
    let id = Uuid::new_v4().to_string();
    amqp.publish(&queue_name(&tenant), b"not json", Some(&id));
    amqp.wait_confirms();
    wait_until(WAIT, "the letter", || dlq_depth(&mut amqp, &tenant) == 1);

    // The same delivery again, as the broker redelivers it when the ack after its letter's
    // confirm was lost (a crash, a cut connection); twice in one burst too.
    for _ in 0..3 {
        amqp.publish(&queue_name(&tenant), b"not json", Some(&id));
    }
    settle_behind(&app, &mut amqp, &tenant, 1);

    assert_eq!(dlq_depth(&mut amqp, &tenant), 1, "one letter in the DLQ");
    let letters = peek_all(&app.base(), &tenant);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message_id"], id.as_str());
    assert_eq!(ledger_rows(&app, &tenant), 1);
    let dropped = lines_with(&[&tenant, &id, "dead-lettered already"]);
    assert_eq!(dropped.len(), 3, "{dropped:?}");
}

#[test]
fn duplicated_retry_copies_of_a_message_end_in_one_letter() {
    let app = spawn(vec![Duration::from_millis(50); 2]);
    let tenant = app.create_tenant("retried-twice");
    let mut amqp = Amqp::connect();
    let id = Uuid::new_v4().to_string();
    // Two copies of one message going through their retries side by side, as a copy
    // confirmed in the retry queue whose original's ack was lost leaves them.
    amqp.publish(&queue_name(&tenant), b"poison", Some(&id));
    amqp.publish(&queue_name(&tenant), b"poison", Some(&id));
    amqp.wait_confirms();
    wait_until(WAIT, "one letter, the other copy dropped", || {
        !lines_with(&[&tenant, &id, "dead-lettered already"]).is_empty()
    });
    assert_eq!(dlq_depth(&mut amqp, &tenant), 1);
    assert_eq!(amqp.queue_stats(&retry_name(&tenant)).unwrap().0, 0);
    let letters = peek_all(&app.base(), &tenant);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["attempts"], 3);
}

#[test]
fn a_replayed_letter_that_fails_again_is_dead_lettered_again() {
    let app = spawn(Vec::new());
    let tenant = app.create_tenant("replayed");
    let mut amqp = Amqp::connect();
    let id = Uuid::new_v4().to_string();
    amqp.publish(&queue_name(&tenant), b"still not json", Some(&id));
    amqp.wait_confirms();
    wait_until(WAIT, "the letter", || dlq_depth(&mut amqp, &tenant) == 1);

    let path = format!("/api/tenants/{tenant}/dead-letters/replay");
    let reply = app.request("POST", &path, None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["moved"], 1);
    wait_until(WAIT, "the replayed letter back in the DLQ", || {
        dlq_depth(&mut amqp, &tenant) == 1 && ledger_rows(&app, &tenant) == 2
    });
    settle_behind(&app, &mut amqp, &tenant, 1);
    assert_eq!(dlq_depth(&mut amqp, &tenant), 1);
    assert!(lines_with(&[&tenant, &id, "dead-lettered already"]).is_empty());
}

#[test]
fn a_message_waits_unacked_while_the_ledger_is_unreachable_then_is_dead_lettered_once() {
    let proxy = Proxy::start(&pg_host_port());
    let port = proxy.port();
    let app = TestApp::spawn_with(|c| {
        c.retry_delays = Vec::new();
        c.default_workers = 1;
        c.database_url = c
            .database_url
            .replace(&pg_host_port(), &format!("127.0.0.1:{port}"));
    });
    let tenant = app.create_tenant("ledger-down");
    let mut amqp = Amqp::connect();
    let id = Uuid::new_v4().to_string();
    proxy.cut();
    amqp.publish(&queue_name(&tenant), b"not json", Some(&id));
    amqp.wait_confirms();
    wait_until(WAIT, "the dead-lettering to wait for the ledger", || {
        !lines_with(&[&tenant, "dead-lettering waits"]).is_empty()
    });
    assert_eq!(
        dlq_depth(&mut amqp, &tenant),
        0,
        "no letter without its record"
    );

    proxy.restore();
    wait_until(Duration::from_secs(60), "the letter", || {
        dlq_depth(&mut amqp, &tenant) == 1
    });
    settle_behind(&app, &mut amqp, &tenant, 1);
    assert_eq!(dlq_depth(&mut amqp, &tenant), 1);
    assert_eq!(ledger_rows(&app, &tenant), 1);
    assert_eq!(amqp.queue_stats(&queue_name(&tenant)).unwrap().0, 0);
}

#[test]
fn distinct_messages_sharing_an_id_that_is_not_a_uuid_are_each_dead_lettered() {
    let app = spawn(Vec::new());
    let tenant = app.create_tenant("shared-id");
    let mut amqp = Amqp::connect();
    // Publishers may set an id that is not a UUID (an event name, an order number reused):
    // tenantd stores such messages under ids of its own, each once, and so dead-letters them.
    let id = format!("order-created-{}", Uuid::new_v4().simple());
    amqp.publish(&queue_name(&tenant), b"first, not json", Some(&id));
    amqp.publish(&queue_name(&tenant), b"second, not json either", Some(&id));
    amqp.wait_confirms();
    settle_behind(&app, &mut amqp, &tenant, 1);
    wait_until(WAIT, "both letters", || dlq_depth(&mut amqp, &tenant) == 2);
    let letters = peek_all(&app.base(), &tenant);
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(lines_with(&[&tenant, "dead-lettered already"]).is_empty());
}

#[test]
fn records_of_letters_older_than_a_week_are_forgotten() {
    let app = spawn(Vec::new());
    let tenant = app.create_tenant("forgotten");
    let record = "INSERT INTO dead_letters (tenant_id, message_id, replays, dead_lettered_at)
                  VALUES ($1::text::uuid, $2, 0, now() - make_interval(days => $3))";
    let mut pg = app.pg();
    pg.execute(record, &[&tenant, &"old", &8]).unwrap();
    pg.execute(record, &[&tenant, &"recent", &6]).unwrap();
    let kept = |pg: &mut postgres::Client| -> Vec<String> {
        pg.query(
            "SELECT message_id FROM dead_letters WHERE tenant_id = $1::text::uuid",
            &[&tenant],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // Every replica's sweeper looks every 10 s.
    wait_until(Duration::from_secs(40), "the old record forgotten", || {
        kept(&mut pg) == ["recent"]
    });
}

/// The replica's sessions of the ledger in `state` (`active`: waiting on a lock).
fn ledger_sessions(pg: &mut postgres::Client, state: &str) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'tenantd dead letters' AND datname = current_database()
           AND state = $1 AND ($1 <> 'active' OR wait_event_type = 'Lock')",
        &[&state],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_record_held_by_a_replica_that_stopped_answering_is_released() {
    // The replica reaches the database through a proxy the test freezes: a replica paused or
    // cut off as its record is inserted.
    let proxy = Proxy::start(&pg_host_port());
    let port = proxy.port();
    let app = TestApp::spawn_with(|c| {
        c.retry_delays = Vec::new();
        c.default_workers = 1;
        c.database_url = c
            .database_url
            .replace(&pg_host_port(), &format!("127.0.0.1:{port}"));
    });
    let _thaw = Thaw(&proxy);
    let tenant = app.create_tenant("holder-frozen");
    let id = Uuid::new_v4().to_string();
    let record = "INSERT INTO dead_letters (tenant_id, message_id, replays)
                  VALUES ($1::text::uuid, $2, 0)";
    // Another copy of the message being recorded: the replica's insert waits on it.
    let mut other = app.pg();
    let copy = {
        let mut copy = other.transaction().unwrap();
        copy.execute(record, &[&tenant, &id]).unwrap();
        copy
    };
    let mut amqp = Amqp::connect();
    amqp.publish(&queue_name(&tenant), b"not json", Some(&id));
    amqp.wait_confirms();
    let mut pg = app.pg();
    wait_until(WAIT, "the replica's record waiting on the other", || {
        ledger_sessions(&mut pg, "active") == 1
    });
    proxy.freeze();
    copy.rollback().unwrap();
    wait_until(WAIT, "the replica's record inserted, unanswered", || {
        ledger_sessions(&mut pg, "idle in transaction") == 1
    });

    // The database ends the session that holds the record: other copies are not kept waiting.
    wait_until(Duration::from_secs(30), "the record released", || {
        ledger_sessions(&mut pg, "idle in transaction") == 0
    });
    let mut tx = pg.transaction().unwrap();
    tx.batch_execute("SET LOCAL lock_timeout = '1s'").unwrap();
    assert_eq!(tx.execute(record, &[&tenant, &id]).unwrap(), 1);
    tx.rollback().unwrap();
}

/// Drops the proxy's connections and lets new ones through when dropped (before the app, so
/// that its shutdown does not wait on frozen connections).
struct Thaw<'a>(&'a Proxy);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        self.0.cut();
        self.0.restore();
    }
}
