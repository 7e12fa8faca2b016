//! The order in which the pool's threads take batches: fair between tenants, not by arrival, so
//! a tenant with one message does not wait behind every batch a flooding tenant has queued.
//!
//! Start-time fair queueing over tenants, by messages, weighted by each tenant's `workers`: a
//! batch's start tag is the later of the virtual time and the finish tag of the tenant's
//! previous batch; its finish tag adds its messages divided by the weight. The batch with the
//! lowest start tag goes next (ties by arrival). The virtual time is the start tag of the batch
//! taken last, so a tenant that was idle comes back at the current time, with no credit saved.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use crate::ids::TenantId;

/// Divisible by every weight from 1 to 16, so common weights divide costs exactly.
const SCALE: u128 = 720_720;

pub struct Scheduler<T> {
    queue: BinaryHeap<Reverse<Entry<T>>>,
    /// The finish tag of each tenant's last batch; those at or before `now` are forgotten.
    finish: HashMap<TenantId, u128>,
    /// Virtual time: the start tag of the batch taken last.
    now: u128,
    /// Arrival order, to break ties.
    arrivals: u64,
}

struct Entry<T> {
    start: u128,
    arrival: u64,
    job: T,
}

impl<T> Scheduler<T> {
    pub fn new() -> Self {
        Scheduler {
            queue: BinaryHeap::new(),
            finish: HashMap::new(),
            now: 0,
            arrivals: 0,
        }
    }

    /// Queues a job of `messages` messages for `tenant`, whose share is `weight`.
    pub fn push(&mut self, tenant: TenantId, weight: usize, messages: usize, job: T) {
        let last = self.finish.get(&tenant).copied().unwrap_or(0);
        let start = last.max(self.now);
        let cost = messages.max(1) as u128 * SCALE / weight.max(1) as u128;
        self.finish.insert(tenant, start + cost);
        self.arrivals += 1;
        self.queue.push(Reverse(Entry {
            start,
            arrival: self.arrivals,
            job,
        }));
    }

    /// The job to run next, if any waits.
    pub fn pop(&mut self) -> Option<T> {
        let Reverse(entry) = self.queue.pop()?;
        self.now = self.now.max(entry.start);
        self.forget_idle();
        Some(entry.job)
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Drops the tags of tenants whose last batch finished in virtual time: they would start
    /// at `now` anyway. Only when the map has grown, so the cost is spread over many pops.
    fn forget_idle(&mut self) {
        if self.finish.len() > 2 * self.queue.len() + 64 {
            let now = self.now;
            self.finish.retain(|_, finish| *finish > now);
        }
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.start, self.arrival).cmp(&(other.start, other.arrival))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn tenant() -> TenantId {
        Uuid::new_v4().into()
    }

    fn drain(s: &mut Scheduler<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| s.pop()).collect()
    }

    #[test]
    fn a_tenant_arriving_later_goes_before_the_busy_tenants_queued_batches() {
        let (busy, quiet) = (tenant(), tenant());
        let mut s = Scheduler::new();
        s.push(busy, 3, 100, "busy 1");
        s.push(busy, 3, 100, "busy 2");
        s.push(busy, 3, 100, "busy 3");
        assert_eq!(s.pop(), Some("busy 1"));
        s.push(quiet, 3, 1, "quiet");
        assert_eq!(drain(&mut s), ["quiet", "busy 2", "busy 3"]);
    }

    #[test]
    fn tenants_with_work_take_turns_by_messages() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new();
        for job in ["a1", "a2", "a3"] {
            s.push(a, 1, 10, job);
        }
        for job in ["b1", "b2", "b3", "b4", "b5", "b6"] {
            s.push(b, 1, 5, job);
        }
        assert_eq!(
            drain(&mut s),
            ["a1", "b1", "b2", "a2", "b3", "b4", "a3", "b5", "b6"]
        );
    }

    #[test]
    fn a_tenant_with_more_workers_gets_a_larger_share() {
        let (small, large) = (tenant(), tenant());
        let mut s = Scheduler::new();
        for job in ["s1", "s2"] {
            s.push(small, 1, 10, job);
        }
        for job in ["l1", "l2", "l3", "l4"] {
            s.push(large, 2, 10, job);
        }
        assert_eq!(drain(&mut s), ["s1", "l1", "l2", "s2", "l3", "l4"]);
    }

    #[test]
    fn an_idle_tenant_saves_no_credit() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new();
        for job in ["a1", "a2", "a3", "a4"] {
            s.push(a, 1, 10, job);
        }
        assert_eq!(s.pop(), Some("a1"));
        assert_eq!(s.pop(), Some("a2"));
        assert_eq!(s.pop(), Some("a3"));
        s.push(b, 1, 10, "b1");
        s.push(b, 1, 10, "b2");
        assert_eq!(drain(&mut s), ["b1", "a4", "b2"]);
    }
}
