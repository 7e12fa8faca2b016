//! Prometheus metrics, one registry per running replica (`App`): per-tenant message counters,
//! commit latency and batch sizes, concurrency, queue and dead-letter depths read from the broker
//! (cached), dead letters replayed and dropped, consumers, HTTP requests and what the HTTP guard
//! holds, and the process itself. Rendered whole for an operator, or without any series that
//! names a tenant for anyone else.

use prometheus::{
    register_counter_vec_with_registry, register_histogram_vec_with_registry,
    register_histogram_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry,
    register_int_gauge_with_registry, CounterVec, Encoder, Histogram, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
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
    pub dead_letters: IntGaugeVec,
    pub dead_letters_replayed: IntCounterVec,
    pub dead_letters_dropped: IntCounterVec,
    pub commit_seconds: Histogram,
    pub batch_messages: Histogram,
    pub batch_wait_seconds: Histogram,
    pub batches_waiting: IntGauge,
    pub pool_wait: CounterVec,
    pub tenants_running: IntGauge,
    pub consumers_failing: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_seconds: HistogramVec,
    pub http_connections: IntGauge,
    pub http_held_bytes: IntGaugeVec,
    pub orphan_queues_removed: IntCounter,
}

/// The label naming a tenant: a series carrying it is left out of the anonymous view.
const TENANT_LABEL: &str = "tenant_id";

const SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Names and help texts are static and each is registered once in a fresh registry, so
/// registration cannot fail.
const VALID: &str = "a valid metric, registered once";

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let per_tenant = |name: &str, help: &str| {
            register_int_counter_vec_with_registry!(name, help, &["tenant_id"], r).expect(VALID)
        };
        let gauge_per_tenant = |name: &str, help: &str| {
            register_int_gauge_vec_with_registry!(name, help, &["tenant_id"], r).expect(VALID)
        };
        let process = prometheus::process_collector::ProcessCollector::for_self();
        r.register(Box::new(process)).expect(VALID);
        Metrics {
            consumed: per_tenant(
                "tenantd_messages_consumed_total",
                "deliveries taken from the tenant's queue",
            ),
            stored: per_tenant(
                "tenantd_messages_stored_total",
                "messages stored as new rows",
            ),
            duplicates: per_tenant(
                "tenantd_messages_duplicate_total",
                "messages skipped: their id was already stored",
            ),
            retried: per_tenant(
                "tenantd_messages_retried_total",
                "failed messages sent to the retry queue",
            ),
            dead_lettered: per_tenant(
                "tenantd_messages_dead_lettered_total",
                "failed messages sent to the dead-letter queue",
            ),
            workers: gauge_per_tenant("tenantd_tenant_workers", "the tenant's concurrency"),
            queue_messages: gauge_per_tenant(
                "tenantd_queue_messages",
                "messages ready in the tenant's queue (cached)",
            ),
            queue_consumers: gauge_per_tenant(
                "tenantd_queue_consumers",
                "consumers on the tenant's queue (cached)",
            ),
            dead_letters: gauge_per_tenant(
                "tenantd_dead_letters",
                "messages in the tenant's dead-letter queue (cached)",
            ),
            dead_letters_replayed: per_tenant(
                "tenantd_dead_letters_replayed_total",
                "dead letters moved back to the tenant's queue through this replica",
            ),
            dead_letters_dropped: per_tenant(
                "tenantd_dead_letters_dropped_total",
                "dead letters dropped through this replica",
            ),
            commit_seconds: register_histogram_with_registry!(
                "tenantd_delivery_to_commit_seconds",
                "from delivery to committed row",
                SECONDS.to_vec(),
                r
            )
            .expect(VALID),
            batch_messages: register_histogram_with_registry!(
                "tenantd_batch_messages",
                "messages per stored batch",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                r
            )
            .expect(VALID),
            batch_wait_seconds: register_histogram_with_registry!(
                "tenantd_batch_wait_seconds",
                "from a batch handed to the pool to a worker taking it",
                [0.0001, 0.00025, 0.0005]
                    .into_iter()
                    .chain(SECONDS)
                    .collect(),
                r
            )
            .expect(VALID),
            batches_waiting: register_int_gauge_with_registry!(
                "tenantd_batches_waiting",
                "batches handed to the pool that no worker has taken yet",
                r
            )
            .expect(VALID),
            pool_wait: register_counter_vec_with_registry!(
                "tenantd_messages_pool_wait_seconds_total",
                "time the tenant's messages waited for a worker, summed over its messages",
                &["tenant_id"],
                r
            )
            .expect(VALID),
            tenants_running: register_int_gauge_with_registry!(
                "tenantd_consumers_running",
                "tenants whose consumer runs on this replica",
                r
            )
            .expect(VALID),
            consumers_failing: register_int_gauge_with_registry!(
                "tenantd_consumers_failing",
                "tenants that should run on this replica but cannot connect to the broker",
                r
            )
            .expect(VALID),
            http_requests: register_int_counter_vec_with_registry!(
                "tenantd_http_requests_total",
                "HTTP requests answered",
                &["route", "status"],
                r
            )
            .expect(VALID),
            http_seconds: register_histogram_vec_with_registry!(
                "tenantd_http_request_duration_seconds",
                "HTTP request latency",
                &["route"],
                SECONDS.to_vec(),
                r
            )
            .expect(VALID),
            http_connections: register_int_gauge_with_registry!(
                "tenantd_http_connections",
                "client connections the HTTP guard holds open",
                r
            )
            .expect(VALID),
            http_held_bytes: register_int_gauge_vec_with_registry!(
                "tenantd_http_held_bytes",
                "bytes the HTTP guard holds: request bodies being read or passed on, responses \
                 waiting for their client to read them",
                &["kind"],
                r
            )
            .expect(VALID),
            orphan_queues_removed: register_int_counter_with_registry!(
                "tenantd_orphan_queues_removed_total",
                "queues a create left without a tenant, removed by this replica's sweep",
                r
            )
            .expect(VALID),
            registry: r,
        }
    }

    /// Forgets a tenant's series (it was deleted, or it runs on another replica now).
    pub fn remove_tenant(&self, tenant: &str) {
        for counter in [
            &self.consumed,
            &self.stored,
            &self.duplicates,
            &self.retried,
            &self.dead_lettered,
            &self.dead_letters_replayed,
            &self.dead_letters_dropped,
        ] {
            let _ = counter.remove_label_values(&[tenant]);
        }
        let _ = self.pool_wait.remove_label_values(&[tenant]);
        let gauges = [
            &self.workers,
            &self.queue_messages,
            &self.queue_consumers,
            &self.dead_letters,
        ];
        for gauge in gauges {
            let _ = gauge.remove_label_values(&[tenant]);
        }
    }

    /// The Prometheus text exposition of every metric; with `per_tenant` false, of every
    /// series that names no tenant (what anyone may see).
    pub fn render(&self, per_tenant: bool) -> String {
        let mut families = self.registry.gather();
        if !per_tenant {
            for family in &mut families {
                family
                    .mut_metric()
                    .retain(|m| m.get_label().iter().all(|l| l.name() != TENANT_LABEL));
            }
            families.retain(|f| !f.get_metric().is_empty());
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
