//! The start under backlog: many tenants, each with a backlog, and tenantd started on them.
//! How long until the last consumer runs (and tenantd's CPU by then), the ingest of the whole
//! backlog against the broker's own drain of the same messages from 10 queues, tenantd's CPU
//! per message with the start included, and the bare amiquip floor for opening as many
//! consumers (connect, channel, qos, consume) on this machine: on empty queues, and on the
//! preloaded ones with every consume held until all sessions are open, as tenantd's gate does.
//! Those gated consumers then drain the backlog, storing nothing: the rate and CPU per message
//! that a connection per tenant allows at best, against which tenantd's start is read.

use std::time::{Duration, Instant};

use amiquip::ConsumerOptions;
use chrono::{DateTime, Utc};

use crate::ingest::{self, Backlog};
use crate::load::{self, Acks};
use crate::procstat::{self, CpuSplit};
use crate::stack::Stack;
use crate::{Args, Report};

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    let (count, per_queue) = (args.start_tenants, args.start_per_tenant);
    stack.start(&[]);
    let tenants: Vec<String> = (0..count)
        .map(|i| stack.create_tenant(&format!("start-{i}"), "active"))
        .collect();
    let queues: Vec<String> = tenants
        .iter()
        .map(|t| format!("tenant_{t}_queue"))
        .collect();
    let backlog = Backlog {
        tenants,
        queues,
        per_queue,
        total: per_queue * count,
    };
    stack.stop();
    backlog.preload(stack);
    // The same opening against the backlog, before tenantd: each consume makes its queue push a
    // prefetch window at once; closing gives the windows back to the queues.
    let (loaded, _, consumes) = bare_consumers(&stack.amqp_url, &backlog.queues, true);
    report.add(
        "bare_gated_open_loaded_s",
        loaded.as_secs_f64(),
        "s, sessions opened, then all consume together, on the preloaded queues",
    );
    report.add(
        "bare_gated_consumes_loaded_s",
        consumes.as_secs_f64(),
        "s of it from the gate to the last consume-ok (each consume pushes a window)",
    );

    let mut pg = stack.pg();
    let target = stack.rows(&mut pg) + backlog.total as i64;
    let started_db: DateTime<Utc> = pg
        .query_one("SELECT clock_timestamp()", &[])
        .unwrap()
        .get(0);
    let started = Instant::now();
    let started_wall = Utc::now();
    let cpu_before = CpuSplit::now(&[]);
    let log = StartLog::new();
    stack.replica_logs = Some(log.dir.clone());
    stack.start(&[("LOG_LEVEL", "info")]);
    stack.replica_logs = None;
    report.add("start_http_up_s", started.elapsed().as_secs_f64(), "s");
    let pid = stack.pid();
    let (last_start, cpu_at_last, sweep) = wait_all_running(stack, &backlog.queues, started);
    report.add(
        "start_last_consumer_s",
        last_start.as_secs_f64(),
        "s (goal <= 5)",
    );
    report.add(
        "start_sweep_s",
        sweep.as_secs_f64(),
        "s, the longest sweep of the broker's counts (the figure above is late by at most this)",
    );
    report.add("start_cpu_by_last_s", cpu_at_last.as_secs_f64(), "s of CPU");
    ingest::wait_for_rows(stack, &mut pg, &backlog.queues, target);
    let cpu = procstat::cpu_time(pid);
    let others = CpuSplit::now(&[]).since(cpu_before);
    let last: DateTime<Utc> = pg
        .query_one("SELECT max(created_at) FROM messages", &[])
        .unwrap()
        .get(0);
    let seconds = (last - started_db).num_microseconds().unwrap_or(1) as f64 / 1e6;
    let (consumers, last_started) = log.consumers_started(started_wall);
    report.add(
        "start_last_consumer_log_s",
        last_started,
        "s, the last consume-ok in tenantd's own log (goal <= 5)",
    );
    report.add("start_consumers_logged", consumers as f64, "consumers");
    let ingest_rate = backlog.total as f64 / seconds;
    report.add("start_ingest_msgs_per_s", ingest_rate.round(), "msg/s");
    let us = cpu.as_secs_f64() * 1e6 / backlog.total as f64;
    report.add("start_tenantd_cpu_us_per_msg", us, "µs (goal <= 10)");
    eprintln!(
        "  stored by second since the start: {}",
        stored_by_second(&mut pg, started_db)
    );
    stack.stop();

    // The broker's own drain of the same messages from 10 queues, at tenantd's prefetch.
    drop(pg);
    let mut ten = Stack::new(&stack.pg_server, &stack.amqp_url);
    ten.start(&[]);
    let tenants: Vec<String> = (0..10)
        .map(|i| ten.create_tenant(&format!("drain-{i}"), "inactive"))
        .collect();
    let drain = Backlog {
        queues: tenants
            .iter()
            .map(|t| format!("tenant_{t}_queue"))
            .collect(),
        tenants,
        per_queue: backlog.total / 10,
        total: backlog.total,
    };
    drain.preload(&ten);
    let broker = load::drain_rate(
        &ten.amqp_url,
        &drain.queues,
        drain.per_queue,
        ingest::prefetch(),
        Acks::PerBurst,
    );
    report.add(
        "start_broker_msgs_per_s",
        broker.msgs_per_s.round(),
        "msg/s",
    );
    report.add(
        "start_ingest_ratio",
        ingest_rate / broker.msgs_per_s,
        "(goal >= 0.8)",
    );

    ten.stop();

    // The same 1,000 consumers draining the backlog, acking per burst and storing nothing: what
    // a connection per tenant allows at best.
    backlog.preload(stack);
    let bare = load::gated_drain_rate(
        &stack.amqp_url,
        &backlog.queues,
        per_queue,
        ingest::prefetch(),
    );
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / backlog.total as f64;
    let floor = per_msg(bare.cpu.tenantd);
    report.add(
        "bare_start_drain_msgs_per_s",
        bare.msgs_per_s.round(),
        "msg/s, a connection per queue, gated, from the first connect",
    );
    report.add(
        "bare_start_drain_ratio",
        bare.msgs_per_s / broker.msgs_per_s,
        "of the broker's 10-queue drain: a connection per tenant costs the broker nothing",
    );
    report.add(
        "bare_start_drain_cpu_us_per_msg",
        floor,
        "µs of the consumers' CPU: the floor of start_tenantd_cpu_us_per_msg",
    );
    // The CPU the start used, spent with tenantd costing only that floor, or nothing: the best
    // ratio the machine allows, given what the broker and PostgreSQL spent storing it.
    let (rabbitmq, postgres) = (per_msg(others.rabbitmq), per_msg(others.postgres));
    let spent = rabbitmq + postgres + us;
    report.add("start_rabbitmq_us_per_msg", rabbitmq, "µs");
    report.add("start_postgres_us_per_msg", postgres, "µs");
    report.add(
        "start_ratio_at_floor",
        ingest_rate * spent / (rabbitmq + postgres + floor) / broker.msgs_per_s,
        "(tenantd at the bare consumers' CPU)",
    );
    report.add(
        "start_ratio_tenantd_free",
        ingest_rate * spent / (rabbitmq + postgres) / broker.msgs_per_s,
        "(tenantd costing nothing: the broker and PostgreSQL alone)",
    );

    let (wall, cpu, _) = bare_consumers(&stack.amqp_url, &backlog.queues, false);
    report.add("bare_open_consumers_s", wall.as_secs_f64(), "s");
    report.add("bare_open_consumers_cpu_s", cpu.as_secs_f64(), "s of CPU");
}

/// The rows stored in each second since `start`, as "0:n0 1:n1 …": how the ingest ramps up.
fn stored_by_second(pg: &mut postgres::Client, start: DateTime<Utc>) -> String {
    let sql = "SELECT floor(extract(epoch FROM created_at - $1))::int8 AS s, count(*)
               FROM messages GROUP BY 1 ORDER BY 1";
    pg.query(sql, &[&start])
        .unwrap()
        .iter()
        .map(|row| format!("{}:{}", row.get::<_, i64>(0), row.get::<_, i64>(1)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Polls the broker until every queue has a consumer (a passive declare counts them): when
/// (since `started`), tenantd's CPU by then, and the longest sweep (the figure's resolution).
/// The broker's count, not tenantd's gauge, which the coordinator updates only as it gets to
/// each consumer's event. The queues are swept by `SWEEPERS` connections at once: one
/// connection's sweep of 1,000 queues takes ~25 s on a loaded broker, which was the figure.
fn wait_all_running(
    stack: &Stack,
    queues: &[String],
    started: Instant,
) -> (Duration, Duration, Duration) {
    let pid = stack.pid();
    let found = std::sync::Mutex::new((Duration::ZERO, Duration::ZERO, Duration::ZERO));
    let chunk = queues.len().div_ceil(SWEEPERS).max(1);
    std::thread::scope(|s| {
        for part in queues.chunks(chunk) {
            let found = &found;
            s.spawn(move || {
                let (last, cpu, sweep) = sweep_until_consumed(&stack.amqp_url, part, started, pid);
                let mut found = found.lock().unwrap();
                if last > found.0 {
                    (found.0, found.1) = (last, cpu);
                }
                found.2 = found.2.max(sweep);
            });
        }
    });
    found.into_inner().unwrap()
}

/// The measured tenantd's own log, read for its "consumer started" lines: each is written as the
/// broker's consume-ok arrives, so the last is a bound the broker's sweep cannot tighten. It is
/// left in the temporary directory, for a look at the timeline.
struct StartLog {
    dir: std::path::PathBuf,
}

impl StartLog {
    fn new() -> StartLog {
        let dir = std::env::temp_dir().join(format!("tenantd-bench-start-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a directory for tenantd's log");
        StartLog { dir }
    }

    /// How many consumers started, and the last one's time (s) after `since`.
    fn consumers_started(&self, since: DateTime<Utc>) -> (usize, f64) {
        let path = self.dir.join("main.log");
        println!("tenantd's log of the start: {}", path.display());
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let times: Vec<f64> = text
            .lines()
            .filter(|l| l.contains("consumer started"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<DateTime<Utc>>().ok())
            .map(|t| (t - since).num_microseconds().unwrap_or(0) as f64 / 1e6)
            .collect();
        (times.len(), times.iter().copied().fold(0.0, f64::max))
    }
}

/// Connections sweeping the queues for consumers at once.
const SWEEPERS: usize = 50;

/// One connection's sweeps over `queues` until each has a consumer: when the last was found,
/// tenantd's CPU then, and the longest sweep.
fn sweep_until_consumed(
    url: &str,
    queues: &[String],
    started: Instant,
    pid: u32,
) -> (Duration, Duration, Duration) {
    let mut broker = load::connect(url);
    let channel = broker.open_channel(None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut waiting: Vec<&String> = queues.iter().collect();
    let (mut last, mut cpu, mut longest) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    while !waiting.is_empty() {
        let sweep = Instant::now();
        waiting.retain(|q| {
            let none = channel
                .queue_declare_passive(q.as_str())
                .map_or(true, |q| q.declared_consumer_count().unwrap_or(0) == 0);
            if !none {
                (last, cpu) = (started.elapsed(), procstat::cpu_time(pid));
            }
            none
        });
        longest = longest.max(sweep.elapsed());
        assert!(Instant::now() < deadline, "the consumers did not all start");
    }
    let _ = broker.close();
    (last, cpu, longest)
}

/// Opens a consumer on each queue as tenantd does, all at once, one connection each; the time
/// until the last consumes and this process's CPU for it. With `gated`, every consumer waits
/// until all sessions are open (as tenantd's start gate does), and the third figure is the time
/// from then to the last consume-ok.
fn bare_consumers(url: &str, queues: &[String], gated: bool) -> (Duration, Duration, Duration) {
    let me = std::process::id();
    let cpu_before = procstat::cpu_time(me);
    let started = Instant::now();
    let prefetch = ingest::prefetch();
    let (opened_tx, opened) = crossbeam_channel::unbounded();
    let (close_tx, close) = crossbeam_channel::bounded::<()>(0);
    let gate = std::sync::Barrier::new(if gated { queues.len() + 1 } else { 1 });
    let (mut elapsed, mut after_gate) = (Duration::ZERO, Duration::ZERO);
    std::thread::scope(|s| {
        for queue in queues {
            let (opened_tx, close, gate) = (opened_tx.clone(), close.clone(), &gate);
            s.spawn(move || {
                let mut connection = load::connect(url);
                let channel = connection.open_channel(None).unwrap();
                channel.qos(0, prefetch, false).unwrap();
                if gated {
                    gate.wait();
                }
                let consumer = channel
                    .basic_consume(queue.as_str(), ConsumerOptions::default())
                    .unwrap();
                let _ = opened_tx.send(());
                let _ = close.recv();
                drop(consumer);
                let _ = connection.close();
            });
        }
        if gated {
            gate.wait();
        }
        let released = Instant::now();
        for _ in queues {
            opened.recv().unwrap();
        }
        (elapsed, after_gate) = (started.elapsed(), released.elapsed());
        drop(close_tx);
    });
    let cpu = procstat::cpu_time(me).saturating_sub(cpu_before);
    (elapsed, cpu, after_gate)
}
