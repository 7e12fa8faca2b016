//! Settings, read once from the environment. Each is defined once, in the table below: its
//! name, default, what it accepts, its help and its parser. The same table builds `Config`,
//! reads the environment and prints `tenantd --help`, so none of them can disagree.

mod parse;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use log::LevelFilter;

pub use parse::{MAX_BROKER_MESSAGE_BYTES, MIN_SECRET_BYTES};

/// The largest clock skew a JWT's `exp` and `nbf` are allowed.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// One environment variable as `--help` and the README show it.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    /// What it accepts beyond its type.
    pub accepts: &'static str,
}

/// Defines `Config` (a field per setting, documented by its help), `SETTINGS` (in this order)
/// and the reading of every setting through its parser.
macro_rules! settings {
    ($($field:ident: $ty:ty = $name:literal,
        default $default:literal,
        accepts $accepts:literal,
        help $help:literal,
        parse $parse:expr;)*) => {
        #[derive(Clone, Debug)]
        pub struct Config {
            $(#[doc = $help] pub $field: $ty,)*
        }

        pub const SETTINGS: &[Setting] = &[
            $(Setting { name: $name, default: $default, help: $help, accepts: $accepts },)*
        ];

        impl Config {
            fn read(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
                Ok(Config {
                    $($field: read_one($name, $default, lookup, $parse)?,)*
                })
            }
        }
    };
}

settings! {
    database_url: String = "DATABASE_URL",
        default "postgres://postgres:postgres@127.0.0.1:5432/sample_db",
        accepts "a postgres:// URL",
        help "PostgreSQL database holding `tenants` and `messages`",
        parse parse::text;
    rabbitmq_url: String = "RABBITMQ_URL",
        default "amqp://guest:guest@127.0.0.1:5672/%2f",
        accepts "amqp:// URLs, comma-separated",
        help "RabbitMQ broker holding the tenants' queues; several, comma-separated, for a cluster",
        parse parse::text;
    broker_heartbeat_secs: u16 = "BROKER_HEARTBEAT_SECS",
        default "30",
        accepts "0 to 65535; 0: no heartbeats",
        help "AMQP heartbeat asked of the broker; a hung broker is noticed after two missed (0: none)",
        parse |raw| parse::number(raw, 0..=u16::MAX);
    queue_type: crate::broker::QueueType = "QUEUE_TYPE",
        default "classic",
        accepts "classic or quorum",
        help "classic, or quorum: queues replicated by a RabbitMQ cluster (for tenants created from then on)",
        parse parse::queue_type;
    replica_id: String = "REPLICA_ID",
        default "",
        accepts "unique among the live replicas",
        help "this replica's name among those sharing the database (default: <hostname>-<random>)",
        parse parse::replica_id;
    failover_timeout: Duration = "FAILOVER_TIMEOUT",
        default "10",
        accepts "at least 2",
        help "seconds within which a replica that died has its tenants running on another",
        parse |raw| parse::secs(raw, 2..=86_400);
    max_tenants: u32 = "MAX_TENANTS",
        default "0",
        accepts "0 to 1000000; 0: no cap",
        help "most tenants this replica runs, the others running the rest (0: no cap)",
        parse |raw| parse::number(raw, 0..=1_000_000);
    http_addr: String = "HTTP_ADDR",
        default "127.0.0.1:8080",
        accepts "host:port; beyond loopback only with a credential or ALLOW_INSECURE_OPEN_API=1",
        help "address the HTTP API listens on (0.0.0.0:8080 to serve other hosts: set a credential below)",
        parse parse::socket_addr;
    allow_insecure_open_api: bool = "ALLOW_INSECURE_OPEN_API",
        default "0",
        accepts "0 or 1",
        help "1: start on a non-loopback HTTP_ADDR with no credential, everyone who reaches it an admin",
        parse parse::flag;
    http_allowed_origins: Vec<String> = "HTTP_ALLOWED_ORIGINS",
        default "",
        accepts "origins (scheme://host[:port]), comma-separated",
        help "web origins whose pages may call the API (CORS); a request from any other Origin gets 403",
        parse parse::origins;
    rate_limit_per_sec: u32 = "RATE_LIMIT_PER_SEC",
        default "100",
        accepts "0 to 1000000; 0: no limit",
        help "requests a second per credential (per client address when none), beyond a burst: 429",
        parse |raw| parse::number(raw, 0..=1_000_000);
    rate_limit_burst: u32 = "RATE_LIMIT_BURST",
        default "200",
        accepts "at least 1",
        help "requests a credential may send at once before RATE_LIMIT_PER_SEC applies",
        parse |raw| parse::number(raw, 1..=u32::MAX);
    http_timeout: Duration = "HTTP_TIMEOUT_MS",
        default "15000",
        accepts "at least 100",
        help "HTTP: silence allowed between requests, and time for a whole request, head and body",
        parse |raw| parse::millis(raw, 100..=u64::MAX);
    http_max_connections: usize = "HTTP_MAX_CONNECTIONS",
        default "512",
        accepts "at least 1",
        help "open HTTP connections at most; past it the longest idle one is closed, else 503",
        parse |raw| parse::number(raw, 1..=usize::MAX);
    default_workers: u16 = "DEFAULT_WORKERS",
        default "3",
        accepts "1 to MAX_WORKERS",
        help "a new tenant's concurrency: batches of its messages in the pool at once",
        parse |raw| parse::number(raw, 1..=u16::MAX);
    max_workers: u16 = "MAX_WORKERS",
        default "64",
        accepts "at least 1; MAX_WORKERS x BATCH_SIZE at most 65535 (a prefetch count)",
        help "the largest concurrency a tenant may be given",
        parse |raw| parse::number(raw, 1..=u16::MAX);
    pool_size: usize = "WORKER_POOL_SIZE",
        default "cpus",
        accepts "at least 1, or cpus: one per CPU, at least 2",
        help "threads in the shared pool, each with its own PostgreSQL connection (cpus: one per CPU)",
        parse parse::threads;
    batch_size: usize = "BATCH_SIZE",
        default "100",
        accepts "at least 1; MAX_WORKERS x BATCH_SIZE at most 65535",
        help "most messages stored in one INSERT; prefetch = workers x BATCH_SIZE",
        parse |raw| parse::number(raw, 1..=usize::from(u16::MAX));
    max_message_bytes: usize = "MAX_MESSAGE_BYTES",
        default "1048576",
        accepts "1 to 536870912 (RabbitMQ's largest max_message_size)",
        help "a larger message is never stored: retried, then dead-lettered; set the broker's max_message_size to it",
        parse parse::message_bytes;
    retry_delays: Vec<Duration> = "RETRY_DELAYS_MS",
        default "2000,4000,8000",
        accepts "milliseconds, comma-separated; none: failing messages go straight to the DLQ",
        help "delays before each retry of a message that failed; after the last, its DLQ",
        parse parse::delays;
    connect_timeout: Duration = "CONNECT_TIMEOUT_MS",
        default "5000",
        accepts "at least 1",
        help "how long opening a broker or database connection may take",
        parse |raw| parse::millis(raw, 1..=u64::MAX);
    statement_timeout: Duration = "STATEMENT_TIMEOUT_MS",
        default "30000",
        accepts "0: no limit",
        help "longest a database statement may run (a store that hangs is retried); 0: no limit",
        parse |raw| parse::millis(raw, 0..=u64::MAX);
    db_keepalive: Duration = "DB_KEEPALIVE_MS",
        default "10000",
        accepts "at least 2000",
        help "a database connection silent this long (keepalives unanswered) is closed and reopened",
        parse |raw| parse::millis(raw, 2000..=u64::MAX);
    shutdown_timeout: Duration = "SHUTDOWN_TIMEOUT",
        default "30",
        accepts "seconds",
        help "seconds SIGTERM may take to hand tenants over and drain in-flight messages before exiting non-zero",
        parse |raw| parse::secs(raw, 0..=u64::MAX);
    log_level: LevelFilter = "LOG_LEVEL",
        default "info",
        accepts "error, warn, info, debug or trace",
        help "error, warn, info, debug or trace",
        parse parse::log_level;
    log_format: crate::logging::Format = "LOG_FORMAT",
        default "text",
        accepts "text or json",
        help "text, or json: one JSON object per line",
        parse parse::log_format;
    api_token: Option<String> = "API_TOKEN",
        default "",
        accepts "at least 32 bytes",
        help "an admin credential: `Authorization: Bearer <API_TOKEN>` may do everything under /api",
        parse parse::secret;
    metrics_token: Option<String> = "METRICS_TOKEN",
        default "",
        accepts "at least 32 bytes",
        help "a credential for /metrics and /readyz in full (per-tenant series, errors) and nothing else",
        parse parse::secret;
    jwt_hs256_secret: Option<String> = "JWT_HS256_SECRET",
        default "",
        accepts "at least 32 bytes",
        help "verifies HS256 JWTs (at least 32 bytes); `tenantd token` mints tokens with it",
        parse parse::secret;
    jwt_public_key_file: Option<PathBuf> = "JWT_PUBLIC_KEY_FILE",
        default "",
        accepts "a PEM public key file: RSA (RS256) or P-256 (ES256)",
        help "PEM public key verifying JWTs: an RSA key verifies RS256, a P-256 key ES256",
        parse parse::optional_path;
    jwt_issuer: Option<String> = "JWT_ISSUER",
        default "",
        accepts "any text",
        help "when set, a JWT must carry this `iss`",
        parse parse::optional;
    jwt_audience: Option<String> = "JWT_AUDIENCE",
        default "",
        accepts "any text",
        help "when set, a JWT must carry this `aud`; when unset, a JWT carrying an `aud` is refused",
        parse parse::optional;
    jwt_leeway: Duration = "JWT_LEEWAY_SECS",
        default "30",
        accepts "0 to 300 seconds",
        help "clock skew allowed when checking a JWT's `exp` and `nbf`",
        parse |raw| parse::secs(raw, 0..=MAX_LEEWAY_SECS);
}

/// A setting's value (its default when unset or empty) through its parser; a refusal names it.
fn read_one<T>(
    name: &str,
    default: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    parse: impl Fn(&str) -> parse::Parsed<T>,
) -> Result<T> {
    let raw = lookup(name)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string());
    parse(&raw).map_err(|refusal| anyhow!("{name}{refusal}"))
}

impl Config {
    /// Reads every setting from the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup`, falling back to the defaults, and checks them.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let config = Config::read(&lookup)?;
        config.check()?;
        Ok(config)
    }

    /// Every setting at its default.
    pub fn defaults() -> Config {
        Config::from_lookup(|_| None).expect("the defaults are within their bounds")
    }

    /// What holds between settings (each alone was held to its bounds when read); `start` asks
    /// again, so a `Config` built in code is held to them too. Connects to nothing: a refused
    /// setting costs no half start.
    pub fn check(&self) -> Result<()> {
        if self.default_workers > self.max_workers {
            bail!(
                "DEFAULT_WORKERS={} is above MAX_WORKERS={}",
                self.default_workers,
                self.max_workers
            );
        }
        if usize::from(self.max_workers) * self.batch_size > usize::from(u16::MAX) {
            bail!("MAX_WORKERS x BATCH_SIZE must fit a prefetch count (at most 65535)");
        }
        crate::http::access::check_exposure(&crate::http::access::Exposure {
            http_addr: &self.http_addr,
            credential: self.api_token.is_some()
                || self.jwt_hs256_secret.is_some()
                || self.jwt_public_key_file.is_some(),
            allow_insecure_open_api: self.allow_insecure_open_api,
        })
    }
}

#[cfg(test)]
mod tests;
