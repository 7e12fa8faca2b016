//! Prometheus metrics, one registry for the process: per-tenant message counters, commit latency
//! and batch sizes, concurrency, queue depths read from the broker (cached), HTTP requests, and
//! the process itself.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub consumed: IntCounterVec,
    pub stored: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub retried: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub workers: IntGaugeVec,
    pub queue_messages: IntGaugeVec,
    pub queue_consumers: IntGaugeVec,
    pub commit_seconds: Histogram,
    pub batch_messages: Histogram,
    pub tenants_running: IntGauge,
    pub consumers_failing: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
}

/// The process's metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::register)
}

fn per_tenant(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), &["tenant_id"]).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("registered once");
    counter
}

fn gauge_per_tenant(registry: &Registry, name: &str, help: &str) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(Opts::new(name, help), &["tenant_id"]).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("registered once");
    gauge
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid");
    registry
        .register(Box::new(h.clone()))
        .expect("registered once");
    h
}

impl Metrics {
    fn register() -> Metrics {
        let r = Registry::new();
        let ms = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let http_seconds = HistogramVec::new(
            HistogramOpts::new(
                "tenantd_http_request_duration_seconds",
                "HTTP request latency",
            )
            .buckets(ms.clone()),
            &["route"],
        )
        .expect("valid metric");
        r.register(Box::new(http_seconds.clone()))
            .expect("registered once");
        let http_requests = IntCounterVec::new(
            Opts::new("tenantd_http_requests_total", "HTTP requests answered"),
            &["route", "status"],
        )
        .expect("valid metric");
        r.register(Box::new(http_requests.clone()))
            .expect("registered once");
        let tenants_running = IntGauge::new(
            "tenantd_consumers_running",
            "tenants with a running consumer thread",
        )
        .expect("valid metric");
        r.register(Box::new(tenants_running.clone()))
            .expect("registered once");
        let consumers_failing = IntGauge::new(
            "tenantd_consumers_failing",
            "tenants that should run on this replica but cannot connect to the broker",
        )
        .expect("valid metric");
        r.register(Box::new(consumers_failing.clone()))
            .expect("registered once");
        let process = prometheus::process_collector::ProcessCollector::for_self();
        r.register(Box::new(process)).expect("registered once");
        Metrics {
            consumed: per_tenant(
                &r,
                "tenantd_messages_consumed_total",
                "deliveries taken from the tenant's queue",
            ),
            stored: per_tenant(
                &r,
                "tenantd_messages_stored_total",
                "messages stored as new rows",
            ),
            duplicates: per_tenant(
                &r,
                "tenantd_messages_duplicate_total",
                "messages skipped: their id was already stored",
            ),
            retried: per_tenant(
                &r,
                "tenantd_messages_retried_total",
                "failed messages sent to the retry queue",
            ),
            dead_lettered: per_tenant(
                &r,
                "tenantd_messages_dead_lettered_total",
                "failed messages sent to the dead-letter queue",
            ),
            workers: gauge_per_tenant(&r, "tenantd_tenant_workers", "the tenant's concurrency"),
            queue_messages: gauge_per_tenant(
                &r,
                "tenantd_queue_messages",
                "messages ready in the tenant's queue (cached)",
            ),
            queue_consumers: gauge_per_tenant(
                &r,
                "tenantd_queue_consumers",
                "consumers on the tenant's queue (cached)",
            ),
            commit_seconds: histogram(
                &r,
                "tenantd_delivery_to_commit_seconds",
                "from delivery to committed row",
                ms,
            ),
            batch_messages: histogram(
                &r,
                "tenantd_batch_messages",
                "messages per stored batch",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
            ),
            tenants_running,
            consumers_failing,
            http_requests,
            http_seconds,
            registry: r,
        }
    }

    /// Forgets a deleted tenant's series.
    pub fn remove_tenant(&self, tenant: &str) {
        for counter in [
            &self.consumed,
            &self.stored,
            &self.duplicates,
            &self.retried,
            &self.dead_lettered,
        ] {
            let _ = counter.remove_label_values(&[tenant]);
        }
        for gauge in [&self.workers, &self.queue_messages, &self.queue_consumers] {
            let _ = gauge.remove_label_values(&[tenant]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
