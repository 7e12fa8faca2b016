//! Latency: a fresh tenant fed at a fixed rate, each message carrying its publish time; its
//! latency is the row's `created_at` minus that time (one clock, this machine's). Then the
//! same while 100 other tenants are created and deleted (isolation).

use std::time::{Duration, Instant};

use crate::stack::{self, Stack};
use crate::{load, percentile, Args, Report};

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    stack.start(&[]);
    let quiet = latencies(stack, args, false);
    report.add("latency_p50_ms", percentile(&quiet, 0.50), "ms");
    report.add("latency_p99_ms", percentile(&quiet, 0.99), "ms");
    let churned = latencies(stack, args, true);
    report.add("churn_latency_p99_ms", percentile(&churned, 0.99), "ms");
    report.add(
        "churn_latency_ratio",
        percentile(&churned, 0.99) / percentile(&quiet, 0.99),
        "",
    );
}

/// Publish → stored, in ms, for a fresh tenant at the fixed rate; with `churn`, 100 other
/// tenants are created and deleted meanwhile.
fn latencies(stack: &mut Stack, args: &Args, churn: bool) -> Vec<f64> {
    let tenant = stack.create_tenant("latency", "active");
    let churner = churn.then(|| {
        let base = stack.main().base.clone();
        std::thread::spawn(move || churn_tenants(&base, 100))
    });
    let queue = format!("tenant_{tenant}_queue");
    let sent = load::publish_at_rate(&stack.amqp_url, &queue, args.rate, args.seconds);
    if let Some(churner) = churner {
        churner.join().unwrap();
    }
    let mut pg = stack.pg();
    let tenant: uuid::Uuid = tenant.parse().unwrap();
    let count = |pg: &mut postgres::Client| -> i64 {
        pg.query_one(
            "SELECT count(*) FROM messages WHERE tenant_id = $1",
            &[&tenant],
        )
        .unwrap()
        .get(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&mut pg) < sent as i64 {
        assert!(
            Instant::now() < deadline,
            "the messages were not all stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.query(
        "SELECT (extract(epoch FROM created_at) * 1e6 - (payload->>'sent_us')::float8) / 1e3
         FROM messages WHERE tenant_id = $1",
        &[&tenant],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, f64>(0))
    .collect()
}

fn churn_tenants(base: &str, count: usize) {
    for i in 0..count {
        let body = format!(r#"{{"name":"churn-{i}"}}"#);
        let reply = stack::http::request(base, "POST", "/api/tenants", Some(body.as_bytes()));
        assert_eq!(reply.status, 201, "{}", reply.text());
        let id = reply.json()["id"].as_str().unwrap().to_string();
        let reply = stack::http::request(base, "DELETE", &format!("/api/tenants/{id}"), None);
        assert_eq!(reply.status, 204, "{}", reply.text());
    }
}
