//! Fairness: a quiet tenant publishing at a steady rate while 40 others drain a backlog. Its
//! publish → stored latency idle, under a flood of plain consumers that only ack (what the
//! machine leaves when the broker is saturated), under tenantd's own flood of the same messages,
//! and under the plain flood again beside CPU burnt as tenantd and PostgreSQL spent it during
//! tenantd's flood (the floor for a flood that stores). Where its delay goes: the broker's
//! delivery (a plain probe consumer receiving a copy of each quiet message), the wait for a
//! worker, and the rest. Only messages published while a flood lasts count as under it.

use std::time::Duration;

use crate::burn::Burn;
use crate::ingest::{self, Backlog};
use crate::load::{self, Acks};
use crate::quiet::{declare_probe, delete_probe, Measured, Quiet};
use crate::stack::Stack;
use crate::{percentile, Args, Report};

const FLOOD_TENANTS: u64 = 40;
const FLOOD_BACKLOG: u64 = 10_000;

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    stack.start(&[]);
    let flood = flood_tenants(stack);
    declare_probe(stack);

    let idle = Quiet::start(stack, "quiet-idle").publish(stack);
    report_latency(
        report,
        ["quiet_idle_p50_ms", "quiet_idle_p99_ms"],
        &idle.all(),
    );

    // Rounds of (tenantd's flood, the bare flood, the bare flood beside storing's CPU), so that
    // a slower minute of the host falls on every side; each side's samples are pooled over the
    // rounds.
    let mut bare = Pooled::default();
    let mut tenantd = Pooled::default();
    let mut loaded = Pooled::default();
    for round in 1..=args.rounds {
        let (t, storing_cores) = tenantd_flood(stack, &flood, round);
        let b = bare_flood(stack, &flood, &format!("quiet-bare-{round}"));
        let burn = Burn::start(storing_cores);
        let l = bare_flood(stack, &flood, &format!("quiet-loaded-{round}"));
        drop(burn);
        eprintln!(
            "  round {round}: beside the bare flood with {storing_cores:.2} cores burnt as \
             storing did: quiet p99 {:.2} ms, the probe's {:.2} ms",
            l.quiet_p99(),
            l.probe_p99()
        );
        loaded.storing_cores.push(storing_cores);
        loaded.add(l);
        let (bq, tq) = (b.quiet_p99(), t.quiet_p99());
        eprintln!(
            "  round {round}: quiet p99 during the flood: bare {bq:.2} ms, tenantd {tq:.2} ms \
             ({:.2}x); the probe's p99 {:.2} / {:.2} ms; flood {:.0} / {:.0} msg/s",
            tq / bq,
            b.probe_p99(),
            t.probe_p99(),
            b.flood_msgs_per_s,
            t.flood_msgs_per_s,
        );
        bare.add(b);
        tenantd.add(t);
    }
    report_stages(report, &bare, &tenantd);
    report_loaded(report, &loaded, &tenantd);
    delete_probe(stack);
}

fn report_stages(report: &mut Report, bare: &Pooled, tenantd: &Pooled) {
    let bare_keys = [
        "quiet_bare_p50_ms",
        "quiet_bare_p99_ms",
        "quiet_bare_all_p99_ms",
    ];
    report_flood(report, bare_keys, "bare_flood_msgs_per_s", bare);
    let keys = [
        "quiet_tenantd_p50_ms",
        "quiet_tenantd_p99_ms",
        "quiet_tenantd_all_p99_ms",
    ];
    report_flood(report, keys, "tenantd_flood_msgs_per_s", tenantd);
    let ratio = |p| percentile(&tenantd.quiet, p) / percentile(&bare.quiet, p);
    report.add(
        "flood_p99_ratio",
        round2(ratio(0.99)),
        "x (goal <= 1.5; during the floods)",
    );
    report.add("flood_p50_ratio", round2(ratio(0.50)), "x");
    let all = percentile(&tenantd.quiet_all, 0.99) / percentile(&bare.quiet_all, 0.99);
    report.add("flood_p99_ratio_all", round2(all), "x (every sample)");
    report_latency(
        report,
        ["probe_bare_p50_ms", "probe_bare_p99_ms"],
        &bare.probe,
    );
    report_latency(
        report,
        ["probe_tenantd_p50_ms", "probe_tenantd_p99_ms"],
        &tenantd.probe,
    );
    // The quiet tenant's delay under tenantd's flood against the broker's delivery of the same
    // messages to the probe, a plain consumer on the same broker at the same moment (pairing
    // copies does not isolate tenantd: each queue's delivery varies on its own). Of tenantd's
    // part, the wait for a worker is the pool's own count.
    let vs_probe = |p| percentile(&tenantd.quiet, p) / percentile(&tenantd.probe, p);
    report.add(
        "quiet_vs_probe_p99_ratio",
        round2(vs_probe(0.99)),
        "x (tenantd's flood)",
    );
    let mean = mean_of(&tenantd.quiet);
    let broker = mean_of(&tenantd.probe);
    report.add("tenantd_flood_mean_ms", round2(mean), "ms");
    report.add(
        "tenantd_flood_broker_ms",
        round2(broker),
        "ms (mean: the broker's delivery)",
    );
    report.add(
        "tenantd_flood_tenantd_ms",
        round2(mean - broker),
        "ms (mean: the rest)",
    );
    report.add(
        "tenantd_flood_pool_wait_ms",
        round2(tenantd.pool_wait_ms()),
        "ms (mean: of which waiting for a worker)",
    );
    report.add("bare_flood_mean_ms", round2(mean_of(&bare.quiet)), "ms");
    report.add(
        "bare_flood_broker_ms",
        round2(mean_of(&bare.probe)),
        "ms (mean)",
    );
}

/// The bare flood beside CPU burnt as tenantd and PostgreSQL spent it during tenantd's flood:
/// the floor for a flood that stores, on a machine where storing shares the broker's cores.
fn report_loaded(report: &mut Report, loaded: &Pooled, tenantd: &Pooled) {
    let cores = mean_of(&loaded.storing_cores);
    report.add(
        "storing_cpu_cores",
        round2(cores),
        "cores (tenantd + PostgreSQL, its flood)",
    );
    let keys = ["quiet_bare_loaded_p50_ms", "quiet_bare_loaded_p99_ms"];
    report_latency(report, keys, &loaded.quiet);
    let keys = ["probe_bare_loaded_p50_ms", "probe_bare_loaded_p99_ms"];
    report_latency(report, keys, &loaded.probe);
    report.add(
        "bare_loaded_flood_msgs_per_s",
        loaded.flood_msgs_per_s().round(),
        "msg/s",
    );
    let ratio = percentile(&tenantd.quiet, 0.99) / percentile(&loaded.quiet, 0.99);
    report.add(
        "flood_p99_ratio_vs_loaded",
        round2(ratio),
        "x (tenantd's flood / the bare flood beside storing's CPU)",
    );
}

/// The quiet tenant's p50 and p99 during a flood, its p99 over every sample, and the flood's rate.
fn report_flood(
    report: &mut Report,
    keys: [&'static str; 3],
    rate_key: &'static str,
    flood: &Pooled,
) {
    report_latency(report, [keys[0], keys[1]], &flood.quiet);
    let all = percentile(&flood.quiet_all, 0.99);
    report.add(keys[2], all, "ms (flood ended or not)");
    report.add(rate_key, flood.flood_msgs_per_s().round(), "msg/s");
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn mean_of(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The p50 and p99 of these latencies under these two keys.
fn report_latency(report: &mut Report, keys: [&'static str; 2], latencies: &[f64]) {
    report.add(keys[0], percentile(latencies, 0.50), "ms");
    report.add(keys[1], percentile(latencies, 0.99), "ms");
}

/// One flood: what the quiet tenant and the probe saw, and the flood's own rate and end.
struct Stage {
    quiet: Measured,
    probe: Vec<(i64, f64)>,
    flood_msgs_per_s: f64,
    /// When the flood's last message was taken (Unix time, µs).
    flood_end_us: i64,
}

impl Stage {
    fn quiet_p99(&self) -> f64 {
        percentile(&self.quiet.during(self.flood_end_us), 0.99)
    }

    fn probe_p99(&self) -> f64 {
        percentile(&self.probe_during(), 0.99)
    }

    /// The probe's latencies of the messages published while the flood lasted.
    fn probe_during(&self) -> Vec<f64> {
        let during = self
            .probe
            .iter()
            .filter(|(sent, _)| *sent < self.flood_end_us);
        during.map(|(_, latency)| *latency).collect()
    }
}

/// The samples of several rounds' stages, those published during the flood kept apart.
#[derive(Default)]
struct Pooled {
    quiet: Vec<f64>,
    quiet_all: Vec<f64>,
    probe: Vec<f64>,
    rates: Vec<f64>,
    pool_wait_s: f64,
    /// What tenantd and PostgreSQL spent during each of tenantd's floods, in cores.
    storing_cores: Vec<f64>,
}

impl Pooled {
    fn add(&mut self, stage: Stage) {
        self.quiet.extend(stage.quiet.during(stage.flood_end_us));
        self.quiet_all.extend(stage.quiet.all());
        self.probe.extend(stage.probe_during());
        self.rates.push(stage.flood_msgs_per_s);
        self.pool_wait_s += stage.quiet.pool_wait_s;
    }

    fn flood_msgs_per_s(&self) -> f64 {
        mean_of(&self.rates)
    }

    /// The mean wait for a worker, over every sample of the stages (the count is per stage).
    fn pool_wait_ms(&self) -> f64 {
        1e3 * self.pool_wait_s / self.quiet_all.len().max(1) as f64
    }
}

/// The 40 tenants' backlog drained by plain consumers (consume + ack, no work).
fn bare_flood(stack: &mut Stack, flood: &Backlog, quiet: &str) -> Stage {
    flood.preload(stack);
    let quiet = Quiet::start(stack, quiet);
    std::thread::scope(|s| {
        let url = &stack.amqp_url;
        let drain = s.spawn(|| {
            let prefetch = ingest::prefetch();
            let rate = load::drain_rate(
                url,
                &flood.queues,
                flood.per_queue,
                prefetch,
                Acks::PerBurst,
            );
            (rate.msgs_per_s, load::now_us())
        });
        let (quiet, probe) = quiet.publish_probed(stack);
        let (flood_msgs_per_s, flood_end_us) = drain.join().expect("the bare flood");
        Stage {
            quiet,
            probe,
            flood_msgs_per_s,
            flood_end_us,
        }
    })
}

/// The same backlog drained by tenantd itself; and the CPU tenantd and PostgreSQL spent
/// meanwhile, in cores.
fn tenantd_flood(stack: &mut Stack, flood: &Backlog, round: u64) -> (Stage, f64) {
    flood.preload(stack);
    let quiet = Quiet::start(stack, &format!("quiet-flood-{round}"));
    std::thread::scope(|s| {
        let drain = s.spawn(|| ingest::timed_drain(stack, flood));
        let (quiet, probe) = quiet.publish_probed(stack);
        let drain = drain.join().expect("the tenantd flood");
        let cores = |cpu: Duration| cpu.as_secs_f64() / drain.wall.as_secs_f64();
        eprintln!(
            "  round {round}: storing took {:.2} cores of tenantd, {:.2} of PostgreSQL",
            cores(drain.cpu.tenantd),
            cores(drain.cpu.postgres)
        );
        let stage = Stage {
            quiet,
            probe,
            flood_msgs_per_s: drain.msgs_per_s,
            flood_end_us: drain.last_row_us,
        };
        (stage, cores(drain.cpu.tenantd + drain.cpu.postgres))
    })
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
