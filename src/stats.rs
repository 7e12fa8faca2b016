//! Per-tenant counters since tenantd started, kept across pauses and reconnects, shown by
//! `GET /api/tenants/{id}`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Default)]
pub struct TenantStats {
    consumed: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
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
    pub fn consumed(&self, n: u64) {
        self.consumed.fetch_add(n, Ordering::Relaxed);
    }

    /// `settled` messages committed, of which `inserted` were new rows.
    pub fn stored(&self, settled: u64, inserted: u64) {
        self.stored.fetch_add(inserted, Ordering::Relaxed);
        self.duplicates
            .fetch_add(settled.saturating_sub(inserted), Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> Counts {
        Counts {
            consumed: self.consumed.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}
