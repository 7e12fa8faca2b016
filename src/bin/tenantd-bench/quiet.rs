//! The quiet tenant of the fairness phase, and the probe beside it: a plain consumer on a queue
//! of its own that receives a copy of each quiet message, timing the broker's delivery alone.

use std::time::{Duration, Instant};

use crate::load;
use crate::stack::Stack;

const QUIET_RATE: u64 = 50;
const QUIET_SECONDS: u64 = 10;
const PROBE_QUEUE: &str = "tenantd_bench_fairness_probe";

pub fn declare_probe(stack: &Stack) {
    let mut connection = load::connect(&stack.amqp_url);
    let channel = connection.open_channel(None).unwrap();
    let options = amiquip::QueueDeclareOptions {
        auto_delete: false,
        ..Default::default()
    };
    channel.queue_declare(PROBE_QUEUE, options).unwrap();
    let _ = connection.close();
}

pub fn delete_probe(stack: &Stack) {
    let mut connection = load::connect(&stack.amqp_url);
    let channel = connection.open_channel(None).unwrap();
    let _ = channel.queue_delete(PROBE_QUEUE, Default::default());
    let _ = connection.close();
}

/// A fresh quiet tenant, running and warmed up (its first message stored).
pub struct Quiet {
    tenant: uuid::Uuid,
    queue: String,
}

/// What the quiet tenant saw: each message's publish time (Unix µs) and publish → stored (ms),
/// and the time its messages waited for a worker, summed.
pub struct Measured {
    pub samples: Vec<(i64, f64)>,
    pub pool_wait_s: f64,
}

impl Measured {
    pub fn all(&self) -> Vec<f64> {
        self.samples.iter().map(|(_, latency)| *latency).collect()
    }

    /// The latencies of the messages published before `end_us`.
    pub fn during(&self, end_us: i64) -> Vec<f64> {
        let during = self.samples.iter().filter(|(sent, _)| *sent < end_us);
        during.map(|(_, latency)| *latency).collect()
    }
}

impl Quiet {
    pub fn start(stack: &mut Stack, name: &str) -> Quiet {
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
    pub fn publish(&self, stack: &Stack) -> Measured {
        self.publish_to(stack, &[&self.queue])
    }

    /// The same, each message also published to the probe's queue, where a plain consumer
    /// times the broker's delivery of it.
    pub fn publish_probed(&self, stack: &Stack) -> (Measured, Vec<(i64, f64)>) {
        std::thread::scope(|s| {
            let (ready, consuming) = std::sync::mpsc::channel();
            let count = QUIET_RATE * QUIET_SECONDS;
            let url = &stack.amqp_url;
            let probe = s.spawn(move || load::receive_latencies(url, PROBE_QUEUE, count, ready));
            consuming.recv().expect("the probe consuming");
            let measured = self.publish_to(stack, &[&self.queue, PROBE_QUEUE]);
            (measured, probe.join().expect("the probe"))
        })
    }

    fn publish_to(&self, stack: &Stack, queues: &[&str]) -> Measured {
        let wait_before = self.pool_wait_seconds(stack);
        let sent = load::publish_at_rate_to(&stack.amqp_url, queues, QUIET_RATE, QUIET_SECONDS);
        self.wait_rows(stack, 1 + sent as i64);
        let samples = stack
            .pg()
            .query(
                "SELECT (payload->>'sent_us')::int8,
                        (extract(epoch FROM created_at) * 1e6 - (payload->>'sent_us')::float8) / 1e3
                 FROM messages WHERE tenant_id = $1 ORDER BY created_at OFFSET 1",
                &[&self.tenant],
            )
            .expect("reading the quiet tenant's rows")
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1)))
            .collect();
        Measured {
            samples,
            pool_wait_s: self.pool_wait_seconds(stack) - wait_before,
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
