//! Starting a replica next to running ones: it reads the catalog instead of locking what tenants
//! write to, so a start never waits behind a writer and no writer waits behind a start.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::support::{partition_name, test_config, TestApp};

#[test]
fn a_second_replica_starts_at_once_while_a_writer_holds_a_partition() {
    let app = TestApp::spawn();
    let held = app.create_tenant("held");
    let other = app.create_tenant("other");
    // An insert left open holds a row lock (and ROW EXCLUSIVE) in the partition.
    let mut writer = app.pg();
    let mut open = writer.transaction().unwrap();
    open.execute(
        &format!(
            "INSERT INTO {} (id, tenant_id, payload) VALUES ($1, $2, '{{}}')",
            partition_name(&held)
        ),
        &[&Uuid::new_v4(), &held.parse::<Uuid>().unwrap()],
    )
    .unwrap();

    let config = test_config(&app.db);
    let started = Instant::now();
    let second = std::thread::spawn(move || tenantd::start(config));
    // Meanwhile another writer is never blocked by the start.
    let mut other_writer = app.pg();
    other_writer
        .batch_execute("SET statement_timeout = '2s'")
        .unwrap();
    for _ in 0..20 {
        other_writer
            .execute(
                &format!(
                    "INSERT INTO {} (id, tenant_id, payload) VALUES ($1, $2, $3)",
                    partition_name(&other)
                ),
                &[&Uuid::new_v4(), &other.parse::<Uuid>().unwrap(), &json!({})],
            )
            .expect("a writer is not blocked by a starting replica");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !second.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the second replica did not start within 2 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = second.join().unwrap().expect("the second replica starts");
    let health = crate::support::http::request(
        &format!("http://{}", second.http_addr()),
        "GET",
        "/healthz",
        None,
    );
    assert_eq!(health.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    open.commit().unwrap();
    second.shutdown().unwrap();
}
