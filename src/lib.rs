//! tenantd as a library: `start` builds and runs everything `main` runs, so the tests start
//! exactly what users run, and `App::shutdown` is the one ordered way down.

#![forbid(unsafe_code)]

mod backoff;
pub mod broker;
pub mod config;
mod consumer;
mod cursor;
pub mod http;
pub mod ids;
mod inflight;
pub mod logging;
mod manager;
pub mod metrics;
pub mod model;
mod pool;
mod service;
mod stats;
pub mod store;
mod url;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use log::info;

use broker::{BrokerAddr, BrokerAdmin};
pub use config::Config;
use consumer::ConsumerContext;
use http::HttpServer;
use manager::TenantManager;
use pool::WorkerPool;
use service::Service;
use store::LazyClient;

/// Threads answering HTTP requests. Most requests take milliseconds; a DELETE waits for the
/// tenant's in-flight messages, so there are enough threads for a few of those at once.
const HTTP_THREADS: usize = 8;

/// A running tenantd.
pub struct App {
    http: Option<HttpServer>,
    service: Arc<Service>,
    pool: Arc<WorkerPool>,
    stopped: bool,
}

/// Applies the schema, connects to the broker, restores every active tenant's consumer and
/// starts answering HTTP. Fails with the reason when a dependency is missing.
pub fn start(config: Config) -> Result<App> {
    let mut db = LazyClient::new(&config.database_url, config.connect_timeout);
    db.with(store::apply_schema)?;
    let broker = BrokerAddr::parse(&config.rabbitmq_url)?;
    let admin = BrokerAdmin::connect(broker.clone(), config.connect_timeout)?;
    let pool = Arc::new(WorkerPool::new(
        config.pool_size,
        &config.database_url,
        config.connect_timeout,
        config.max_message_bytes,
    ));
    let ctx = ConsumerContext {
        broker,
        connect_timeout: config.connect_timeout,
        batch_size: config.batch_size,
        retry_delays: config.retry_delays.clone(),
        pool: pool.clone(),
    };
    let manager = TenantManager::new(ctx, config.connect_timeout * 2);
    let service = Arc::new(Service {
        config,
        admin,
        manager,
        queues_read_at: parking_lot::Mutex::new(None),
    });
    let mut app = App {
        http: None,
        service: service.clone(),
        pool,
        stopped: false,
    };
    service.restore_consumers(&mut db)?;
    let http = HttpServer::start(&service.config.http_addr, HTTP_THREADS, service.clone())?;
    info!("tenantd listening on http://{}", http.addr());
    app.http = Some(http);
    Ok(app)
}

impl App {
    pub fn http_addr(&self) -> SocketAddr {
        self.http.as_ref().expect("started").addr()
    }

    /// Stops HTTP, then every consumer (in-flight messages commit and are acked), then the pool,
    /// within `SHUTDOWN_TIMEOUT`. Past it, what is unacked is left for redelivery and this fails.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let deadline = Instant::now() + self.service.config.shutdown_timeout;
        if let Some(http) = self.http.take() {
            info!("shutdown: HTTP stopped taking requests");
            http.stop();
        }
        self.service.manager.stop_all(deadline);
        info!("shutdown: every consumer stopped");
        if Instant::now() > deadline {
            bail!(
                "shutdown took longer than SHUTDOWN_TIMEOUT; unacked messages will be redelivered"
            );
        }
        self.pool.join();
        info!("shutdown: worker pool drained");
        Ok(())
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // A safety net for early returns and panics; `shutdown` is the path that reports.
        let _ = self.stop();
    }
}
