//! Fairness: a quiet tenant publishing at a steady rate while 40 others drain a backlog. Its
//! publish → stored latency idle, under a flood of plain consumers that only ack (what the
//! machine leaves when the broker is saturated), and under tenantd's own flood of the same
//! messages; and how much of its delay under tenantd's flood is the wait for a worker.

use std::time::{Duration, Instant};

use crate::ingest::{self, Backlog};
use crate::load::{self, Acks};
use crate::stack::Stack;
use crate::{percentile, Args, Report};

const FLOOD_TENANTS: u64 = 40;
const FLOOD_BACKLOG: u64 = 10_000;
const QUIET_RATE: u64 = 50;
const QUIET_SECONDS: u64 = 10;

pub fn run(stack: &mut Stack, _args: &Args, report: &mut Report) {
    stack.start(&[]);
    let flood = flood_tenants(stack);

    let idle = Quiet::start(stack, "quiet-idle").publish(stack);
    report_latency(
        report,
        ["quiet_idle_p50_ms", "quiet_idle_p99_ms"],
        &idle.latencies,
    );

    flood.preload(stack);
    let quiet = Quiet::start(stack, "quiet-bare");
    let (bare, drain) = std::thread::scope(|s| {
        let url = &stack.amqp_url;
        let drain = s.spawn(|| {
            let prefetch = ingest::prefetch();
            load::drain_rate(
                url,
                &flood.queues,
                flood.per_queue,
                prefetch,
                Acks::PerBurst,
            )
        });
        let measured = quiet.publish(stack);
        (measured, drain.join().expect("the bare flood"))
    });
    report_latency(
        report,
        ["quiet_bare_p50_ms", "quiet_bare_p99_ms"],
        &bare.latencies,
    );
    report.add("bare_flood_msgs_per_s", drain.msgs_per_s.round(), "msg/s");

    flood.preload(stack);
    let quiet = Quiet::start(stack, "quiet-flood");
    let (loaded, drain) = std::thread::scope(|s| {
        let drain = s.spawn(|| ingest::timed_drain(stack, &flood));
        let measured = quiet.publish(stack);
        (measured, drain.join().expect("the tenantd flood"))
    });
    report_latency(
        report,
        ["quiet_tenantd_p50_ms", "quiet_tenantd_p99_ms"],
        &loaded.latencies,
    );
    report.add(
        "tenantd_flood_msgs_per_s",
        drain.msgs_per_s.round(),
        "msg/s",
    );
    let ratio = |p| percentile(&loaded.latencies, p) / percentile(&bare.latencies, p);
    report.add("flood_p99_ratio", ratio(0.99), "x (goal <= 1.5)");
    report.add("flood_p50_ratio", ratio(0.50), "x");
    // The quiet tenant's mean delay under tenantd's flood, split: waiting for a worker (the
    // pool's own count) and the rest, mostly the broker's delivery to its thread.
    let mean = loaded.latencies.iter().sum::<f64>() / loaded.latencies.len().max(1) as f64;
    report.add("tenantd_flood_mean_ms", round2(mean), "ms");
    report.add(
        "tenantd_flood_pool_wait_ms",
        round2(loaded.pool_wait_ms),
        "ms (mean)",
    );
    report.add(
        "tenantd_flood_broker_ms",
        round2(mean - loaded.pool_wait_ms),
        "ms (mean: delivery to its thread)",
    );
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The quiet tenant's p50 and p99 under these two keys.
fn report_latency(report: &mut Report, keys: [&'static str; 2], latencies: &[f64]) {
    report.add(keys[0], percentile(latencies, 0.50), "ms");
    report.add(keys[1], percentile(latencies, 0.99), "ms");
}

/// The flooding tenants, paused between floods, and their backlog.
fn flood_tenants(stack: &mut Stack) -> Backlog {
    let tenants: Vec<String> = (0..FLOOD_TENANTS)
        .map(|i| stack.create_tenant(&format!("flood-{i}"), "inactive"))
        .collect();
    let queues = tenants
        .iter()
        .map(|t| format!("tenant_{t}_queue"))
        .collect();
    Backlog {
        tenants,
        queues,
        per_queue: FLOOD_BACKLOG,
        total: FLOOD_BACKLOG * FLOOD_TENANTS,
    }
}

/// A fresh quiet tenant, running and warmed up (its first message stored).
struct Quiet {
    tenant: uuid::Uuid,
    queue: String,
}

/// What the quiet tenant saw: each message's publish → stored (ms), and its mean pool wait.
struct Measured {
    latencies: Vec<f64>,
    pool_wait_ms: f64,
}

impl Quiet {
    fn start(stack: &mut Stack, name: &str) -> Quiet {
        let id = stack.create_tenant(name, "active");
        let quiet = Quiet {
            tenant: id.parse().expect("a tenant id"),
            queue: format!("tenant_{id}_queue"),
        };
        load::publish_at_rate(&stack.amqp_url, &quiet.queue, 1, 1);
        quiet.wait_rows(stack, 1);
        quiet
    }

    /// Publishes at the quiet rate and measures what was published, the warm-up left out.
    fn publish(&self, stack: &Stack) -> Measured {
        let wait_before = self.pool_wait_seconds(stack);
        let sent = load::publish_at_rate(&stack.amqp_url, &self.queue, QUIET_RATE, QUIET_SECONDS);
        self.wait_rows(stack, 1 + sent as i64);
        let waited = self.pool_wait_seconds(stack) - wait_before;
        let latencies: Vec<f64> = stack
            .pg()
            .query(
                "SELECT (extract(epoch FROM created_at) * 1e6 - (payload->>'sent_us')::float8) / 1e3
                 FROM messages WHERE tenant_id = $1 ORDER BY created_at OFFSET 1",
                &[&self.tenant],
            )
            .expect("reading the quiet tenant's rows")
            .iter()
            .map(|r| r.get::<_, f64>(0))
            .collect();
        Measured {
            pool_wait_ms: 1e3 * waited / latencies.len().max(1) as f64,
            latencies,
        }
    }

    fn wait_rows(&self, stack: &Stack, n: i64) {
        let mut pg = stack.pg();
        let deadline = Instant::now() + Duration::from_secs(300);
        let sql = "SELECT count(*) FROM messages WHERE tenant_id = $1";
        while pg.query_one(sql, &[&self.tenant]).unwrap().get::<_, i64>(0) < n {
            assert!(
                Instant::now() < deadline,
                "the quiet tenant's rows were not stored"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The time its messages waited for a worker, summed, from tenantd's `/metrics`.
    fn pool_wait_seconds(&self, stack: &Stack) -> f64 {
        let series = format!(
            "tenantd_messages_pool_wait_seconds_total{{tenant_id=\"{}\"}}",
            self.tenant
        );
        let text = stack.request("GET", "/metrics", None).text();
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}
