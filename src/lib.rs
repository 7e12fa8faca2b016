//! tenantd as a library: `start` builds and runs everything `main` runs, so the tests start
//! exactly what users run, and `App::shutdown` is the one ordered way down.

#![forbid(unsafe_code)]

mod assign;
mod backoff;
mod broker;
pub mod check;
pub mod config;
mod consumer;
mod coordinator;
mod cursor;
mod health;
pub mod help;
mod http;
mod ids;
mod inflight;
pub mod logging;
mod manager;
mod memory;
mod metrics;
mod model;
pub mod notify;
mod pool;
mod relay;
mod service;
mod stats;
mod store;
mod sweep;
pub mod token;
pub mod watchdog;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use crossbeam_channel::unbounded;
use log::info;

use broker::{BrokerAdmin, Brokers};
pub use config::Config;
use consumer::ConsumerContext;
use coordinator::Coordinator;
use health::Health;
use http::auth::{Auth, AuthSettings};
use http::{HttpServer, HttpSettings};
use manager::TenantManager;
use metrics::Metrics;
use pool::WorkerPool;
use service::{Service, ServiceSettings};
use store::dead_letters::Ledger;
use store::DbSettings;
use watchdog::Liveness;

/// What a client of the broker needs (the tests and the benchmark connect as publishers do).
pub use broker::{connect as connect_broker, BrokerAddr, QueueType};

/// The statements the tests and the benchmark hold to their indexes and costs: not an API.
#[doc(hidden)]
pub mod testing {
    /// The query of a page deep in a tenant's messages, for the test that holds it to its index.
    pub use crate::store::messages::PAGE_AFTER as PAGE_AFTER_SQL;
    /// The workers' inserts, for the benchmark that reads what each costs PostgreSQL per row.
    pub use crate::store::messages::{
        INSERT as INSERT_SQL, INSERT_SKIPPING_STORED as INSERT_SKIPPING_STORED_SQL,
    };
}

/// The most connections a replica's tenant threads use at once to record dead letters.
const LEDGER_CONNECTIONS: usize = 4;

/// A running tenantd replica.
pub struct App {
    http: Option<HttpServer>,
    service: Arc<Service>,
    coordinator: Option<Coordinator>,
    /// Removes the queues of interrupted creates; stopped (joined) when dropped.
    sweeper: Option<sweep::Sweeper>,
    health: Arc<Health>,
    manager: Arc<TenantManager>,
    pool: Arc<WorkerPool>,
    replica_id: String,
    failover_timeout: Duration,
    connect_timeout: Duration,
    shutdown_timeout: Duration,
    stopped: bool,
    /// Every part runs: only then does a stop say what it stops.
    started: bool,
}

/// Applies the schema, connects to the broker, starts answering HTTP and joins the replicas,
/// taking this replica's share of the active tenants. Fails with the reason when a dependency
/// is missing.
pub fn start(config: Config) -> Result<App> {
    // Before anything else: a setting out of bounds or a key that cannot verify tokens must
    // not cost a half start.
    config.check()?;
    let auth = Auth::new(&auth_settings(&config))?;
    let db = DbSettings {
        url: config.database_url.as_str().into(),
        connect_timeout: config.connect_timeout,
        statement_timeout: config.statement_timeout,
        keepalive: config.db_keepalive,
    };
    store::apply_schema(&mut store::connect(&db, "tenantd schema")?)?;
    let brokers =
        Brokers::parse(&config.rabbitmq_url)?.with_heartbeat(config.broker_heartbeat_secs);
    let admin = BrokerAdmin::connect(brokers.clone(), config.queue_type, config.connect_timeout)?;
    let metrics = Arc::new(Metrics::new());
    let pool = Arc::new(WorkerPool::new(
        config.pool_size,
        db.clone(),
        config.max_message_bytes,
        metrics.clone(),
    ));
    let (events_tx, events) = unbounded();
    let health = Arc::new(Health::default());
    let ctx = ConsumerContext {
        // A stopped replica's consumers must leave the broker before its tenants are taken.
        brokers: brokers.with_heartbeat_at_most(coordinator::consumer_heartbeat_secs(
            config.failover_timeout,
        )),
        queue_type: config.queue_type,
        connect_timeout: config.connect_timeout,
        batch_size: config.batch_size,
        retry_delays: config.retry_delays.clone(),
        pool: pool.clone(),
        events: events_tx,
        metrics: metrics.clone(),
        drain_timeout: config.shutdown_timeout,
        fence: consumer::FenceClock {
            health: health.clone(),
            after: config.failover_timeout / 2,
        },
        // A record is uncommitted while its letter's confirm is awaited (`connect_timeout`).
        ledger: Arc::new(Ledger::new(
            db.clone(),
            LEDGER_CONNECTIONS,
            config.connect_timeout + Duration::from_secs(5),
        )),
        gate: consumer::StartGate::default(),
    };
    let manager = Arc::new(TenantManager::new(Arc::new(ctx)));
    let service = Service::new(
        service_settings(&config),
        store::Pool::new(db.clone()),
        admin,
        manager.clone(),
        health.clone(),
        metrics,
    );
    let service = Arc::new(service);
    let mut app = App {
        http: None,
        service: service.clone(),
        coordinator: None,
        sweeper: None,
        health: health.clone(),
        manager: manager.clone(),
        pool,
        replica_id: config.replica_id.clone(),
        failover_timeout: config.failover_timeout,
        connect_timeout: config.connect_timeout,
        shutdown_timeout: config.shutdown_timeout,
        stopped: false,
        started: false,
    };
    let http = HttpServer::start(&http_settings(&config), auth, service)?;
    let http_addr = http.addr();
    app.http = Some(http);
    let settings = coordinator::Settings {
        replica_id: config.replica_id.clone(),
        http_addr: http_addr.to_string(),
        db,
        failover_timeout: config.failover_timeout,
        max_tenants: config.max_tenants,
        drain_timeout: config.shutdown_timeout,
    };
    app.coordinator = Some(Coordinator::start(settings, manager, events, health)?);
    app.sweeper = Some(sweep::Sweeper::start(app.service.clone())?);
    app.started = true;
    info!(
        "tenantd replica {} listening on http://{http_addr}",
        config.replica_id
    );
    Ok(app)
}

fn service_settings(config: &Config) -> ServiceSettings {
    ServiceSettings {
        default_workers: config.default_workers,
        max_workers: config.max_workers,
        lock_timeout: config.shutdown_timeout + Duration::from_secs(10),
        // A start may also wait at the start gate for the consumers opening beside it.
        start_timeout: config.connect_timeout * 2
            + consumer::START_GATE_MAX_WAIT
            + Duration::from_secs(1),
        stop_timeout: config.shutdown_timeout + Duration::from_secs(2),
        fence_grace: coordinator::grace(config.failover_timeout),
    }
}

fn http_settings(config: &Config) -> HttpSettings {
    HttpSettings {
        addr: config.http_addr.clone(),
        threads: http::REQUEST_THREADS,
        max_connections: config.http_max_connections,
        timeout: config.http_timeout,
        allowed_origins: config.http_allowed_origins.clone(),
        rate_per_sec: config.rate_limit_per_sec,
        rate_burst: config.rate_limit_burst,
    }
}

/// The credentials the API checks, and `tenantd token` signs with.
fn auth_settings(config: &Config) -> AuthSettings {
    AuthSettings {
        api_token: config.api_token.clone(),
        metrics_token: config.metrics_token.clone(),
        hs256_secret: config.jwt_hs256_secret.clone(),
        public_key_file: config.jwt_public_key_file.clone(),
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
        leeway: config.jwt_leeway,
    }
}

impl App {
    pub fn http_addr(&self) -> SocketAddr {
        self.http.as_ref().expect("started").addr()
    }

    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// What the service manager's watchdog checks: the coordinator comes round and heartbeats
    /// (within F/2, past which the fence stops every consumer here) or, the database
    /// unreachable, waits with every consumer stopped; the heart comes round (a beat to a silent
    /// server ends within F/2, a join within the connect timeout more); the HTTP front answers.
    pub fn liveness(&self) -> Liveness {
        Liveness::new(
            self.health.clone(),
            self.manager.clone(),
            self.http_addr(),
            self.failover_timeout / 2,
            self.failover_timeout.max(Duration::from_secs(2)) + self.connect_timeout,
        )
    }

    /// Stops HTTP, then hands every tenant over (in-flight messages commit and are acked, each
    /// claim is released for the replica taking it), then drains the pool, within
    /// `SHUTDOWN_TIMEOUT`. Past it, what is unacked is left for redelivery and this fails.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let deadline = Instant::now() + self.shutdown_timeout;
        // Operations waiting on another replica answer now, so HTTP stops within a moment.
        self.service.stop_waiting();
        // A start refused half way undoes what it began without a word: its error says why,
        // and shutdown lines would read as if a running replica were stopping.
        let said = self.started;
        if let Some(http) = self.http.take() {
            if said {
                info!(
                    "shutdown of replica {}: HTTP stops taking requests",
                    self.replica_id
                );
            }
            http.stop();
        }
        drop(self.sweeper.take());
        if let Some(coordinator) = self.coordinator.take() {
            coordinator.stop(deadline)?;
        }
        if said {
            info!("shutdown: every consumer stopped");
        }
        if !self.pool.join(deadline + Duration::from_secs(1)) || Instant::now() > deadline {
            bail!(
                "shutdown took longer than SHUTDOWN_TIMEOUT; unacked messages will be redelivered"
            );
        }
        if said {
            info!("shutdown: worker pool drained");
        }
        Ok(())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // A safety net for early returns and panics; `shutdown` is the path that reports.
        let _ = self.stop();
    }
}
