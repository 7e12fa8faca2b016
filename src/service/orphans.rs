//! Orphan queues: a create interrupted between declaring a tenant's queues and inserting its
//! row (a crash, a lost database) leaves `tenant_{id}_queue`, `_retry` and `_dlq` for no tenant.
//! Its record of the create (`store::orphans`) outlives it; once older than `ORPHAN_GRACE` with
//! no row, the queues are deleted here, by one replica at a time.

use std::time::Duration;

use anyhow::Result;
use log::{info, warn};

use super::Service;
use crate::ids::TenantId;
use crate::store::orphans;

/// How long a create may take before the queues it declared count as orphans: far longer than
/// a create can run (its broker and database calls each have a timeout of seconds).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(600);

impl Service {
    /// Deletes the queues of creates older than `grace` that left no tenant row; the number of
    /// creates swept. Only one replica sweeps at a time (the others return 0).
    pub fn sweep_orphans(&self, grace: Duration) -> Result<usize> {
        let mut db = self.db.get()?;
        let swept = orphans::sweep(&mut db, grace, |id| self.remove_orphan(id, grace))?;
        Ok(swept.len())
    }

    fn remove_orphan(&self, id: TenantId, grace: Duration) -> Result<()> {
        let mut present = 0;
        for name in [id.queue_name(), id.retry_name(), id.dlq_name()] {
            if self.admin.queue_stats(&name)?.is_some() {
                present += 1;
            }
        }
        if let Err(e) = self.admin.delete_queues(id) {
            warn!(tenant_id:% = id; "could not remove orphan queues: {e:#}");
            return Err(e);
        }
        self.metrics.orphan_queues_removed.inc_by(present);
        info!(
            tenant_id:% = id, queues = present;
            "orphan queues removed: a create left them without a tenant {grace:?} ago or more"
        );
        Ok(())
    }
}
