//! Planning and carrying the plan out: which live replica runs which active tenant (`assign`),
//! and, for this replica, stopping what should not run here, claiming and starting what
//! should, resizing what changed, and giving up claims no thread here stands behind.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use log::{error, info};

use super::grace;
use super::state::Loop;
use crate::assign::{self, Placed};
use crate::ids::TenantId;
use crate::model::Claimed;
use crate::model::Status;
use crate::store::replicas::{self, Replica, TenantState};

/// Tenants claimed at once: between two waves the plan is made again, so replicas that join
/// meanwhile get their share before this one has taken everything.
const CLAIM_WAVE: usize = 250;
/// How long a replica that finds itself alone, where others ran lately (a fleet starting
/// together), waits for them before it plans: else it takes every tenant, then sheds them.
const PEER_GRACE: Duration = Duration::from_secs(2);

impl Loop {
    /// Plans and carries the plan out for this replica.
    pub(super) fn reconcile(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let session = self.session.as_mut().expect("connected");
        let live = replicas::live(session)?;
        let states = replicas::states(session)?;
        let read = t0.elapsed();
        let me = self.settings.replica_id.clone();
        if !live.iter().any(|r| r.id == me) {
            // Not live (the heart is joining again): a plan made now would give this replica's
            // own tenants away. The next tick looks again.
            self.dirty = true;
            return Ok(());
        }
        if self.waits_for_peers(live.len())? {
            return Ok(());
        }
        self.members = live
            .iter()
            .map(|r| (r.id.clone(), r.leaving, r.broker_down))
            .collect();
        let live_ids: HashSet<&str> = live.iter().map(|r| r.id.as_str()).collect();
        let staying: Vec<&Replica> = live
            .iter()
            .filter(|r| !(r.leaving || self.leaving && r.id == me))
            .collect();
        // Replicas cut from the broker take nothing, unless every one is (then none can
        // consume, and the tenants stay where they are).
        let reaching = staying.iter().any(|r| !r.broker_down);
        let taking: Vec<&Replica> = staying
            .iter()
            .copied()
            .filter(|r| !(reaching && r.broker_down))
            .collect();
        let caps: Vec<Option<usize>> = taking
            .iter()
            .map(|r| r.max_tenants.and_then(|m| usize::try_from(m).ok()))
            .collect();
        let taking: Vec<&str> = taking.iter().map(|r| r.id.as_str()).collect();
        let active: Vec<Placed> = states
            .iter()
            .filter(|s| s.status == Status::Active)
            .map(|s| Placed {
                tenant: s.id,
                owner: s.owner.as_deref().filter(|o| taking.contains(o)),
            })
            .collect();
        let plan = assign::plan_capped(&active, &taking, &caps);
        let mine = |s: &TenantState| {
            s.status == Status::Active && plan.get(&s.id).is_some_and(|r| *r == me)
        };
        self.stop_or_update(&states, &mine);
        let wanted: Vec<&TenantState> = states
            .iter()
            .filter(|s| mine(s) && !self.manager.has_thread(s.id))
            .filter(|s| {
                s.owner
                    .as_deref()
                    .is_none_or(|o| o == me || !live_ids.contains(o))
            })
            .collect();
        let started = self.claim_and_start(&wanted)?;
        self.release_stale_claims(&states, &mine);
        let known: HashSet<_> = states.iter().map(|s| s.id).collect();
        for id in self.manager.known() {
            if !known.contains(&id) && !self.manager.has_thread(id) {
                self.manager.forget(id);
                self.restart_after.remove(&id);
            }
        }
        self.settled(live.len(), active.len(), started);
        log::debug!(
            "planned {} tenants in {:?} (reading them: {read:?})",
            states.len(),
            t0.elapsed()
        );
        Ok(())
    }

    /// Stops the threads here whose tenant should not run here (any more), and applies newer
    /// versions to the others.
    fn stop_or_update(&mut self, states: &[TenantState], mine: &impl Fn(&TenantState) -> bool) {
        let me = self.settings.replica_id.clone();
        let by_id: HashMap<_, _> = states.iter().map(|s| (s.id, s)).collect();
        let mut reports = Vec::new();
        for id in self.manager.ids() {
            let keep = by_id
                .get(&id)
                .filter(|s| mine(s) && s.owner.as_deref() == Some(me.as_str()));
            let deadline = Instant::now() + self.settings.drain_timeout;
            let report = match keep {
                Some(s) => self.manager.update(id, claimed(s)),
                None => self.manager.stop(id, deadline),
            };
            reports.extend(report.map(|r| (id, r)));
        }
        for (id, report) in reports {
            self.write_report(id, &report);
        }
    }

    /// Claims the tenants (one statement) and starts their consumers; how many started. A
    /// claim refused because its owner, no longer live, may still be consuming (`grace`) is
    /// tried again next tick.
    fn claim_and_start(&mut self, wanted: &[&TenantState]) -> Result<usize> {
        let me = self.settings.replica_id.clone();
        let now = Instant::now();
        let due: Vec<&TenantState> = wanted
            .iter()
            .copied()
            .filter(|s| {
                self.restart_after
                    .get(&s.id)
                    .is_none_or(|(at, _)| now >= *at)
            })
            .collect();
        // Due later, or in a later wave: plan again at the next wake.
        self.dirty |= due.len() < wanted.len() || due.len() > CLAIM_WAVE;
        let more_waves = due.len() > CLAIM_WAVE;
        let due = &due[..due.len().min(CLAIM_WAVE)];
        if due.is_empty() {
            return Ok(0);
        }
        let ids: Vec<TenantId> = due.iter().map(|s| s.id).collect();
        let session = self.session.as_mut().expect("connected");
        let claimed = replicas::claim(session, &ids, &me, grace(self.settings.failover_timeout))?;
        // The heart may have gone silent meanwhile (its session stuck): a consumer started now
        // must stand behind a heartbeat younger than the fence's limit, or the fence, having
        // fired already, would let it run through the replica's silence while another replica
        // takes the tenant. Without one nothing starts; the claims stay this replica's and a
        // later reconcile starts (or releases) them.
        if self.health.heartbeat_age() >= self.settings.failover_timeout / 2 {
            self.dirty = true;
            return Ok(0);
        }
        // Owned elsewhere and not (yet) released: look again next tick.
        self.dirty |= claimed.len() < due.len();
        let mut started = 0;
        for (id, claim) in claimed {
            match self.manager.start(id, claim) {
                Ok(()) => started += 1,
                Err(e) => {
                    error!(tenant_id:% = id; "cannot start its consumer: {e:#}");
                    self.back_off(id);
                    self.released.push((id, claim.version));
                }
            }
        }
        self.flush_releases();
        // Only a wave that started something chains the next at once: refused claims (rows
        // locked, an owner within its grace) wait for the next wake, not a tight loop.
        self.next_wave = more_waves && started > 0;
        Ok(started)
    }

    /// Gives up claims of this replica's that no thread here stands behind and that it does
    /// not want (their consumer ended while the session was down, so the release could not be
    /// written): otherwise a pause or a delete would wait on them for ever.
    fn release_stale_claims(
        &mut self,
        states: &[TenantState],
        mine: &impl Fn(&TenantState) -> bool,
    ) {
        let me = self.settings.replica_id.clone();
        for s in states {
            let stale = s.owner.as_deref() == Some(me.as_str())
                && !mine(s)
                && !self.manager.has_thread(s.id);
            if stale {
                self.released.push((s.id, s.version));
            }
        }
        self.flush_releases();
    }

    /// Whether to wait (a heartbeat interval at a time) for peers before the first plan: this
    /// replica is alone, started less than `PEER_GRACE` ago, and other replicas ran within the
    /// last minute. A replica that runs alone for good pays nothing.
    fn waits_for_peers(&mut self, live: usize) -> Result<bool> {
        if self.health.is_settled() || live > 1 || self.started.elapsed() >= PEER_GRACE {
            return Ok(false);
        }
        let me = self.settings.replica_id.clone();
        let session = self.session.as_mut().expect("connected");
        if !replicas::peers_seen_lately(session, &me)? {
            return Ok(false);
        }
        self.dirty = true;
        Ok(true)
    }

    fn settled(&mut self, replicas: usize, active: usize, started: usize) {
        if self.health.settle() {
            info!(
                "replica {} took its share: {replicas} live replicas, {active} active tenants, \
                 {started} started here",
                self.settings.replica_id
            );
        }
    }
}

fn claimed(s: &TenantState) -> Claimed {
    Claimed {
        workers: s.workers,
        version: s.version,
    }
}
