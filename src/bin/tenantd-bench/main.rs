//! tenantd-bench: measures tenantd against the broker's own ceiling on this machine, and prints
//! a table plus a `summary key=value …` line. Needs PostgreSQL and RabbitMQ running and the
//! release build of tenantd beside it: `cargo build --release && target/release/tenantd-bench`.

mod load;
mod procstat;
mod stack;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use stack::Stack;

struct Args {
    messages: u64,
    tenants: u64,
    rate: u64,
    seconds: u64,
    create: u64,
    idle_seconds: u64,
    payload_bytes: u64,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            messages: 200_000,
            tenants: 10,
            rate: 1000,
            seconds: 10,
            create: 1000,
            idle_seconds: 30,
            payload_bytes: 240,
        };
        let raw: Vec<String> = std::env::args().skip(1).collect();
        for pair in raw.chunks(2) {
            let value = pair
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage());
            match pair[0].as_str() {
                "--messages" => args.messages = value,
                "--tenants" => args.tenants = value,
                "--rate" => args.rate = value,
                "--seconds" => args.seconds = value,
                "--create" => args.create = value,
                "--idle-seconds" => args.idle_seconds = value,
                "--payload-bytes" => args.payload_bytes = value,
                _ => usage(),
            }
        }
        args
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tenantd-bench [--messages 200000] [--tenants 10] [--rate 1000] [--seconds 10] \
         [--create 1000] [--idle-seconds 30] [--payload-bytes 240]\n\
         env: BENCH_PG (default postgres://postgres:postgres@127.0.0.1:5432), RABBITMQ_URL"
    );
    std::process::exit(2)
}

/// The figures, in the order they are printed.
struct Report(Vec<(&'static str, String, &'static str)>);

impl Report {
    fn add(&mut self, key: &'static str, value: f64, unit: &'static str) {
        let text = if value.fract() == 0.0 {
            format!("{value}")
        } else {
            format!("{value:.2}")
        };
        eprintln!("  {key} = {text} {unit}");
        self.0.push((key, text, unit));
    }

    fn print(&self) {
        println!("{:<24} {:>12}  unit", "figure", "value");
        for (key, value, unit) in &self.0 {
            println!("{key:<24} {value:>12}  {unit}");
        }
        let pairs: Vec<String> = self.0.iter().map(|(k, v, _)| format!("{k}={v}")).collect();
        println!("summary {}", pairs.join(" "));
    }
}

fn main() {
    let args = Args::parse();
    load::set_payload_bytes(args.payload_bytes as usize);
    let pg = std::env::var("BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into());
    let amqp = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut stack = Stack::new(&pg, &amqp);
    let mut report = Report(Vec::new());
    let mut created = Vec::new();

    eprintln!(
        "ingest: {} messages over {} tenants",
        args.messages, args.tenants
    );
    ingest(&mut stack, &args, &mut report, &mut created);
    eprintln!(
        "latency and isolation: {} msg/s for {} s",
        args.rate, args.seconds
    );
    latency(&mut stack, &args, &mut report, &mut created);
    eprintln!("tenants: creating {}", args.create);
    tenants(&mut stack, &args, &mut report, &mut created);
    stack.stop();
    cleanup(&stack, &created);
    report.print();
}

fn ingest(stack: &mut Stack, args: &Args, report: &mut Report, created: &mut Vec<String>) {
    stack.start(&[]);
    let tenants: Vec<String> = (0..args.tenants)
        .map(|i| stack.create_tenant(&format!("bench-{i}"), "inactive"))
        .collect();
    created.extend(tenants.iter().cloned());
    let queues: Vec<String> = tenants
        .iter()
        .map(|t| format!("tenant_{t}_queue"))
        .collect();
    let per_queue = args.messages / args.tenants;
    let total = per_queue * args.tenants;

    load::preload(&stack.amqp_url, &queues, per_queue);
    let (rate, peak) = timed_drain(stack, &tenants, total);
    report.add("ingest_msgs_per_s", rate.round(), "msg/s");

    load::preload(&stack.amqp_url, &queues, per_queue);
    let setting = |name: &str, default: u16| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // tenantd's prefetch: DEFAULT_WORKERS x BATCH_SIZE (the child inherits these variables).
    let prefetch = setting("DEFAULT_WORKERS", 3) * setting("BATCH_SIZE", 100);
    let broker = load::drain_rate(&stack.amqp_url, &queues, per_queue, prefetch);
    report.add("broker_msgs_per_s", broker.round(), "msg/s");
    report.add("ingest_ratio", rate / broker, "");
    report.add("drain_peak_rss_mb", peak.round(), "MB");

    // The same pipeline storing one message per transaction: what batching buys.
    stack.stop();
    stack.start(&[("BATCH_SIZE", "1")]);
    let small = (per_queue / 5).max(1);
    load::preload(&stack.amqp_url, &queues, small);
    let (one_by_one, _) = timed_drain(stack, &tenants, small * args.tenants);
    report.add("one_per_tx_msgs_per_s", one_by_one.round(), "msg/s");
    report.add("batching_speedup", rate / one_by_one, "x");
    stack.stop();
    stack.start(&[]);
}

/// Activates the tenants and times until `more` new rows are committed; samples tenantd's RSS.
fn timed_drain(stack: &mut Stack, tenants: &[String], more: u64) -> (f64, f64) {
    let mut pg = stack.pg();
    let target = stack.rows(&mut pg) + more as i64;
    let pid = stack.pid();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !done.load(Ordering::SeqCst) {
                peak = peak.max(procstat::sample(pid).rss_mb);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let started = Instant::now();
    for t in tenants {
        stack.set_status(t, "active");
    }
    let deadline = started + Duration::from_secs(600);
    while stack.rows(&mut pg) < target {
        assert!(Instant::now() < deadline, "ingest did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    for t in tenants {
        stack.set_status(t, "inactive");
    }
    (more as f64 / elapsed, peak)
}

fn latency(stack: &mut Stack, args: &Args, report: &mut Report, created: &mut Vec<String>) {
    let quiet = latencies(stack, args, created, false);
    report.add("latency_p50_ms", percentile(&quiet, 0.50), "ms");
    report.add("latency_p99_ms", percentile(&quiet, 0.99), "ms");
    let churned = latencies(stack, args, created, true);
    report.add("churn_latency_p99_ms", percentile(&churned, 0.99), "ms");
    report.add(
        "churn_latency_ratio",
        percentile(&churned, 0.99) / percentile(&quiet, 0.99),
        "",
    );
}

/// Publish → row committed and visible, in ms, for a fresh tenant at the fixed rate; with
/// `churn`, 100 other tenants are created and deleted meanwhile.
fn latencies(stack: &mut Stack, args: &Args, created: &mut Vec<String>, churn: bool) -> Vec<f64> {
    let tenant = stack.create_tenant("latency", "active");
    created.push(tenant.clone());
    let total = (args.rate * args.seconds) as usize;
    let watcher = watch_rows(
        stack,
        &tenant,
        total,
        Duration::from_secs(args.seconds + 30),
    );
    let churner = churn.then(|| {
        let base = stack.base.clone();
        std::thread::spawn(move || churn_tenants(&base, 100))
    });
    let sent = load::publish_at_rate(
        &stack.amqp_url,
        &format!("tenant_{tenant}_queue"),
        args.rate,
        args.seconds,
    );
    if let Some(churner) = churner {
        churner.join().unwrap();
    }
    let seen = watcher.join().unwrap();
    sent.iter()
        .zip(seen)
        .map(|(s, v)| {
            v.map_or(f64::INFINITY, |v| {
                v.saturating_duration_since(*s).as_secs_f64() * 1000.0
            })
        })
        .collect()
}

/// Polls the tenant's partition every millisecond; returns when each `seq` first became visible.
fn watch_rows(
    stack: &Stack,
    tenant: &str,
    total: usize,
    limit: Duration,
) -> std::thread::JoinHandle<Vec<Option<Instant>>> {
    let mut pg = stack.pg();
    let tenant: uuid::Uuid = tenant.parse().unwrap();
    std::thread::spawn(move || {
        let mut seen: Vec<Option<Instant>> = vec![None; total];
        let mut count = 0;
        let mut since: DateTime<Utc> = DateTime::UNIX_EPOCH;
        let deadline = Instant::now() + limit;
        let query = pg
            .prepare(
                "SELECT (payload->>'seq')::bigint, created_at FROM messages
                 WHERE tenant_id = $1 AND created_at >= $2",
            )
            .unwrap();
        while count < total && Instant::now() < deadline {
            let rows = pg.query(&query, &[&tenant, &since]).unwrap();
            let now = Instant::now();
            for row in rows {
                let seq = row.get::<_, i64>(0) as usize;
                let at: DateTime<Utc> = row.get(1);
                if seq < total && seen[seq].is_none() {
                    seen[seq] = Some(now);
                    count += 1;
                }
                // Re-read a short window: a transaction that started earlier may commit later.
                since = since.max(at - chrono::Duration::milliseconds(200));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        seen
    })
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

fn tenants(stack: &mut Stack, args: &Args, report: &mut Report, created: &mut Vec<String>) {
    let mut times = Vec::with_capacity(args.create as usize);
    for i in 0..args.create {
        let started = Instant::now();
        created.push(stack.create_tenant(&format!("scale-{i}"), "active"));
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    report.add("create_p50_ms", percentile(&times, 0.50), "ms");
    report.add("create_p99_ms", percentile(&times, 0.99), "ms");
    std::thread::sleep(Duration::from_secs(3)); // let start-up work settle before measuring idle
    let pid = stack.pid();
    let sample = procstat::sample(pid);
    report.add("tenants", created.len() as f64, "");
    report.add("rss_mb", sample.rss_mb.round(), "MB");
    report.add("threads", sample.threads as f64, "");
    let before = procstat::cpu_time(pid);
    std::thread::sleep(Duration::from_secs(args.idle_seconds));
    let used = procstat::cpu_time(pid) - before;
    report.add(
        "idle_cpu_pct",
        100.0 * used.as_secs_f64() / args.idle_seconds as f64,
        "% of a core",
    );
}

/// Deletes what the run made in RabbitMQ; the database goes with the next run's DROP.
fn cleanup(stack: &Stack, created: &[String]) {
    let addr = tenantd::broker::BrokerAddr::parse(&stack.amqp_url).unwrap();
    let Ok(mut connection) =
        tenantd::broker::connect(&addr, Duration::from_secs(10), "bench cleanup")
    else {
        return;
    };
    let channel = connection.open_channel(None).unwrap();
    for t in created {
        for q in [format!("tenant_{t}_queue"), format!("tenant_{t}_dlq")] {
            let _ = channel.queue_delete(q, amiquip::QueueDeleteOptions::default());
        }
    }
    let _ = connection.close();
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let value = sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    (value * 100.0).round() / 100.0
}
