//! Replaying dead letters once their cause is fixed: every one stored exactly once, with its
//! attempts counted afresh; a SIGKILL in the middle of a replay loses none and doubles none; one
//! replay per tenant at a time.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::dead_letters::{dlq_depth, peek_all};
use crate::support::child::Tenantd;
use crate::support::proxy::Proxy;
use crate::support::{
    amqp_host_port, amqp_url_via, partition_name, queue_name, rabbitmq_url, wait_until, Amqp,
    TestApp, TestDb,
};

fn replay_path(tenant: &str) -> String {
    format!("/api/tenants/{tenant}/dead-letters/replay")
}

/// `(rows, distinct values of payload->>'n')` of the tenant's partition.
fn stored(pg: &mut postgres::Client, tenant: &str) -> (i64, i64) {
    let sql = format!(
        "SELECT count(*), count(DISTINCT payload->>'n') FROM {}",
        partition_name(tenant)
    );
    let row = pg.query_one(&sql, &[]).unwrap();
    (row.get(0), row.get(1))
}

fn stored_ns(pg: &mut postgres::Client, tenant: &str) -> HashSet<i64> {
    let sql = format!(
        "SELECT (payload->>'n')::bigint FROM {}",
        partition_name(tenant)
    );
    pg.query(&sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The `n` of every letter whose payload is JSON.
fn letter_ns(letters: &[Value]) -> HashSet<i64> {
    letters
        .iter()
        .filter_map(|l| l["payload"]["n"].as_i64())
        .collect()
}

#[test]
fn a_replay_after_the_cause_is_fixed_stores_every_dead_letter_once() {
    let mut app = TestApp::spawn_with(|c| {
        c.max_message_bytes = 200;
        c.retry_delays = vec![Duration::from_millis(10)];
    });
    let tenant = app.create_tenant("too big");
    let mut amqp = Amqp::connect();
    let pad = "x".repeat(300);
    let ids: Vec<String> = (0..10).map(|_| Uuid::new_v4().to_string()).collect();
    for n in 0..30usize {
        let body = json!({ "n": n, "pad": pad }).to_string();
        amqp.publish(
            &queue_name(&tenant),
            body.as_bytes(),
            ids.get(n).map(|s| s.as_str()),
        );
    }
    amqp.publish(&queue_name(&tenant), b"still not json", None);
    amqp.wait_confirms();
    wait_until(Duration::from_secs(30), "31 dead letters", || {
        dlq_depth(&mut amqp, &tenant) == 31
    });
    let letters = peek_all(&app.base(), &tenant);
    assert_eq!(letter_ns(&letters).len(), 30);
    for letter in letters.iter().filter(|l| l["payload_encoding"] == "json") {
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains("more than the 200 allowed"), "{reason}");
        assert_eq!(letter["attempts"], 2);
    }

    app.config.max_message_bytes = 1024 * 1024;
    app.restart();
    let reply = app.request("POST", &replay_path(&tenant), Some(r#"{"limit": 10}"#));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json(), json!({"moved": 10, "remaining": 21}));
    let reply = app.request("POST", &replay_path(&tenant), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["remaining"], 0);

    app.wait_rows(&tenant, 30);
    assert_eq!(stored(&mut app.pg(), &tenant), (30, 30), "each one once");
    let with_ids: i64 = app
        .pg()
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE id::text = ANY($1)",
                partition_name(&tenant)
            ),
            &[&ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        with_ids, 10,
        "stored under the ids they were published with"
    );
    // The one still failing is back, its attempts counted from the replay on.
    wait_until(
        Duration::from_secs(20),
        "the poison back in the DLQ",
        || dlq_depth(&mut amqp, &tenant) == 1,
    );
    let back = peek_all(&app.base(), &tenant);
    assert_eq!(back[0]["payload"], "c3RpbGwgbm90IGpzb24="); // "still not json"
    assert_eq!(back[0]["attempts"], 2);
}

/// Sends a request and returns without reading the answer's meaning: for a request whose server
/// the test kills.
fn send(base: &str, method: &str, path: &str, body: &str) -> std::thread::JoinHandle<Vec<u8>> {
    let addr = base.trim_start_matches("http://").to_string();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    })
}

#[test]
fn a_replay_killed_midway_loses_no_letter_and_stores_none_twice() {
    let db = TestDb::create();
    let proxy = Proxy::start(&amqp_host_port());
    let env = |max_bytes: usize, broker: String| {
        vec![
            ("DATABASE_URL", db.url()),
            ("RABBITMQ_URL", broker),
            ("MAX_MESSAGE_BYTES", max_bytes.to_string()),
            ("RETRY_DELAYS_MS", "none".to_string()),
            ("FAILOVER_TIMEOUT", "2".to_string()),
        ]
    };
    const N: i64 = 1000;
    let all: HashSet<i64> = (0..N).collect();

    // 1,000 messages too large for the first tenantd, published without ids: dead-lettered,
    // each copy with the id tenantd gave it.
    let mut first = Tenantd::start(&env(1024, rabbitmq_url()));
    let reply = first.request("POST", "/api/tenants", Some(r#"{"name": "killed"}"#));
    let tenant = reply.json()["id"].as_str().unwrap().to_string();
    let mut amqp = Amqp::connect();
    let pad = "x".repeat(2000);
    for n in 0..N {
        let body = json!({ "n": n, "pad": pad }).to_string();
        amqp.publish(&queue_name(&tenant), body.as_bytes(), None);
    }
    amqp.wait_confirms();
    wait_until(Duration::from_secs(120), "1,000 dead letters", || {
        dlq_depth(&mut amqp, &tenant) == N as u32
    });
    first.stop_cleanly("-TERM");

    // The limit raised, a replay of all of them through a broker connection the test can
    // freeze; frozen and SIGKILLed midway.
    let mut second = Tenantd::start(&env(1024 * 1024, amqp_url_via(proxy.port())));
    let replay = send(&second.base, "POST", &replay_path(&tenant), "{}");
    wait_until(Duration::from_secs(60), "the replay under way", || {
        dlq_depth(&mut amqp, &tenant) <= 900
    });
    proxy.freeze();
    let again = second.request("POST", &replay_path(&tenant), Some("{}"));
    again.assert_error(409, "already running");
    let dead_letters = format!("/api/tenants/{tenant}/dead-letters");
    let dropping = second.request("DELETE", &dead_letters, Some("{}"));
    dropping.assert_error(409, "already running");
    second.kill();
    // The broker sees the killed process's connections go and takes back what they held.
    proxy.cut();
    let answer = replay.join().unwrap();
    assert!(
        answer.is_empty(),
        "the replay never answered: it was killed"
    );

    // Another tenantd stores what reached the tenant's queue: every letter is stored or still
    // dead, none stored twice.
    let third = Tenantd::start(&env(1024 * 1024, rabbitmq_url()));
    let mut pg = db.client();
    // Judged once the copies that reached the tenant's queue are all taken and settled: the
    // letters whose replay was cut are all in the DLQ from the start, before any is stored.
    let settled = |amqp: &mut Amqp| {
        let counts = third
            .request("GET", &format!("/api/tenants/{tenant}"), None)
            .json()["counts"]
            .clone();
        let n = |k: &str| counts[k].as_u64().unwrap_or(0);
        let queue = amqp
            .queue_stats(&queue_name(&tenant))
            .expect("the queue exists")
            .0;
        queue == 0 && n("consumed") > 0 && n("consumed") == n("stored") + n("duplicates")
    };
    wait_until(
        Duration::from_secs(120),
        "every letter stored or dead",
        || {
            let mut seen = stored_ns(&mut pg, &tenant);
            seen.extend(letter_ns(&peek_all(&third.base, &tenant)));
            seen == all && settled(&mut amqp)
        },
    );
    let (rows, distinct) = stored(&mut pg, &tenant);
    assert_eq!(rows, distinct, "none stored twice");
    assert!(
        0 < rows && rows < N,
        "the kill landed midway: {rows} stored"
    );

    // Then the rest.
    let reply = third.request("POST", &replay_path(&tenant), Some("{}"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.json()["moved"].as_i64().unwrap() >= N - rows);
    assert_eq!(reply.json()["remaining"], 0);
    wait_until(Duration::from_secs(60), "every letter stored", || {
        stored(&mut pg, &tenant).0 >= N
    });
    assert_eq!(stored(&mut pg, &tenant), (N, N), "each one exactly once");
    assert_eq!(dlq_depth(&mut amqp, &tenant), 0);
    drop(third); // before deleting its queues, which its consumer would declare again
    amqp.delete_tenant_queues(&tenant);
}
