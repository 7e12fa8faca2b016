//! Scale-out: three replicas sharing many tenants — the spread and what a tenant costs each, how
//! long until a killed replica's tenants are consumed again, how long a replica that joins takes
//! to get its share, how long each tenant pauses when its replica stops with SIGTERM, and the
//! throughput of three replicas against one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ingest::{timed_drain, Backlog};
use crate::stack::Stack;
use crate::{load, percentile, procstat, Args, Report};

const NAMES: [&str; 3] = ["r1", "r2", "r3"];

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    for name in NAMES {
        stack.start_replica(name, &[]);
    }
    let idle: Vec<procstat::Sample> = NAMES
        .iter()
        .map(|n| procstat::sample(stack.replica(n).pid()))
        .collect();
    let n = args.replica_tenants;
    let started = Instant::now();
    for i in 0..n {
        stack.create_tenant(&format!("spread-{i}"), "active");
    }
    report.add(
        "replicas_create_per_s",
        (n as f64 / started.elapsed().as_secs_f64()).round(),
        "/s",
    );
    settle(stack, n, 3, Duration::from_secs(120));
    costs(stack, &idle, n, report);

    stack.signal("r3", "-KILL");
    let killed = Instant::now();
    settle(stack, n, 2, Duration::from_secs(60));
    report.add("failover_s", killed.elapsed().as_secs_f64(), "s");

    stack.start_replica("r3", &[]);
    let joined = Instant::now();
    settle(stack, n, 3, Duration::from_secs(60));
    report.add("join_settle_s", joined.elapsed().as_secs_f64(), "s");

    hand_over(stack, report);
    throughput(stack, args, report);
}

/// Waits until `n` tenants run on `replicas` live replicas, none with more than ⌈n/N⌉ + 1.
fn settle(stack: &Stack, n: u64, replicas: usize, within: Duration) {
    let mut pg = stack.pg();
    let cap = n.div_ceil(replicas as u64) as i64 + 1;
    let deadline = Instant::now() + within;
    loop {
        let loads: Vec<i64> = pg
            .query(
                "SELECT count(*) FROM consumers c JOIN live_replicas r ON r.id = c.replica_id
                 WHERE c.state = 'running' GROUP BY c.replica_id",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let total: i64 = loads.iter().sum();
        if total == n as i64 && loads.len() == replicas && loads.iter().all(|&l| l <= cap) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tenants did not settle: {loads:?}"
        );
        std::thread::sleep(Duration::from_millis(50)); // a poll of the consumers' table
    }
}

/// What the tenants cost the replicas, on top of the replicas at rest.
fn costs(stack: &Stack, idle: &[procstat::Sample], n: u64, report: &mut Report) {
    let now: Vec<procstat::Sample> = NAMES
        .iter()
        .map(|name| procstat::sample(stack.replica(name).pid()))
        .collect();
    let sum = |samples: &[procstat::Sample], f: fn(&procstat::Sample) -> f64| -> f64 {
        samples.iter().map(f).sum()
    };
    let per = |f: fn(&procstat::Sample) -> f64| (sum(&now, f) - sum(idle, f)) / n as f64;
    report.add(
        "replica_rss_kb_per_tenant",
        (1024.0 * per(|s| s.rss_mb)).round(),
        "KB",
    );
    report.add("replica_threads_per_tenant", per(|s| s.threads as f64), "");
    report.add("replica_fds_per_tenant", per(|s| s.fds as f64), "");
}

/// A steady flow to 30 of r2's tenants while r2 stops with SIGTERM: each tenant's longest pause
/// between two stored rows.
fn hand_over(stack: &mut Stack, report: &mut Report) {
    let mut pg = stack.pg();
    let tenants: Vec<uuid::Uuid> = pg
        .query(
            "SELECT tenant_id FROM consumers WHERE replica_id = 'r2' ORDER BY tenant_id LIMIT 30",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let queues: Vec<String> = tenants
        .iter()
        .map(|t| format!("tenant_{t}_queue"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (url, stop) = (stack.amqp_url.clone(), stop.clone());
        std::thread::spawn(move || load::publish_flow(&url, &queues, 20, &stop))
    };
    std::thread::sleep(Duration::from_secs(2)); // the flow before the hand-over
    let stopping = Instant::now();
    stack.signal("r2", "-TERM");
    report.add("handover_exit_s", stopping.elapsed().as_secs_f64(), "s");
    std::thread::sleep(Duration::from_secs(3)); // the flow after it
    stop.store(true, Ordering::SeqCst);
    let sent = flow.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = |pg: &mut postgres::Client| -> i64 {
        pg.query_one(
            "SELECT count(*) FROM messages WHERE tenant_id = ANY($1)",
            &[&tenants],
        )
        .unwrap()
        .get(0)
    };
    while stored(&mut pg) < sent as i64 {
        assert!(Instant::now() < deadline, "the flow was not all stored");
        std::thread::sleep(Duration::from_millis(100));
    }
    let gaps: Vec<f64> = pg
        .query(
            "SELECT (max(gap) * 1000)::float8 FROM (
                 SELECT tenant_id, extract(epoch FROM created_at
                        - lag(created_at) OVER (PARTITION BY tenant_id ORDER BY created_at)) AS gap
                 FROM messages WHERE tenant_id = ANY($1)) g
             GROUP BY tenant_id",
            &[&tenants],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, f64>(0))
        .collect();
    report.add("handover_gap_p50_ms", percentile(&gaps, 0.5), "ms");
    report.add("handover_gap_max_ms", percentile(&gaps, 1.0), "ms");
}

/// The same backlog stored by three replicas, then by one.
fn throughput(stack: &mut Stack, args: &Args, report: &mut Report) {
    stack.start_replica("r2", &[]);
    let backlog = Backlog::in_paused_tenants(stack, args, "flow");
    backlog.preload(stack);
    let three = timed_drain(stack, &backlog).msgs_per_s;
    stack.signal("r2", "-TERM");
    stack.signal("r3", "-TERM");
    backlog.preload(stack);
    let one = timed_drain(stack, &backlog).msgs_per_s;
    report.add("three_replicas_msgs_per_s", three.round(), "msg/s");
    report.add("one_replica_msgs_per_s", one.round(), "msg/s");
    report.add("scale_out_ratio", three / one, "x");
}
