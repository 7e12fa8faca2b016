//! What the kernel says about processes: resident memory, threads, descriptors, CPU time — of
//! a tenantd replica, or of every process of a server (RabbitMQ's `beam.smp`, `postgres`).

use std::collections::BTreeMap;
use std::time::Duration;

pub struct Sample {
    pub rss_mb: f64,
    pub threads: u64,
    pub fds: u64,
}

pub fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Sample {
        rss_mb: field("VmRSS:") as f64 / 1024.0,
        threads: field("Threads:"),
        fds,
    }
}

/// User + system CPU time the process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    cpu_time_in(&format!("/proc/{pid}/stat"))
}

/// CPU time from a `stat` file of a process or of one of its threads.
fn cpu_time_in(stat_path: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// CPU time used so far by every process whose command is `comm`.
pub fn cpu_of(comm: &str) -> Duration {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    procs
        .filter_map(|p| {
            let p = p.ok()?;
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(p.path().join("comm")).ok()?;
            (name.trim_end() == comm).then(|| cpu_time(pid))
        })
        .sum()
}

/// The broker's memory for connections and queues, in MB, as RabbitMQ accounts for it
/// (`rabbitmqctl status`; the Erlang VM's RSS moves too freely to tell). `None` without a local
/// `rabbitmqctl`.
pub fn broker_memory_mb() -> Option<f64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "status", "--formatter", "json"])
        .output()
        .ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let memory = &status["memory"];
    let keys = [
        "connection_readers",
        "connection_writers",
        "connection_channels",
        "connection_other",
        "queue_procs",
    ];
    let bytes: f64 = keys.iter().filter_map(|k| memory[k].as_f64()).sum();
    Some(bytes / 1024.0 / 1024.0)
}

/// CPU used by tenantd, RabbitMQ and PostgreSQL between two readings.
#[derive(Clone, Copy)]
pub struct CpuSplit {
    pub tenantd: Duration,
    pub rabbitmq: Duration,
    pub postgres: Duration,
}

impl CpuSplit {
    pub fn now(tenantd_pids: &[u32]) -> CpuSplit {
        CpuSplit {
            tenantd: tenantd_pids.iter().map(|&p| cpu_time(p)).sum(),
            rabbitmq: cpu_of("beam.smp"),
            postgres: cpu_of("postgres"),
        }
    }

    pub fn since(self, before: CpuSplit) -> CpuSplit {
        CpuSplit {
            tenantd: self.tenantd.saturating_sub(before.tenantd),
            rabbitmq: self.rabbitmq.saturating_sub(before.rabbitmq),
            postgres: self.postgres.saturating_sub(before.postgres),
        }
    }
}

/// CPU time of a process's threads by kind: a thread's name up to its first `-` (`tenant-3f9a1c2b`
/// is `tenant`, `amiquip-io` is `amiquip`), summed over the threads alive now.
pub fn cpu_by_thread_kind(pid: u32) -> BTreeMap<String, Duration> {
    let mut kinds = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return kinds;
    };
    for task in tasks.filter_map(|t| t.ok()) {
        let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
            continue;
        };
        let kind = name
            .trim_end()
            .split('-')
            .next()
            .unwrap_or_default()
            .to_string();
        *kinds.entry(kind).or_default() += thread_cpu_time(&task.path());
    }
    kinds
}

/// A thread's CPU time: the scheduler's own sum (`se.sum_exec_runtime` in its `sched` file, in
/// ms with ns digits) where the kernel shows it, else `stat`'s ticks. Ticks are whole 10 ms per
/// thread: summed over forty threads they lose up to 0.4 s, which spread over a backlog of
/// 100,000 messages read as microseconds of CPU per message that went nowhere.
fn thread_cpu_time(task: &std::path::Path) -> Duration {
    let sched = std::fs::read_to_string(task.join("sched")).unwrap_or_default();
    let runtime_ms = sched.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == "se.sum_exec_runtime").then(|| value.trim().parse::<f64>().ok())?
    });
    match runtime_ms {
        Some(ms) => Duration::from_secs_f64(ms / 1e3),
        None => cpu_time_in(&task.join("stat").to_string_lossy()),
    }
}

/// CPU time per thread kind between two readings (threads started since count from zero).
pub fn thread_kinds_since(
    now: BTreeMap<String, Duration>,
    before: &BTreeMap<String, Duration>,
) -> BTreeMap<String, Duration> {
    now.into_iter()
        .map(|(kind, t)| {
            let since = t.saturating_sub(before.get(&kind).copied().unwrap_or_default());
            (kind, since)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Instant;

    /// A busy thread's CPU time, read while it spins, grows in steps finer than the 10 ms ticks
    /// of `stat` wherever the kernel shows the scheduler's own sum.
    #[test]
    fn a_threads_cpu_time_is_read_finer_than_a_tick() {
        let me = Path::new("/proc/thread-self");
        let start = thread_cpu_time(me);
        let mut last = start;
        let mut steps = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while last - start < Duration::from_millis(50) {
            assert!(Instant::now() < deadline, "the CPU time did not grow");
            let now = thread_cpu_time(me);
            if now > last {
                steps.push(now - last);
                last = now;
            }
        }
        if me.join("sched").exists() {
            assert!(
                steps.iter().any(|s| *s < Duration::from_millis(10)),
                "only whole ticks: {steps:?}"
            );
        }
    }
}
