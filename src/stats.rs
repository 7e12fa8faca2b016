//! Per-tenant counters since tenantd started, kept across pauses and reconnects; they are the
//! Prometheus series of the tenant, and `GET /api/tenants/{id}` shows them.

use prometheus::IntCounter;
use serde::Serialize;

use crate::ids::TenantId;
use crate::metrics::Metrics;

pub struct TenantStats {
    consumed: IntCounter,
    stored: IntCounter,
    duplicates: IntCounter,
    retried: IntCounter,
    dead_lettered: IntCounter,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub consumed: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

impl TenantStats {
    pub fn new(id: TenantId, m: &Metrics) -> TenantStats {
        let label = id.to_string();
        let of = |v: &prometheus::IntCounterVec| v.with_label_values(&[label.as_str()]);
        TenantStats {
            consumed: of(&m.consumed),
            stored: of(&m.stored),
            duplicates: of(&m.duplicates),
            retried: of(&m.retried),
            dead_lettered: of(&m.dead_lettered),
        }
    }

    pub fn consumed(&self, n: u64) {
        self.consumed.inc_by(n);
    }

    /// `settled` messages committed, of which `inserted` were new rows.
    pub fn stored(&self, settled: u64, inserted: u64) {
        self.stored.inc_by(inserted);
        self.duplicates.inc_by(settled.saturating_sub(inserted));
    }

    pub fn retried(&self) {
        self.retried.inc();
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.inc();
    }

    pub fn counts(&self) -> Counts {
        Counts {
            consumed: self.consumed.get(),
            stored: self.stored.get(),
            duplicates: self.duplicates.get(),
            retried: self.retried.get(),
            dead_lettered: self.dead_lettered.get(),
        }
    }
}
