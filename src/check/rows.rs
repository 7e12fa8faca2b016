//! Each limit of the host, the broker and the database as the number of tenants it allows, and
//! how that number is computed. What a tenant costs was measured (ARCHITECTURE.md, "How far one
//! database goes"); what tenantd holds besides its tenants is bounded by its settings.

use super::host::{self, Bound};
use super::rabbitmq::Connections;
use super::table::{count, Allows, Limit};
use crate::store::limits::ServerLimits;
use crate::Config;

/// A tenant's AMQP socket, its epoll and the pipe pair that wakes its I/O thread.
pub const FILES_PER_TENANT: u64 = 4;
/// Its own thread, amiquip's I/O thread and that thread's timer.
pub const THREADS_PER_TENANT: u64 = 3;
/// Memory maps per tenant (its threads' stacks, guard pages and buffers), measured.
pub const MAPS_PER_TENANT: u64 = 13;
/// Resident memory per tenant in tenantd and in RabbitMQ (its connection, channels, queues).
pub const TENANTD_BYTES_PER_TENANT: u64 = 100_000;
pub const BROKER_BYTES_PER_TENANT: u64 = 190_000;
/// A statement on the whole `messages` table locks each partition and its two indexes.
pub const LOCKS_PER_PARTITION: u64 = 3;

/// What the limits are computed from.
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub postgres: Option<&'a ServerLimits>,
    pub broker: &'a Result<Connections, String>,
    /// Whether RabbitMQ runs on this host (its memory then counts here too).
    pub broker_here: bool,
}

/// What one tenantd holds besides its tenants: a thread and a socket per open HTTP connection,
/// the pools' connections and threads, and a margin for the rest (measured idle: 23 files, 30
/// threads, 180 maps).
struct Own {
    files: u64,
    threads: u64,
    maps: u64,
}

fn own(config: &Config) -> Own {
    let pool = config.pool_size as u64;
    let http = config.http_max_connections as u64;
    let threads = 64 + pool + http;
    Own {
        files: 100 + pool + crate::http::REQUEST_THREADS as u64 + http,
        threads,
        maps: 300 + 5 * threads,
    }
}

/// Every limit, host first, then the broker and the database.
pub fn limits(inputs: &Inputs) -> Vec<Limit> {
    let own = own(inputs.config);
    let reserve = |n| format!("{} for tenantd itself", count(n));
    let threads = "threads per tenant (its own, amiquip's I/O thread and its timer)";
    let mut rows = vec![
        per_tenant(
            "tenantd's open files (RLIMIT_NOFILE)",
            host::open_files(),
            (own.files, &reserve(own.files)),
            FILES_PER_TENANT,
            "per tenant (its AMQP socket, an epoll and a pipe pair)",
        ),
        per_tenant(
            "memory maps (vm.max_map_count)",
            host::max_map_count().map(Bound::At),
            (own.maps, &reserve(own.maps)),
            MAPS_PER_TENANT,
            "per tenant (3 thread stacks with their guard pages and buffers, measured)",
        ),
        per_tenant(
            "tasks of this cgroup (TasksMax=)",
            host::tasks_max(),
            (own.threads, &reserve(own.threads)),
            THREADS_PER_TENANT,
            threads,
        ),
        user_processes(&own, threads),
        memory(inputs.broker_here),
        broker(inputs.broker),
    ];
    rows.extend(postgres(inputs.postgres, inputs.config));
    rows
}

/// A limit of which each tenant takes `per` after tenantd's own `reserve`.
fn per_tenant(
    what: &str,
    bound: Option<Bound>,
    (reserve, reserve_text): (u64, &str),
    per: u64,
    cost: &str,
) -> Limit {
    let (value, allows, how) = match bound {
        Some(Bound::At(n)) => (
            count(n),
            Allows::Tenants(n.saturating_sub(reserve) / per),
            format!("({} − {reserve_text}) / {per} {cost}", count(n)),
        ),
        Some(Bound::Unlimited) => ("no limit".into(), Allows::Any, "none set".into()),
        None => ("could not tell".into(), Allows::Unknown, String::new()),
    };
    Limit {
        what: what.into(),
        value,
        allows,
        how,
    }
}

fn user_processes(own: &Own, threads: &str) -> Limit {
    let what = "threads of this user (RLIMIT_NPROC)";
    if host::is_root() {
        return Limit {
            what: what.into(),
            value: "not applied to root".into(),
            allows: Allows::Any,
            how: String::new(),
        };
    }
    let reserve = format!(
        "{} for tenantd itself, and the user's other processes",
        count(own.threads)
    );
    per_tenant(
        what,
        host::processes(),
        (own.threads, &reserve),
        THREADS_PER_TENANT,
        threads,
    )
}

fn memory(broker_here: bool) -> Limit {
    let (per, cost) = match broker_here {
        true => (
            TENANTD_BYTES_PER_TENANT + BROKER_BYTES_PER_TENANT,
            "~100 KB per tenant in tenantd and ~190 KB in RabbitMQ on this host",
        ),
        false => (TENANTD_BYTES_PER_TENANT, "~100 KB per tenant in tenantd"),
    };
    let (value, allows, how) = match host::memory_available() {
        Some(bytes) => (
            format!("{:.1} GB", bytes as f64 / 1e9),
            Allows::Tenants(bytes / per),
            format!("available now / {cost}"),
        ),
        None => ("could not tell".into(), Allows::Unknown, String::new()),
    };
    Limit {
        what: "memory (MemAvailable)".into(),
        value,
        allows,
        how,
    }
}

fn broker(connections: &Result<Connections, String>) -> Limit {
    let how = "1 connection per tenant, on brokers every replica shares";
    let (value, allows, how) = match connections {
        Ok(c) => match c.limit {
            Bound::At(n) => (
                format!("{} {} ({})", count(n), c.unit, c.source),
                Allows::Tenants(n),
                how.to_string(),
            ),
            Bound::Unlimited => (
                format!("no limit ({})", c.source),
                Allows::Any,
                String::new(),
            ),
        },
        Err(why) => ("could not tell".into(), Allows::Unknown, why.clone()),
    };
    Limit {
        what: "RabbitMQ's connections".into(),
        value,
        allows,
        how,
    }
}

fn postgres(server: Option<&ServerLimits>, config: &Config) -> [Limit; 2] {
    let locks = "PostgreSQL's lock table";
    let connections = "PostgreSQL's max_connections";
    let Some(s) = server else {
        let unknown = |what: &str| Limit {
            what: what.into(),
            value: "could not tell".into(),
            allows: Allows::Unknown,
            how: "PostgreSQL did not answer".into(),
        };
        return [unknown(locks), unknown(connections)];
    };
    let slots = s.max_locks_per_transaction * (s.max_connections + s.max_prepared_transactions);
    let slots = u64::try_from(slots).unwrap_or(0);
    let need = replica_connections(config);
    [
        Limit {
            what: locks.into(),
            value: format!(
                "{} × ({} + {}) = {}",
                s.max_locks_per_transaction,
                s.max_connections,
                s.max_prepared_transactions,
                count(slots)
            ),
            allows: Allows::Tenants(slots / LOCKS_PER_PARTITION),
            how: format!(
                "max_locks_per_transaction × (max_connections + max_prepared_transactions) / \
                 {LOCKS_PER_PARTITION} per tenant: a statement on all of `messages` (psql, \
                 pg_dump) locks each partition and its 2 indexes; shared by every replica"
            ),
        },
        Limit {
            what: connections.into(),
            value: format!(
                "{} ({} reserved, {} in use)",
                s.max_connections, s.reserved_connections, s.connections_in_use
            ),
            allows: Allows::Any,
            how: format!(
                "not per tenant: a replica opens up to {need} (WORKER_POOL_SIZE + {} for the \
                 API + 2)",
                crate::http::REQUEST_THREADS
            ),
        },
    ]
}

/// The most database connections one replica opens: its workers', its API's, its session and
/// its listener.
pub fn replica_connections(config: &Config) -> i64 {
    (config.pool_size + crate::http::REQUEST_THREADS + 2) as i64
}

/// The limits allowing the fewest tenants, and that number.
pub fn tightest(limits: &[Limit]) -> Option<(u64, Vec<&Limit>)> {
    let fewest = limits
        .iter()
        .filter_map(|l| match l.allows {
            Allows::Tenants(n) => Some(n),
            _ => None,
        })
        .min()?;
    let bound = limits
        .iter()
        .filter(|l| l.allows == Allows::Tenants(fewest))
        .collect();
    Some((fewest, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut config = Config::from_lookup(|_| None).unwrap();
        config.pool_size = 2;
        config.http_max_connections = 512;
        config
    }

    #[test]
    fn a_limit_counts_what_tenantd_keeps_for_itself_before_its_tenants() {
        let own = own(&config());
        assert_eq!(own.files, 100 + 2 + 16 + 512);
        let row = per_tenant(
            "files",
            Some(Bound::At(1024)),
            (own.files, "630 for tenantd itself"),
            FILES_PER_TENANT,
            "per tenant",
        );
        assert_eq!(row.allows, Allows::Tenants((1024 - 630) / 4));
        assert_eq!(row.how, "(1,024 − 630 for tenantd itself) / 4 per tenant");
        let tiny = per_tenant("files", Some(Bound::At(100)), (630, ""), 4, "");
        assert_eq!(tiny.allows, Allows::Tenants(0));
    }

    #[test]
    fn the_lock_table_allows_a_tenant_per_three_slots() {
        let server = ServerLimits {
            version: "15".into(),
            max_connections: 100,
            reserved_connections: 3,
            connections_in_use: 9,
            max_locks_per_transaction: 64,
            max_prepared_transactions: 0,
            active_tenants: Some(0),
        };
        let [locks, connections] = postgres(Some(&server), &config());
        assert_eq!(locks.allows, Allows::Tenants(6400 / 3));
        assert_eq!(locks.value, "64 × (100 + 0) = 6,400");
        assert_eq!(connections.allows, Allows::Any);
        assert!(connections.how.contains("up to 20"), "{}", connections.how);
    }

    #[test]
    fn the_tightest_limits_are_every_one_at_the_minimum() {
        let row = |what: &str, allows| Limit {
            what: what.into(),
            value: String::new(),
            allows,
            how: String::new(),
        };
        let rows = [
            row("a", Allows::Tenants(10)),
            row("b", Allows::Any),
            row("c", Allows::Tenants(3)),
            row("d", Allows::Unknown),
            row("e", Allows::Tenants(3)),
        ];
        let (fewest, bound) = tightest(&rows).unwrap();
        assert_eq!(fewest, 3);
        let names: Vec<&str> = bound.iter().map(|l| l.what.as_str()).collect();
        assert_eq!(names, ["c", "e"]);
        assert!(tightest(&rows[1..2]).is_none());
    }
}
