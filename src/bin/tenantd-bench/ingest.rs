//! Ingest: a backlog preloaded into paused tenants' queues, then resumed and stored, timed by
//! the rows' own `created_at`; the same backlog drained by plain consumers that only ack (the
//! broker's ceiling, at tenantd's prefetch); where the machine's CPU went meanwhile; and the
//! same pipeline storing one message per transaction, at the same prefetch and count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::load::{self, Acks};
use crate::procstat::{self, CpuSplit};
use crate::stack::Stack;
use crate::{Args, Report};

/// What one timed drain measured.
pub struct Drain {
    pub msgs_per_s: f64,
    /// Messages per INSERT, on average.
    pub avg_batch: f64,
    pub cpu: CpuSplit,
    /// tenantd's CPU by thread kind (`amiquip`, `tenant`, `worker`, …).
    pub threads: BTreeMap<String, Duration>,
    pub wall: Duration,
    pub peak_rss_mb: f64,
    /// When the last of the backlog's rows was stored (Unix time, µs).
    pub last_row_us: i64,
}

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    stack.start(&[]);
    let backlog = Backlog::in_paused_tenants(stack, args, "bench");
    // Rounds alternate tenantd and the plain consumers on the same backlog, so a slower minute
    // of the host falls on both sides of the ratio; the figures are the rounds' medians.
    let rounds: Vec<Vec<Figure>> = (1..=args.rounds)
        .map(|round| {
            let figures = measure_round(stack, &backlog);
            let line: Vec<String> = figures
                .iter()
                .map(|f| format!("{}={:.2}", f.key, f.value))
                .collect();
            eprintln!("  round {round}: {}", line.join(" "));
            figures
        })
        .collect();
    for figure in summarize(&rounds) {
        report.add(figure.key, figure.value, figure.unit);
    }

    if args.one_per_tx {
        // The same pipeline storing one message per transaction, at the same prefetch (as many
        // one-message batches in flight as messages before) and the same count.
        let batched = median_of(&rounds, "ingest_msgs_per_s");
        stack.stop();
        let workers = prefetch().to_string();
        stack.start(&[("BATCH_SIZE", "1"), ("MAX_WORKERS", &workers)]);
        for t in &backlog.tenants {
            stack.set_workers(t, prefetch());
        }
        backlog.preload(stack);
        let single = timed_drain(stack, &backlog);
        report.add("one_per_tx_msgs_per_s", single.msgs_per_s.round(), "msg/s");
        report.add("batching_speedup", batched / single.msgs_per_s, "x");
    }
}

/// One figure of one round.
struct Figure {
    key: &'static str,
    value: f64,
    unit: &'static str,
}

fn figure(key: &'static str, value: f64, unit: &'static str) -> Figure {
    Figure { key, value, unit }
}

/// tenantd's ingest, the broker's ceiling (plain consumers acking per burst) and the floor
/// (plain consumers acking per full batch), each on the same freshly preloaded backlog.
fn measure_round(stack: &Stack, backlog: &Backlog) -> Vec<Figure> {
    let Backlog {
        queues,
        per_queue,
        total,
        ..
    } = backlog;
    backlog.preload(stack);
    let ingest = timed_drain(stack, backlog);
    backlog.preload(stack);
    let broker = load::drain_rate(
        &stack.amqp_url,
        queues,
        *per_queue,
        prefetch(),
        Acks::PerBurst,
    );
    backlog.preload(stack);
    let every = Acks::Every(setting("BATCH_SIZE", 100).into());
    let batched = load::drain_rate(&stack.amqp_url, queues, *per_queue, prefetch(), every);

    let us_per_msg = |d: Duration| d.as_secs_f64() * 1e6 / *total as f64;
    let share = |d: Duration, wall: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64();
    let (tenantd, floor) = (
        us_per_msg(ingest.cpu.tenantd),
        us_per_msg(batched.cpu.tenantd),
    );
    let threads = |kind: &str| us_per_msg(ingest.threads.get(kind).copied().unwrap_or_default());
    let (rabbitmq, postgres) = (
        us_per_msg(ingest.cpu.rabbitmq),
        us_per_msg(ingest.cpu.postgres),
    );
    // The same CPU the ingest used, spent with tenantd costing only the amiquip floor: the
    // best ratio the machine allows this design, given what the broker and PostgreSQL spend.
    let at_floor =
        ingest.msgs_per_s * (rabbitmq + postgres + tenantd) / (rabbitmq + postgres + floor);
    // And with tenantd costing nothing at all: what the broker and PostgreSQL alone leave of
    // the machine, the most any consumer could store.
    let tenantd_free = ingest.msgs_per_s * (rabbitmq + postgres + tenantd) / (rabbitmq + postgres);
    vec![
        figure("ingest_msgs_per_s", ingest.msgs_per_s.round(), "msg/s"),
        figure("broker_msgs_per_s", broker.msgs_per_s.round(), "msg/s"),
        figure("ingest_ratio", ingest.msgs_per_s / broker.msgs_per_s, ""),
        figure("ingest_ratio_at_floor", at_floor / broker.msgs_per_s, ""),
        figure(
            "ingest_ratio_tenantd_free",
            tenantd_free / broker.msgs_per_s,
            "",
        ),
        // What the broker alone spends at its ceiling: on a small machine, what is left of it
        // for PostgreSQL and tenantd bounds the ratio.
        figure(
            "broker_drain_cpu_rabbitmq_pct",
            share(broker.cpu.rabbitmq, broker.wall).round(),
            "% of a core",
        ),
        figure(
            "broker_batched_acks_msgs_per_s",
            batched.msgs_per_s.round(),
            "msg/s",
        ),
        figure("tenantd_cpu_us_per_msg", tenantd, "µs"),
        figure("amiquip_floor_us_per_msg", floor, "µs"),
        // tenantd against a bare amiquip consumer on the same backlog, the same minute: the
        // host's speed, which moves both, drops out.
        figure("tenantd_cpu_vs_floor", tenantd / floor, "x"),
        // Where tenantd's own CPU went: amiquip's I/O threads (the floor's share), the tenant
        // threads, the workers.
        figure("tenantd_io_threads_us_per_msg", threads("amiquip"), "µs"),
        figure("tenantd_tenant_threads_us_per_msg", threads("tenant"), "µs"),
        figure("tenantd_workers_us_per_msg", threads("worker"), "µs"),
        // The rest: the API's and the coordinator's threads, and threads that ended during the
        // ingest (the requests that resumed the tenants): starting the consumers, spread over
        // the backlog.
        figure(
            "tenantd_other_us_per_msg",
            tenantd
                - ["amiquip", "tenant", "worker"]
                    .map(threads)
                    .iter()
                    .sum::<f64>(),
            "µs",
        ),
        figure("ingest_rabbitmq_us_per_msg", rabbitmq, "µs"),
        figure("ingest_postgres_us_per_msg", postgres, "µs"),
        figure(
            "ingest_cpu_tenantd_pct",
            share(ingest.cpu.tenantd, ingest.wall).round(),
            "% of a core",
        ),
        figure(
            "ingest_cpu_rabbitmq_pct",
            share(ingest.cpu.rabbitmq, ingest.wall).round(),
            "% of a core",
        ),
        figure(
            "ingest_cpu_postgres_pct",
            share(ingest.cpu.postgres, ingest.wall).round(),
            "% of a core",
        ),
        figure("drain_peak_rss_mb", ingest.peak_rss_mb.round(), "MB"),
        figure("ingest_avg_batch", ingest.avg_batch.round(), "messages"),
    ]
}

/// Each figure's median over the rounds (the peak RSS: its largest), and the range of the two
/// goals.
fn summarize(rounds: &[Vec<Figure>]) -> Vec<Figure> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let mut summary = Vec::new();
    for f in first {
        let values: Vec<f64> = rounds.iter().map(|r| value_of(r, f.key)).collect();
        let value = match f.key {
            "drain_peak_rss_mb" => values.iter().copied().fold(f64::MIN, f64::max),
            _ => median(&values),
        };
        summary.push(figure(f.key, value, f.unit));
        let range = |key: (&'static str, &'static str)| {
            let low = values.iter().copied().fold(f64::MAX, f64::min);
            let high = values.iter().copied().fold(f64::MIN, f64::max);
            [figure(key.0, low, f.unit), figure(key.1, high, f.unit)]
        };
        match f.key {
            "ingest_ratio" => summary.extend(range(("ingest_ratio_min", "ingest_ratio_max"))),
            "tenantd_cpu_us_per_msg" => summary.extend(range((
                "tenantd_cpu_us_per_msg_min",
                "tenantd_cpu_us_per_msg_max",
            ))),
            _ => {}
        }
    }
    summary
}

fn value_of(round: &[Figure], key: &str) -> f64 {
    round
        .iter()
        .find(|f| f.key == key)
        .map_or(f64::NAN, |f| f.value)
}

fn median_of(rounds: &[Vec<Figure>], key: &str) -> f64 {
    median(&rounds.iter().map(|r| value_of(r, key)).collect::<Vec<_>>())
}

fn median(values: &[f64]) -> f64 {
    crate::percentile(values, 0.5)
}

/// tenantd's prefetch per tenant with the settings it inherits: DEFAULT_WORKERS × BATCH_SIZE.
pub fn prefetch() -> u16 {
    setting("DEFAULT_WORKERS", 3) * setting("BATCH_SIZE", 100)
}

/// A tenantd setting the bench passes through, or its default.
fn setting(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Paused tenants sharing a backlog of messages, loaded into their queues before each timing.
pub struct Backlog {
    pub tenants: Vec<String>,
    pub queues: Vec<String>,
    pub per_queue: u64,
    pub total: u64,
}

impl Backlog {
    /// `args.tenants` paused tenants named `{prefix}-N`, sharing `args.messages`.
    pub fn in_paused_tenants(stack: &mut Stack, args: &Args, prefix: &str) -> Backlog {
        let tenants: Vec<String> = (0..args.tenants)
            .map(|i| stack.create_tenant(&format!("{prefix}-{i}"), "inactive"))
            .collect();
        let queues = tenants
            .iter()
            .map(|t| format!("tenant_{t}_queue"))
            .collect();
        let per_queue = args.messages / args.tenants;
        Backlog {
            tenants,
            queues,
            per_queue,
            total: per_queue * args.tenants,
        }
    }

    pub fn preload(&self, stack: &Stack) {
        load::preload(&stack.amqp_url, &self.queues, self.per_queue);
    }
}

/// Resumes the backlog's tenants (all at once, as the broker's ceiling opens its consumers) and
/// waits for its rows; the rate is the rows over the time from the resume to the last row's
/// `created_at` (the database's own clock, so polling for the end costs nothing to the figure).
/// Pauses the tenants again.
pub fn timed_drain(stack: &Stack, backlog: &Backlog) -> Drain {
    let mut pg = stack.pg();
    let target = stack.rows(&mut pg) + backlog.total as i64;
    let pids = [stack.pid()];
    let batches_before = batches(stack);
    let peak = PeakRss::watch(stack.pid());
    let cpu_before = CpuSplit::now(&pids);
    let threads_before = procstat::cpu_by_thread_kind(stack.pid());
    let wall = Instant::now();
    let started: DateTime<Utc> = pg
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0);
    set_status_all(stack, &backlog.tenants, "active");
    wait_for_rows(stack, &mut pg, &backlog.queues, target);
    let cpu = CpuSplit::now(&pids).since(cpu_before);
    // Read before the pause: a paused tenant's threads end, and their CPU time with them.
    let threads =
        procstat::thread_kinds_since(procstat::cpu_by_thread_kind(stack.pid()), &threads_before);
    let wall = wall.elapsed();
    let last: DateTime<Utc> = pg
        .query_one(
            "SELECT max(created_at) FROM messages WHERE tenant_id::text = ANY($1)",
            &[&backlog.tenants],
        )
        .unwrap()
        .get(0);
    set_status_all(stack, &backlog.tenants, "inactive");
    let seconds = (last - started).num_microseconds().unwrap_or(1) as f64 / 1e6;
    let (sum, count) = batches(stack);
    Drain {
        msgs_per_s: backlog.total as f64 / seconds,
        avg_batch: (sum - batches_before.0) / (count - batches_before.1).max(1.0),
        cpu,
        threads,
        wall,
        peak_rss_mb: peak.stop(),
        last_row_us: last.timestamp_micros(),
    }
}

/// Sets every tenant's status, one request per tenant, all in flight together.
fn set_status_all(stack: &Stack, tenants: &[String], status: &str) {
    std::thread::scope(|s| {
        for t in tenants {
            s.spawn(move || stack.set_status(t, status));
        }
    });
}

/// Waits until `target` rows are stored. `count(*)` reads every row (with parallel workers),
/// so polling it would take PostgreSQL's CPU from the ingest being measured: while the broker
/// still holds ready messages for the queues (a passive declare, nearly free, says so), the
/// ingest is not over and the rows are not counted.
pub fn wait_for_rows(stack: &Stack, pg: &mut postgres::Client, queues: &[String], target: i64) {
    let mut broker = load::connect(&stack.amqp_url);
    let channel = broker.open_channel(None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    // A failed declare closes the channel: from then on only the rows are counted.
    let ready = |queue: &String| {
        channel
            .queue_declare_passive(queue.as_str())
            .map_or(0, |q| q.declared_message_count().unwrap_or(0))
    };
    while queues.iter().any(|q| ready(q) > 0) || stack.rows(pg) < target {
        assert!(Instant::now() < deadline, "ingest did not finish");
        std::thread::sleep(Duration::from_millis(250)); // a light poll; the figure is the rows' own time
    }
    let _ = broker.close();
}

/// Messages stored and batches that stored them, from tenantd's `/metrics`.
fn batches(stack: &Stack) -> (f64, f64) {
    let text = stack.request("GET", "/metrics", None).text();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("tenantd_batch_messages_sum"),
        value("tenantd_batch_messages_count"),
    )
}

/// Samples a process's RSS every 50 ms until stopped; the peak.
struct PeakRss {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl PeakRss {
    fn watch(pid: u32) -> PeakRss {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !flag.load(Ordering::SeqCst) {
                peak = peak.max(procstat::sample(pid).rss_mb);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        PeakRss { done, thread }
    }

    fn stop(self) -> f64 {
        self.done.store(true, Ordering::SeqCst);
        self.thread.join().unwrap_or(0.0)
    }
}
