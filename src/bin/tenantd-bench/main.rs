//! tenantd-bench: measures the real tenantd binary on this machine, against the broker's own
//! ceiling where there is one, and prints a table plus a `summary key=value …` line. Needs
//! PostgreSQL and RabbitMQ running and the release build of tenantd beside it:
//! `cargo build --release && target/release/tenantd-bench`.

mod burn;
mod edge;
mod fairness;
mod ingest;
mod latency;
mod load;
mod procstat;
mod quiet;
mod replicas;
mod soak;
mod stack;
mod start;
mod store;
mod tenants;

use stack::Stack;

pub struct Args {
    phases: Vec<String>,
    messages: u64,
    tenants: u64,
    rate: u64,
    seconds: u64,
    create: u64,
    idle_seconds: u64,
    payload_bytes: u64,
    replica_tenants: u64,
    one_per_tx: bool,
    rounds: u64,
    soak_seconds: u64,
    soak_rate: u64,
    soak_seed: u64,
    start_tenants: u64,
    start_per_tenant: u64,
}

const PHASES: [&str; 9] = [
    "ingest", "store", "latency", "tenants", "replicas", "edge", "soak", "fairness", "start",
];

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            phases: ["ingest", "store", "latency", "tenants"]
                .map(String::from)
                .to_vec(),
            messages: 100_000,
            tenants: 10,
            rate: 1000,
            seconds: 10,
            create: 1000,
            idle_seconds: 30,
            payload_bytes: 240,
            replica_tenants: 1000,
            one_per_tx: true,
            rounds: 3,
            soak_seconds: 240,
            soak_rate: 10,
            soak_seed: 1,
            start_tenants: 1000,
            start_per_tenant: 1000,
        };
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let mut raw = raw.iter();
        while let Some(flag) = raw.next() {
            if flag == "--no-one-per-tx" {
                args.one_per_tx = false;
                continue;
            }
            let value = raw.next().unwrap_or_else(|| usage());
            if flag == "--phases" {
                args.phases = value.split(',').map(String::from).collect();
                if !args.phases.iter().all(|p| PHASES.contains(&p.as_str())) {
                    usage();
                }
                continue;
            }
            let n = value.parse().unwrap_or_else(|_| usage());
            match flag.as_str() {
                "--messages" => args.messages = n,
                "--tenants" => args.tenants = n,
                "--rate" => args.rate = n,
                "--seconds" => args.seconds = n,
                "--create" => args.create = n,
                "--idle-seconds" => args.idle_seconds = n,
                "--payload-bytes" => args.payload_bytes = n,
                "--replica-tenants" => args.replica_tenants = n,
                "--rounds" => args.rounds = n.max(1),
                "--soak-seconds" => args.soak_seconds = n,
                "--soak-rate" => args.soak_rate = n.max(1),
                "--soak-seed" => args.soak_seed = n,
                "--start-tenants" => args.start_tenants = n.max(1),
                "--start-per-tenant" => args.start_per_tenant = n,
                _ => usage(),
            }
        }
        args
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: tenantd-bench [--phases ingest,store,latency,tenants,replicas,edge,soak,fairness,start] \
         [--messages 100000] [--tenants 10] [--no-one-per-tx] [--rate 1000] [--seconds 10] \
         [--create 1000] [--idle-seconds 30] [--payload-bytes 240] [--replica-tenants 1000] \
         [--rounds 3] [--soak-seconds 240] [--soak-rate 10] [--soak-seed 1] \
         [--start-tenants 1000] [--start-per-tenant 1000]\n\
         env: BENCH_PG (default postgres://postgres:postgres@127.0.0.1:5432), RABBITMQ_URL;\n\
         tenantd's own settings (BATCH_SIZE, WORKER_POOL_SIZE, …) pass through to it"
    );
    std::process::exit(2)
}

/// The figures, in the order they are printed.
pub struct Report(Vec<(&'static str, String, &'static str)>);

impl Report {
    pub fn add(&mut self, key: &'static str, value: f64, unit: &'static str) {
        let text = if value.fract() == 0.0 {
            format!("{value}")
        } else {
            format!("{value:.2}")
        };
        eprintln!("  {key} = {text} {unit}");
        self.0.push((key, text, unit));
    }

    fn print(&self) {
        println!("{:<28} {:>12}  unit", "figure", "value");
        for (key, value, unit) in &self.0 {
            println!("{key:<28} {value:>12}  {unit}");
        }
        let pairs: Vec<String> = self.0.iter().map(|(k, v, _)| format!("{k}={v}")).collect();
        println!("summary {}", pairs.join(" "));
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, duty] = &raw[..] {
        if flag == burn::FLAG {
            burn::run(duty.parse().unwrap_or_else(|_| usage()));
        }
    }
    let args = Args::parse();
    load::set_payload_bytes(args.payload_bytes as usize);
    let pg = std::env::var("BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into());
    let amqp = std::env::var("RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut report = Report(Vec::new());
    for phase in &args.phases {
        if phase == "soak" {
            eprintln!("{phase}:");
            soak::run(&args, &mut report); // on servers of its own, which it restarts
            continue;
        }
        // Each phase on a fresh database and fresh replicas; the stack cleans up when dropped.
        let mut stack = Stack::new(&pg, &amqp);
        eprintln!("{phase}:");
        match phase.as_str() {
            "ingest" => ingest::run(&mut stack, &args, &mut report),
            "store" => store::run(&mut stack, &args, &mut report),
            "latency" => latency::run(&mut stack, &args, &mut report),
            "tenants" => tenants::run(&mut stack, &args, &mut report),
            "replicas" => replicas::run(&mut stack, &args, &mut report),
            "edge" => edge::run(&mut stack, &args, &mut report),
            "fairness" => fairness::run(&mut stack, &args, &mut report),
            "start" => start::run(&mut stack, &args, &mut report),
            _ => unreachable!("checked when parsed"),
        }
        stack.stop();
    }
    report.print();
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let value = sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    (value * 100.0).round() / 100.0
}
