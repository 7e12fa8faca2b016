//! Settings, read once from the environment; the same table prints `tenantd --help`, so the help
//! can never disagree with what is parsed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use log::LevelFilter;

/// One environment variable: its name, default and meaning.
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "DATABASE_URL",
        default: "postgres://postgres:postgres@127.0.0.1:5432/sample_db",
        help: "PostgreSQL database holding `tenants` and `messages`",
    },
    Setting {
        name: "RABBITMQ_URL",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        help: "RabbitMQ broker holding the tenants' queues; several, comma-separated, for a cluster",
    },
    Setting {
        name: "BROKER_HEARTBEAT_SECS",
        default: "30",
        help: "AMQP heartbeat asked of the broker; a hung broker is noticed after two missed (0: none)",
    },
    Setting {
        name: "QUEUE_TYPE",
        default: "classic",
        help: "classic, or quorum: queues replicated by a RabbitMQ cluster (for tenants created from then on)",
    },
    Setting {
        name: "REPLICA_ID",
        default: "",
        help: "this replica's name among those sharing the database (default: <hostname>-<random>)",
    },
    Setting {
        name: "FAILOVER_TIMEOUT",
        default: "10",
        help: "seconds within which a replica that died has its tenants running on another",
    },
    Setting {
        name: "MAX_TENANTS",
        default: "0",
        help: "most tenants this replica runs, the others running the rest (0: no cap)",
    },
    Setting {
        name: "HTTP_ADDR",
        default: "127.0.0.1:8080",
        help: "address the HTTP API listens on (0.0.0.0:8080 to serve other hosts: set a credential below)",
    },
    Setting {
        name: "ALLOW_INSECURE_OPEN_API",
        default: "0",
        help: "1: start on a non-loopback HTTP_ADDR with no credential, everyone who reaches it an admin",
    },
    Setting {
        name: "HTTP_ALLOWED_ORIGINS",
        default: "",
        help: "web origins whose pages may call the API (CORS); a request from any other Origin gets 403",
    },
    Setting {
        name: "RATE_LIMIT_PER_SEC",
        default: "100",
        help: "requests a second per credential (per client address when none), beyond a burst: 429",
    },
    Setting {
        name: "RATE_LIMIT_BURST",
        default: "200",
        help: "requests a credential may send at once before RATE_LIMIT_PER_SEC applies",
    },
    Setting {
        name: "HTTP_TIMEOUT_MS",
        default: "15000",
        help: "HTTP: silence allowed between requests, and time for a whole request head",
    },
    Setting {
        name: "HTTP_MAX_CONNECTIONS",
        default: "512",
        help: "open HTTP connections at most; past it the longest idle one is closed, else 503",
    },
    Setting {
        name: "DEFAULT_WORKERS",
        default: "3",
        help: "a new tenant's concurrency: batches of its messages in the pool at once",
    },
    Setting {
        name: "MAX_WORKERS",
        default: "64",
        help: "the largest concurrency a tenant may be given",
    },
    Setting {
        name: "WORKER_POOL_SIZE",
        default: "cpus",
        help: "threads in the shared pool, each with its own PostgreSQL connection (cpus: one per CPU)",
    },
    Setting {
        name: "BATCH_SIZE",
        default: "100",
        help: "most messages stored in one INSERT; prefetch = workers x BATCH_SIZE",
    },
    Setting {
        name: "MAX_MESSAGE_BYTES",
        default: "1048576",
        help: "a larger message is never stored: retried, then dead-lettered; set the broker's max_message_size to it",
    },
    Setting {
        name: "RETRY_DELAYS_MS",
        default: "2000,4000,8000",
        help: "delays before each retry of a message that failed; after the last, its DLQ",
    },
    Setting {
        name: "CONNECT_TIMEOUT_MS",
        default: "5000",
        help: "how long opening a broker or database connection may take",
    },
    Setting {
        name: "STATEMENT_TIMEOUT_MS",
        default: "30000",
        help: "longest a database statement may run (a store that hangs is retried); 0: no limit",
    },
    Setting {
        name: "DB_KEEPALIVE_MS",
        default: "10000",
        help: "a database connection silent this long (keepalives unanswered) is closed and reopened",
    },
    Setting {
        name: "SHUTDOWN_TIMEOUT",
        default: "30",
        help: "seconds SIGTERM may take to drain in-flight messages before exiting non-zero",
    },
    Setting {
        name: "LOG_LEVEL",
        default: "info",
        help: "error, warn, info, debug or trace",
    },
    Setting {
        name: "LOG_FORMAT",
        default: "text",
        help: "text, or json: one JSON object per line",
    },
    Setting {
        name: "API_TOKEN",
        default: "",
        help: "an admin credential: `Authorization: Bearer <API_TOKEN>` may do everything under /api",
    },
    Setting {
        name: "METRICS_TOKEN",
        default: "",
        help: "a credential for /metrics and /readyz in full (per-tenant series, errors) and nothing else",
    },
    Setting {
        name: "JWT_HS256_SECRET",
        default: "",
        help: "verifies HS256 JWTs (at least 32 bytes); `tenantd token` mints tokens with it",
    },
    Setting {
        name: "JWT_PUBLIC_KEY_FILE",
        default: "",
        help: "PEM public key verifying JWTs: an RSA key verifies RS256, a P-256 key ES256",
    },
    Setting {
        name: "JWT_ISSUER",
        default: "",
        help: "when set, a JWT must carry this `iss`",
    },
    Setting {
        name: "JWT_AUDIENCE",
        default: "",
        help: "when set, a JWT must carry this `aud`; when unset, a JWT carrying an `aud` is refused",
    },
    Setting {
        name: "JWT_LEEWAY_SECS",
        default: "30",
        help: "clock skew allowed when checking a JWT's `exp` and `nbf`",
    },
];

/// What each setting accepts beyond its type; `--help` and the README show it, `check` holds it.
pub const BOUNDS: &[(&str, &str)] = &[
    ("DATABASE_URL", "a postgres:// URL"),
    ("RABBITMQ_URL", "amqp:// URLs, comma-separated"),
    ("BROKER_HEARTBEAT_SECS", "0 to 65535; 0: no heartbeats"),
    ("QUEUE_TYPE", "classic or quorum"),
    ("REPLICA_ID", "unique among the live replicas"),
    ("FAILOVER_TIMEOUT", "at least 2"),
    ("MAX_TENANTS", "0 to 1000000; 0: no cap"),
    (
        "HTTP_ADDR",
        "host:port; beyond loopback only with a credential or ALLOW_INSECURE_OPEN_API=1",
    ),
    ("ALLOW_INSECURE_OPEN_API", "0 or 1"),
    (
        "HTTP_ALLOWED_ORIGINS",
        "origins (scheme://host[:port]), comma-separated",
    ),
    ("RATE_LIMIT_PER_SEC", "0 to 1000000; 0: no limit"),
    ("RATE_LIMIT_BURST", "at least 1"),
    ("HTTP_TIMEOUT_MS", "at least 100"),
    ("HTTP_MAX_CONNECTIONS", "at least 1"),
    ("DEFAULT_WORKERS", "1 to MAX_WORKERS"),
    (
        "MAX_WORKERS",
        "at least 1; MAX_WORKERS x BATCH_SIZE at most 65535 (a prefetch count)",
    ),
    (
        "WORKER_POOL_SIZE",
        "at least 1, or cpus: one per CPU, at least 2",
    ),
    (
        "BATCH_SIZE",
        "at least 1; MAX_WORKERS x BATCH_SIZE at most 65535",
    ),
    (
        "MAX_MESSAGE_BYTES",
        "1 to 536870912 (RabbitMQ's largest max_message_size)",
    ),
    (
        "RETRY_DELAYS_MS",
        "milliseconds, comma-separated; none: failing messages go straight to the DLQ",
    ),
    ("CONNECT_TIMEOUT_MS", "at least 1"),
    ("STATEMENT_TIMEOUT_MS", "0: no limit"),
    ("DB_KEEPALIVE_MS", "at least 2000"),
    ("SHUTDOWN_TIMEOUT", "seconds"),
    ("LOG_LEVEL", "error, warn, info, debug or trace"),
    ("LOG_FORMAT", "text or json"),
    ("API_TOKEN", "at least 32 bytes"),
    ("METRICS_TOKEN", "at least 32 bytes"),
    ("JWT_HS256_SECRET", "at least 32 bytes"),
    (
        "JWT_PUBLIC_KEY_FILE",
        "a PEM public key file: RSA (RS256) or P-256 (ES256)",
    ),
    ("JWT_ISSUER", "any text"),
    ("JWT_AUDIENCE", "any text"),
    ("JWT_LEEWAY_SECS", "0 to 300 seconds"),
];

/// The bounds of a setting.
pub fn bounds(name: &str) -> &'static str {
    BOUNDS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, b)| b)
}

#[derive(Clone, Debug)]
pub struct Config {
    pub database_url: String,
    pub rabbitmq_url: String,
    pub queue_type: crate::broker::QueueType,
    pub broker_heartbeat_secs: u16,
    pub replica_id: String,
    pub failover_timeout: Duration,
    /// Most tenants this replica runs (0: no cap).
    pub max_tenants: u32,
    pub http_addr: String,
    /// Starts open (no credential) on a non-loopback `http_addr` all the same.
    pub allow_insecure_open_api: bool,
    /// Origins (`scheme://host[:port]`, lowercase) whose pages may call the API.
    pub http_allowed_origins: Vec<String>,
    /// Requests a second per credential; 0: no limit.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    pub http_timeout: Duration,
    pub http_max_connections: usize,
    pub default_workers: u16,
    pub max_workers: u16,
    pub pool_size: usize,
    pub batch_size: usize,
    pub max_message_bytes: usize,
    pub retry_delays: Vec<Duration>,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub db_keepalive: Duration,
    pub shutdown_timeout: Duration,
    pub log_level: LevelFilter,
    pub log_format: crate::logging::Format,
    /// With neither `api_token` nor a JWT key, the API is open.
    pub api_token: Option<String>,
    /// Sees `/metrics` and `/readyz` in full, and nothing else.
    pub metrics_token: Option<String>,
    pub jwt_hs256_secret: Option<String>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_leeway: Duration,
}

impl Config {
    /// Reads every setting from the process environment.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup`, falling back to the defaults in `SETTINGS`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let get = |name: &str| -> String {
            lookup(name)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default_of(name).to_string())
        };
        let config = Config {
            database_url: get("DATABASE_URL"),
            rabbitmq_url: get("RABBITMQ_URL"),
            queue_type: crate::broker::QueueType::parse(&get("QUEUE_TYPE"))?,
            broker_heartbeat_secs: number(&get, "BROKER_HEARTBEAT_SECS")?,
            replica_id: lookup("REPLICA_ID")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(default_replica_id),
            failover_timeout: Duration::from_secs(number(&get, "FAILOVER_TIMEOUT")?),
            max_tenants: number(&get, "MAX_TENANTS")?,
            http_addr: get("HTTP_ADDR"),
            allow_insecure_open_api: match get("ALLOW_INSECURE_OPEN_API").trim() {
                "0" => false,
                "1" => true,
                other => bail!("ALLOW_INSECURE_OPEN_API={other:?} is neither 0 nor 1"),
            },
            http_allowed_origins: crate::http::access::parse_origins(&get("HTTP_ALLOWED_ORIGINS"))?,
            rate_limit_per_sec: number(&get, "RATE_LIMIT_PER_SEC")?,
            rate_limit_burst: number(&get, "RATE_LIMIT_BURST")?,
            http_timeout: Duration::from_millis(number(&get, "HTTP_TIMEOUT_MS")?),
            http_max_connections: number(&get, "HTTP_MAX_CONNECTIONS")?,
            default_workers: number(&get, "DEFAULT_WORKERS")?,
            max_workers: number(&get, "MAX_WORKERS")?,
            pool_size: pool_size(&get("WORKER_POOL_SIZE"))?,
            batch_size: number(&get, "BATCH_SIZE")?,
            max_message_bytes: number(&get, "MAX_MESSAGE_BYTES")?,
            retry_delays: delays(&get("RETRY_DELAYS_MS"))?,
            connect_timeout: Duration::from_millis(number(&get, "CONNECT_TIMEOUT_MS")?),
            statement_timeout: Duration::from_millis(number(&get, "STATEMENT_TIMEOUT_MS")?),
            db_keepalive: Duration::from_millis(number(&get, "DB_KEEPALIVE_MS")?),
            shutdown_timeout: Duration::from_secs(number(&get, "SHUTDOWN_TIMEOUT")?),
            log_level: get("LOG_LEVEL")
                .parse()
                .with_context(|| format!("LOG_LEVEL={:?} is not a log level", get("LOG_LEVEL")))?,
            log_format: match get("LOG_FORMAT").as_str() {
                "text" => crate::logging::Format::Text,
                "json" => crate::logging::Format::Json,
                other => bail!("LOG_FORMAT={other:?} is neither text nor json"),
            },
            api_token: lookup("API_TOKEN").filter(|t| !t.is_empty()),
            metrics_token: lookup("METRICS_TOKEN").filter(|t| !t.is_empty()),
            jwt_hs256_secret: lookup("JWT_HS256_SECRET").filter(|t| !t.is_empty()),
            jwt_public_key_file: lookup("JWT_PUBLIC_KEY_FILE")
                .filter(|t| !t.is_empty())
                .map(PathBuf::from),
            jwt_issuer: lookup("JWT_ISSUER").filter(|t| !t.is_empty()),
            jwt_audience: lookup("JWT_AUDIENCE").filter(|t| !t.is_empty()),
            jwt_leeway: Duration::from_secs(number(&get, "JWT_LEEWAY_SECS")?),
        };
        config.check()?;
        Ok(config)
    }

    /// Holds every setting to its bounds; `start` asks again, so a `Config` built in code is
    /// held to them too. Connects to nothing: a refused setting costs no half start.
    pub fn check(&self) -> Result<()> {
        if self.max_workers == 0 || self.default_workers == 0 {
            bail!("DEFAULT_WORKERS and MAX_WORKERS must be at least 1");
        }
        if self.default_workers > self.max_workers {
            bail!(
                "DEFAULT_WORKERS={} is above MAX_WORKERS={}",
                self.default_workers,
                self.max_workers
            );
        }
        if self.http_max_connections == 0 {
            bail!("HTTP_MAX_CONNECTIONS must be at least 1");
        }
        if self.pool_size == 0 || self.batch_size == 0 {
            bail!("WORKER_POOL_SIZE and BATCH_SIZE must be at least 1");
        }
        if usize::from(self.max_workers) * self.batch_size > usize::from(u16::MAX) {
            bail!("MAX_WORKERS x BATCH_SIZE must fit a prefetch count (at most 65535)");
        }
        if self.max_tenants > 1_000_000 {
            bail!("MAX_TENANTS must be at most 1000000");
        }
        if self.failover_timeout < Duration::from_secs(2) {
            bail!("FAILOVER_TIMEOUT must be at least 2 seconds");
        }
        if self.db_keepalive < Duration::from_secs(2) {
            bail!("DB_KEEPALIVE_MS must be at least 2000");
        }
        if self.http_timeout < Duration::from_millis(100) {
            bail!("HTTP_TIMEOUT_MS must be at least 100");
        }
        if self.connect_timeout.is_zero() || self.max_message_bytes == 0 {
            bail!("CONNECT_TIMEOUT_MS and MAX_MESSAGE_BYTES must be at least 1");
        }
        if self.max_message_bytes > MAX_BROKER_MESSAGE_BYTES {
            bail!("MAX_MESSAGE_BYTES must be at most {MAX_BROKER_MESSAGE_BYTES}, RabbitMQ's largest max_message_size");
        }
        if self.rate_limit_per_sec > 1_000_000 || self.rate_limit_burst == 0 {
            bail!("RATE_LIMIT_PER_SEC must be 0 to 1000000 and RATE_LIMIT_BURST at least 1");
        }
        crate::http::access::check_settings(&crate::http::access::Exposure {
            http_addr: &self.http_addr,
            credential: self.api_token.is_some()
                || self.jwt_hs256_secret.is_some()
                || self.jwt_public_key_file.is_some(),
            allow_insecure_open_api: self.allow_insecure_open_api,
            secrets: [
                ("API_TOKEN", self.api_token.as_deref()),
                ("METRICS_TOKEN", self.metrics_token.as_deref()),
                ("JWT_HS256_SECRET", self.jwt_hs256_secret.as_deref()),
            ],
            jwt_leeway_secs: self.jwt_leeway.as_secs(),
        })
    }
}

/// `<hostname>-<6 hex>`: unique per process, and says where it runs.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tenantd".into());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &random[..6])
}

fn default_of(name: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.default)
        .unwrap_or_default()
}

/// RabbitMQ's largest `max_message_size` (512 MiB): no message can be larger.
const MAX_BROKER_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

fn number<T: std::str::FromStr>(get: &impl Fn(&str) -> String, name: &str) -> Result<T> {
    let raw = get(name);
    raw.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("{name}={raw:?} is not a valid number"))
}

/// A number, or `cpus`: one thread per CPU (at least two). On a small machine that shares its
/// cores with PostgreSQL and RabbitMQ, more threads only add contention (see the README).
fn pool_size(raw: &str) -> Result<usize> {
    if raw.trim() == "cpus" {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        return Ok(cpus.max(2));
    }
    raw.trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("WORKER_POOL_SIZE={raw:?} is not a number or `cpus`"))
}

/// `2000,4000,8000` → three delays; `none` → no retries.
fn delays(raw: &str) -> Result<Vec<Duration>> {
    if raw.trim() == "none" {
        return Ok(Vec::new());
    }
    raw.split(',')
        .map(|part| {
            part.trim().parse().map(Duration::from_millis).map_err(|_| {
                anyhow::anyhow!("RETRY_DELAYS_MS={raw:?} is not a list of milliseconds")
            })
        })
        .collect()
}

/// How `tenantd check` is called.
pub const CHECK_USAGE: &str = "tenantd check [--env-file <file>]";

/// The text of `tenantd --help`.
pub fn help_text() -> String {
    let mut text = format!(
        "tenantd: multi-tenant message ingestion from RabbitMQ into partitioned PostgreSQL\n\n\
         Usage: tenantd [--help]\n       {}\n         prints a JWT signed with JWT_HS256_SECRET \
         (ttl default 1h)\n       {}\n         reaches PostgreSQL and RabbitMQ, prints what limits \
         the tenants this host can run\n\nSettings (environment variables):\n",
        crate::token::USAGE,
        CHECK_USAGE
    );
    for s in SETTINGS {
        let default = if s.default.is_empty() {
            "(unset)"
        } else {
            s.default
        };
        text.push_str(&format!(
            "  {:<24} {}\n  {:<24} default: {default}; {}\n",
            s.name,
            s.help,
            "",
            bounds(s.name)
        ));
    }
    let default = |name| default_of(name).parse().unwrap_or(0);
    text.push_str(&crate::memory::worst_case(&crate::memory::Sizes {
        workers: default("DEFAULT_WORKERS"),
        batch: default("BATCH_SIZE"),
        message_bytes: default("MAX_MESSAGE_BYTES"),
        connections: default("HTTP_MAX_CONNECTIONS"),
    }));
    text
}

#[cfg(test)]
mod tests;
