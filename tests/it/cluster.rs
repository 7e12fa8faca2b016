//! Quorum queues, and a RabbitMQ cluster losing a node under load.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use amiquip::AmqpValue;
use serde_json::json;
use uuid::Uuid;

use crate::support::child::Tenantd;
use crate::support::vhost::Vhost;
use crate::support::{dlq_name, queue_name, retry_name, wait_until, Amqp, TestApp, TestDb};

#[test]
fn quorum_queues_store_retry_and_dead_letter_like_classic_ones() {
    let vhost = Vhost::create();
    let app = TestApp::spawn_with(|c| {
        c.rabbitmq_url = vhost.url();
        c.queue_type = tenantd::QueueType::Quorum;
        c.retry_delays = vec![Duration::from_millis(100); 2];
    });
    let tenant = app.create_tenant("replicated");
    for queue in [queue_name(&tenant), retry_name(&tenant), dlq_name(&tenant)] {
        assert_eq!(vhost.queue_type(&queue), "quorum", "{queue}");
    }
    let mut amqp = Amqp::connect_to(&vhost.url());
    let poison = Uuid::new_v4().to_string();
    amqp.publish(&queue_name(&tenant), b"{\"ok\": 1}", None);
    amqp.publish(&queue_name(&tenant), b"not json", Some(&poison));
    amqp.wait_confirms();
    app.wait_rows(&tenant, 1);
    wait_until(Duration::from_secs(20), "the poison in the DLQ", || {
        amqp.queue_stats(&dlq_name(&tenant)).map(|s| s.0) == Some(1)
    });
    let (_, properties) = amqp.take(&dlq_name(&tenant)).unwrap();
    assert_eq!(properties.message_id().as_deref(), Some(poison.as_str()));
    let attempts = properties
        .headers()
        .as_ref()
        .and_then(|h| h.get("x-tenantd-attempts").cloned());
    assert_eq!(attempts, Some(AmqpValue::LongInt(3)));
}

/// The cluster started by `scripts/cluster.sh start`, when `TENANTD_TEST_CLUSTER` says where
/// that script is (scripts/test.sh does, on a machine that can run the nodes).
fn cluster() -> Option<String> {
    std::env::var("TENANTD_TEST_CLUSTER")
        .ok()
        .filter(|s| !s.is_empty())
}

fn cluster_sh(script: &str, args: &[&str]) -> String {
    let out = Command::new(script)
        .args(args)
        .output()
        .expect("scripts/cluster.sh");
    assert!(
        out.status.success(),
        "cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_cluster_node_stopped_under_load_loses_nothing() {
    let Some(script) = cluster() else {
        eprintln!("no RabbitMQ cluster: run with TENANTD_TEST_CLUSTER=scripts/cluster.sh (scripts/test.sh does)");
        return;
    };
    let urls = cluster_sh(&script, &["urls"]);
    let node = |n: usize| urls.split(',').nth(n - 1).unwrap().to_string();
    let db = TestDb::create();
    let env = [
        ("DATABASE_URL", db.url()),
        ("RABBITMQ_URL", urls.clone()),
        ("QUEUE_TYPE", "quorum".to_string()),
        ("RETRY_DELAYS_MS", "100,100".to_string()),
    ];
    let tenantd = Tenantd::start(&env);
    let tenants: Vec<String> = (0..3)
        .map(|i| {
            let reply = tenantd.request(
                "POST",
                "/api/tenants",
                Some(&json!({"name": format!("q{i}")}).to_string()),
            );
            assert_eq!(reply.status, 201, "{}", reply.text());
            reply.json()["id"].as_str().unwrap().to_string()
        })
        .collect();
    // Published through node 3 while node 1 stops; every 50th is poison.
    let plan: Vec<(usize, String, bool)> = (0..6000)
        .map(|i| (i % 3, Uuid::new_v4().to_string(), i % 50 == 49))
        .collect();
    let publisher = {
        let (plan, tenants, url) = (plan.clone(), tenants.clone(), node(3));
        std::thread::spawn(move || Amqp::connect_to(&url).publish_plan(&tenants, &plan, 200))
    };
    let mut pg = db.client();
    wait_until(Duration::from_secs(60), "1,000 rows", || {
        pg.query_one("SELECT count(*) FROM messages", &[])
            .unwrap()
            .get::<_, i64>(0)
            > 1000
    });
    cluster_sh(&script, &["stop-node", "1"]);
    publisher.join().unwrap();
    let good: HashSet<&str> = plan.iter().filter(|p| !p.2).map(|p| p.1.as_str()).collect();
    wait_until(
        Duration::from_secs(120),
        "every good message stored",
        || {
            pg.query_one("SELECT count(*) FROM messages", &[])
                .unwrap()
                .get::<_, i64>(0)
                >= good.len() as i64
        },
    );
    let stored: Vec<String> = pg
        .query("SELECT id::text FROM messages", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored.len(), good.len(), "nothing stored twice");
    assert!(
        stored.iter().all(|id| good.contains(id.as_str())),
        "only good messages stored"
    );
    // Dead-lettering is at least once: a copy may come twice, none may be missing.
    let poison: HashSet<&str> = plan.iter().filter(|p| p.2).map(|p| p.1.as_str()).collect();
    let mut amqp = Amqp::connect_to(&node(2));
    let mut dead: HashSet<String> = HashSet::new();
    wait_until(
        Duration::from_secs(60),
        "every poison message in a DLQ",
        || {
            for t in &tenants {
                while let Some((_, properties)) = amqp.take(&dlq_name(t)) {
                    dead.extend(properties.message_id().clone());
                }
            }
            dead.len() == poison.len()
        },
    );
    assert!(
        dead.iter().all(|id| poison.contains(id.as_str())),
        "only poison dead-lettered"
    );
    for t in &tenants {
        let reply = tenantd.request("DELETE", &format!("/api/tenants/{t}"), None);
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
    cluster_sh(&script, &["start-node", "1"]);
}
