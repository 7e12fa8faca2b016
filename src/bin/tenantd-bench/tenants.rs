//! Many tenants on one replica: how long each create takes, then what they cost at rest
//! (memory, threads, descriptors, CPU).

use std::time::{Duration, Instant};

use crate::stack::Stack;
use crate::{percentile, procstat, Args, Report};

pub fn run(stack: &mut Stack, args: &Args, report: &mut Report) {
    stack.start(&[]);
    let idle = procstat::sample(stack.pid());
    let broker_idle = procstat::broker_memory_mb();
    let mut times = Vec::with_capacity(args.create as usize);
    for i in 0..args.create {
        let started = Instant::now();
        stack.create_tenant(&format!("scale-{i}"), "active");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    report.add("create_p50_ms", percentile(&times, 0.50), "ms");
    report.add("create_p99_ms", percentile(&times, 0.99), "ms");
    std::thread::sleep(Duration::from_secs(3)); // let start-up work settle before measuring idle
    let pid = stack.pid();
    let sample = procstat::sample(pid);
    let n = args.create as f64;
    report.add("tenants", n, "");
    report.add("rss_mb", sample.rss_mb.round(), "MB");
    report.add(
        "rss_kb_per_tenant",
        (1024.0 * (sample.rss_mb - idle.rss_mb) / n).round(),
        "KB",
    );
    report.add("threads", sample.threads as f64, "");
    report.add("fds_per_tenant", (sample.fds - idle.fds) as f64 / n, "");
    if let (Some(before), Some(after)) = (broker_idle, procstat::broker_memory_mb()) {
        let per_tenant = 1024.0 * (after - before) / n;
        report.add(
            "broker_kb_per_tenant",
            per_tenant.round(),
            "KB (connection + 3 queues)",
        );
    }
    let before = procstat::cpu_time(pid);
    std::thread::sleep(Duration::from_secs(args.idle_seconds));
    let used = procstat::cpu_time(pid) - before;
    report.add(
        "idle_cpu_pct",
        100.0 * used.as_secs_f64() / args.idle_seconds as f64,
        "% of a core",
    );
}
