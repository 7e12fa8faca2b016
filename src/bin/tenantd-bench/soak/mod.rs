//! The fault soak: three replicas of the real binary on private PostgreSQL and RabbitMQ
//! servers, messages with ids published to 30 tenants (1 in 100 not JSON), lifecycle calls
//! through random replicas, and a nemesis injecting one fault at a time. Then the checker: nothing lost, nothing stored
//! twice, each poison message dead-lettered once, and no active tenant without a consumer for
//! longer than `FAILOVER_TIMEOUT` + 5 s after any fault.

mod check;
mod fleet;
mod nemesis;
mod servers;
mod traffic;
mod watch;

#[allow(dead_code)] // the tests freeze paths too
#[path = "../../../../tests/it/support/proxy.rs"]
mod proxy;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::stack::http;
use crate::{Args, Report};
use fleet::Fleet;
use nemesis::Nemesis;
use servers::Servers;
use traffic::Lifecycle;
use watch::Watch;

pub struct Settings {
    /// The replicas' `FAILOVER_TIMEOUT` (F): 6 s unless set in the environment.
    pub failover: Duration,
    /// The replicas' `BROKER_HEARTBEAT_SECS`: 2 s unless set.
    pub heartbeat: Duration,
    /// How long faults go on after the first round of every kind.
    pub seconds: Duration,
    /// Messages a second to each tenant.
    pub rate: u64,
    pub tenants: usize,
    pub seed: u64,
    interrupted: Arc<AtomicBool>,
}

impl Settings {
    fn new(args: &Args) -> Settings {
        let env = |name: &str, default: u64| -> u64 {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Settings {
            failover: Duration::from_secs(env("FAILOVER_TIMEOUT", 6)),
            heartbeat: Duration::from_secs(env("BROKER_HEARTBEAT_SECS", 2)),
            seconds: Duration::from_secs(args.soak_seconds),
            rate: args.soak_rate,
            tenants: 30,
            seed: args.soak_seed,
            interrupted: interrupt_flag(),
        }
    }

    /// The longest an active tenant may go without a consumer after a fault: F + 5 s.
    pub fn goal(&self) -> Duration {
        self.failover + Duration::from_secs(5)
    }

    /// Sleeps; a Ctrl-C ends the soak here, its servers stopped and removed on the way out.
    pub fn sleep(&self, d: Duration) {
        assert!(
            !self.interrupted.load(Ordering::SeqCst),
            "interrupted: stopping the soak"
        );
        std::thread::sleep(d);
    }
}

/// The first SIGINT or SIGTERM sets the flag (the soak then stops its servers); a second one
/// exits at once.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())
            .and_then(|_| signal_hook::flag::register(signal, flag.clone()))
            .expect("signal handlers");
    }
    flag
}

/// The threads of the run, told to stop one by one — or all at once when the run fails.
#[derive(Default)]
struct Stops {
    lifecycle: AtomicBool,
    publisher: AtomicBool,
    watch: AtomicBool,
}

struct StopAll<'a>(&'a Stops);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        for flag in [&self.0.lifecycle, &self.0.publisher, &self.0.watch] {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// What the run under faults gave the checker.
struct Run {
    faults: Vec<nemesis::Fault>,
    published: traffic::Published,
    calls: traffic::Calls,
    /// How long the backlog took to drain at the end, and whether it did.
    drained: (f64, bool),
    began: Instant,
}

pub fn run(args: &Args, report: &mut Report) {
    let settings = Settings::new(args);
    eprintln!(
        "  F = {} s, broker heartbeat {} s, {} tenants × {} msg/s, faults for {} s; load {}",
        settings.failover.as_secs(),
        settings.heartbeat.as_secs(),
        settings.tenants,
        settings.rate,
        settings.seconds.as_secs(),
        loadavg()
    );
    let logs = std::env::temp_dir().join("tenantd-soak-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).expect("the replicas' log directory");
    eprintln!("  replicas' logs in {}", logs.display());
    let setup = Instant::now();
    // Declared first, dropped last: the replicas go before their servers.
    let mut servers = Servers::start();
    eprintln!("  servers up in {:.1} s", setup.elapsed().as_secs_f64());
    let fleet = Fleet::start(&servers, &settings, &logs);
    let tenants = create_tenants(&fleet, settings.tenants);
    let took = setup.elapsed().as_secs_f64();
    eprintln!("  replicas and tenants up in {took:.1} s");
    let watch = Watch::default();
    let run = under_faults(&settings, &mut servers, &fleet, &tenants, &watch);
    let seen = watch.finish();
    let refusals = &run.calls.refusals;
    eprintln!(
        "  load {}; lifecycle calls refused: {refusals:?}",
        loadavg()
    );
    check::stored(&mut fleet.pg(), &run.published, &tenants, report);
    check::dead_letters(
        &servers.amqp_url(),
        &tenants,
        &run.published,
        &run.faults,
        report,
    );
    let rows = check::spans(&run.faults, &seen.gaps, &seen.doubles, report);
    let goal = settings.goal().as_secs_f64();
    report.add("goal_s", goal, "s without a consumer, at most");
    report.add("faults", run.faults.len() as f64, "");
    let (drain_s, drained) = run.drained;
    report.add("drain_s", (drain_s * 10.0).round() / 10.0, "s");
    report.add(
        "drained",
        f64::from(u8::from(drained)),
        "1: all consumed at the end",
    );
    let calls = &run.calls;
    report.add("lifecycle_calls", calls.made as f64, "");
    report.add("lifecycle_applied", calls.applied as f64, "");
    report.add("lifecycle_accepted", calls.accepted as f64, "202");
    report.add("lifecycle_refused", calls.refused as f64, "4xx/5xx");
    report.add("lifecycle_unanswered", calls.unanswered as f64, "");
    let orphans = orphan_queues(&servers, &mut fleet.pg());
    report.add("orphan_queues", orphans as f64, "");
    report.add("watch_samples", seen.samples as f64, "");
    report.add("soak_s", run.began.elapsed().as_secs_f64().round(), "s");
    check::print_faults(&rows, &settings);
}

/// Traffic, lifecycle calls and the watch on threads of their own while the nemesis injects
/// its faults; then the desired state restored and the backlog drained.
fn under_faults(
    settings: &Settings,
    servers: &mut Servers,
    fleet: &Fleet,
    tenants: &[Uuid],
    watch: &Watch,
) -> Run {
    let amqp_url = servers.amqp_url();
    let pg_url = fleet.pg_url();
    let queues: Vec<String> = tenants
        .iter()
        .map(|t| format!("tenant_{t}_queue"))
        .collect();
    let stops = Stops::default();
    let burst = traffic::Burst::default();
    let began = Instant::now();
    std::thread::scope(|s| {
        let _stop_all = StopAll(&stops);
        let watcher = s.spawn(|| watch.run(&pg_url, &amqp_url, &stops.watch));
        let consumed = wait(settings, "every tenant consumed", || {
            watch.all_consumed_after(began)
        });
        assert!(consumed, "the soak's tenants did not all get a consumer");
        let (url, queues, burst, stop) = (&amqp_url, &queues, &burst, &stops.publisher);
        let publisher = s.spawn(move || traffic::publish(url, queues, settings.rate, burst, stop));
        let lifecycle = s.spawn(|| {
            let mut lifecycle = Lifecycle::new(fleet, tenants, settings.seed);
            lifecycle.run(&stops.lifecycle);
            lifecycle
        });
        let faults = Nemesis {
            fleet,
            servers,
            watch,
            settings,
            burst,
            pg: None,
        }
        .run();
        stops.lifecycle.store(true, Ordering::SeqCst);
        let mut lifecycle = join(lifecycle);
        restore_desired(&mut lifecycle, settings);
        stops.publisher.store(true, Ordering::SeqCst);
        let published = join(publisher);
        let drained = check::drain(servers, tenants, settings);
        stops.watch.store(true, Ordering::SeqCst);
        join(watcher);
        Run {
            faults,
            published,
            calls: lifecycle.calls,
            drained,
            began,
        }
    })
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Polls `check` for up to 60 s.
fn wait(settings: &Settings, what: &str, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        if Instant::now() > deadline {
            eprintln!("  gave up waiting for {what}");
            return false;
        }
        settings.sleep(Duration::from_millis(100)); // a poll
    }
    true
}

fn create_tenants(fleet: &Fleet, n: usize) -> Vec<Uuid> {
    let base = fleet.base(0).expect("r1 runs");
    (0..n)
        .map(|i| {
            let body = json!({ "name": format!("soak-{i}") }).to_string();
            let reply = http::request(&base, "POST", "/api/tenants", Some(body.as_bytes()));
            assert_eq!(reply.status, 201, "{}", reply.text());
            reply.json()["id"].as_str().unwrap().parse().unwrap()
        })
        .collect()
}

/// Every paused tenant resumed, every extra tenant deleted, so that the end state is known.
fn restore_desired(lifecycle: &mut Lifecycle, settings: &Settings) {
    let done = wait(settings, "the paused tenants resumed", || {
        lifecycle.resume_oldest();
        lifecycle.paused.is_empty()
    });
    assert!(done, "tenants still paused: {:?}", lifecycle.paused);
    wait(settings, "the extra tenants deleted", || {
        lifecycle.delete_oldest_extra();
        lifecycle.extras.is_empty()
    });
}

/// Queues of tenants that do not exist (a create that failed midway leaves them).
fn orphan_queues(servers: &Servers, pg: &mut postgres::Client) -> usize {
    let tenants: Vec<String> = pg
        .query("SELECT id::text FROM tenants", &[])
        .expect("reading the tenants")
        .iter()
        .map(|r| r.get(0))
        .collect();
    servers
        .queues()
        .iter()
        .filter(|(name, _, _)| {
            name.starts_with("tenant_") && !tenants.iter().any(|t| name.contains(t.as_str()))
        })
        .count()
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
