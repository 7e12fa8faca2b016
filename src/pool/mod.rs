//! The shared worker pool: threads that each use one PostgreSQL connection at a time to store
//! batches of one tenant's messages, then report the outcome to that tenant's thread, which acks.
//! Which batch a free thread stores next is the scheduler's choice, fair between tenants.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Sender;
use log::{debug, error};
use parking_lot::{Condvar, Mutex};
use postgres::Client;
use threadpool::ThreadPool;
use uuid::Uuid;

use crate::ids::TenantId;
use crate::metrics::Metrics;
use crate::store::messages::{self, Inserts};
use crate::store::{self, DbSettings};
use scheduler::Scheduler;

mod scheduler;

/// One delivery, as a worker sees it: its tag (for the reply), its id and its body.
pub struct Item {
    pub tag: u64,
    pub id: Uuid,
    pub body: Vec<u8>,
    /// When the tenant thread took the delivery: the start of its commit latency.
    pub accepted: Instant,
}

/// Messages of one tenant, stored in one transaction.
pub struct Batch {
    pub tenant: TenantId,
    /// The tenant's concurrency, also its share of the pool when tenants wait for it.
    pub workers: usize,
    pub items: Vec<Item>,
    pub reply: Sender<BatchDone>,
}

/// What became of a batch: messages that can never be stored, and the outcome for the rest.
pub struct BatchDone {
    pub poison: Vec<Poison>,
    pub outcome: Outcome,
}

/// A message that can never be stored, its body back for a retry or the DLQ, and why.
pub struct Poison {
    pub tag: u64,
    /// The id it would have been stored under: its copies keep it.
    pub id: Uuid,
    pub body: Vec<u8>,
    pub reason: String,
}

pub enum Outcome {
    /// Committed: `settled` may be acked; `inserted` of them were new rows.
    Stored { settled: Vec<u64>, inserted: u64 },
    /// Nothing is wrong with these messages, but they are not stored (the database is
    /// unreachable, or a worker failed): they come back to be tried again.
    Transient { items: Vec<Item>, error: String },
}

/// The executor runs one job per submitted batch; each job stores whichever batch the
/// scheduler picks, so a batch never waits behind the batches queued before it, only behind
/// its share.
pub struct WorkerPool {
    pool: ThreadPool,
    shared: Arc<Shared>,
}

struct Shared {
    settings: WorkerSettings,
    /// Batches submitted and not yet taken by a thread.
    waiting: Mutex<Scheduler<Waiting>>,
    /// Idle connections: as many as threads, each used by one thread at a time. They live here,
    /// not in thread-locals, so they close on a normal thread (the postgres client cannot be
    /// dropped from a thread-local destructor).
    idle: Mutex<Vec<WorkerDb>>,
    pending: Pending,
}

struct Waiting {
    batch: Batch,
    since: Instant,
}

struct WorkerSettings {
    db: DbSettings,
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
}

/// Batches submitted and not yet finished, to wait for at shutdown.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    done: Condvar,
}

impl WorkerPool {
    pub fn new(
        size: usize,
        db: DbSettings,
        max_message_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> WorkerPool {
        let pool = threadpool::Builder::new()
            .num_threads(size)
            .thread_name("worker".into())
            .build();
        WorkerPool {
            pool,
            shared: Arc::new(Shared {
                settings: WorkerSettings {
                    db,
                    max_message_bytes,
                    metrics,
                },
                waiting: Mutex::new(Scheduler::new()),
                idle: Mutex::new(Vec::with_capacity(size)),
                pending: Pending::default(),
            }),
        }
    }

    /// Queues the batch for the next free thread, in the scheduler's order.
    pub fn submit(&self, batch: Batch) {
        let shared = self.shared.clone();
        *shared.pending.count.lock() += 1;
        {
            let mut waiting = shared.waiting.lock();
            let (tenant, workers, messages) = (batch.tenant, batch.workers, batch.items.len());
            let since = Instant::now();
            waiting.push(tenant, workers, messages, Waiting { batch, since });
            shared
                .settings
                .metrics
                .batches_waiting
                .set(waiting.len() as i64);
        }
        self.pool.execute(move || shared.store_next());
    }

    /// Waits until every submitted batch has finished, or `deadline`; false when it passed.
    pub fn join(&self, deadline: Instant) -> bool {
        let pending = &self.shared.pending;
        let mut count = pending.count.lock();
        while *count > 0 {
            if pending.done.wait_until(&mut count, deadline).timed_out() {
                return *count == 0;
            }
        }
        true
    }
}

impl Shared {
    /// A thread's job: takes the batch the scheduler picks and stores it.
    fn store_next(&self) {
        let Some(Waiting { batch, since }) = self.take() else {
            return;
        };
        self.observe_wait(&batch, since);
        let Batch {
            tenant,
            items,
            reply,
            ..
        } = batch;
        let settings = &self.settings;
        let mut db = self.idle.lock().pop();
        let (done, panicked) = store_guarded(&settings.metrics, tenant, items, |items| {
            judge(settings, &mut db, tenant, items)
        });
        if !panicked {
            // A connection that was in use when a worker panicked is closed, not reused.
            self.idle.lock().extend(db);
        }
        // The tenant thread may have gone (stopped or reconnected): its deliveries are then
        // redelivered by the broker, and the message ids keep the rows single.
        let _ = reply.send(done);
        let mut count = self.pending.count.lock();
        *count -= 1;
        if *count == 0 {
            self.pending.done.notify_all();
        }
    }

    /// Every job is queued after its batch, so a job always finds one.
    fn take(&self) -> Option<Waiting> {
        let mut waiting = self.waiting.lock();
        let next = waiting.pop();
        self.settings
            .metrics
            .batches_waiting
            .set(waiting.len() as i64);
        next
    }

    fn observe_wait(&self, batch: &Batch, since: Instant) {
        let m = &self.settings.metrics;
        let wait = since.elapsed().as_secs_f64();
        m.batch_wait_seconds.observe(wait);
        m.pool_wait
            .with_label_values(&[&batch.tenant.to_string()])
            .inc_by(wait * batch.items.len() as f64);
    }
}

/// A worker's connection and prepared insert, opened on first use and after a failure.
struct WorkerDb {
    client: Client,
    inserts: Inserts,
}

/// Stores the batch through `judge`; a panic while doing so gives the whole batch back to be
/// tried again (the items never leave this frame until the outcome is known), so the tenant
/// always hears back and never loses a slot. Also says whether it panicked.
fn store_guarded(
    metrics: &Metrics,
    tenant: TenantId,
    items: Vec<Item>,
    judge: impl FnOnce(&[Item]) -> Verdict,
) -> (BatchDone, bool) {
    match catch_unwind(AssertUnwindSafe(|| judge(&items))) {
        Ok(verdict) => (settle(metrics, items, verdict), false),
        Err(_) => {
            error!(tenant_id:% = tenant; "a worker panicked while storing a batch; it will be retried");
            let verdict = Verdict {
                poison: Vec::new(),
                stored: Err("a worker failed while storing the batch".into()),
            };
            (settle(metrics, items, verdict), true)
        }
    }
}

/// What happened to a batch, by position in it.
struct Verdict {
    /// Items that can never be stored, with the reason.
    poison: Vec<(usize, String)>,
    /// For every other item: committed (with how many rows were new), or not stored.
    stored: Result<u64, String>,
}

fn settle(metrics: &Metrics, items: Vec<Item>, verdict: Verdict) -> BatchDone {
    let mut reasons: Vec<Option<String>> = vec![None; items.len()];
    for (i, reason) in verdict.poison {
        reasons[i] = Some(reason);
    }
    let mut poison = Vec::new();
    let mut good = Vec::with_capacity(items.len());
    for (item, reason) in items.into_iter().zip(reasons) {
        match reason {
            Some(reason) => poison.push(Poison {
                tag: item.tag,
                id: item.id,
                body: item.body,
                reason,
            }),
            None => good.push(item),
        }
    }
    let outcome = match verdict.stored {
        Ok(inserted) => {
            observe(metrics, &good);
            Outcome::Stored {
                settled: good.iter().map(|i| i.tag).collect(),
                inserted,
            }
        }
        Err(error) => Outcome::Transient { items: good, error },
    };
    BatchDone { poison, outcome }
}

fn judge(
    settings: &WorkerSettings,
    slot: &mut Option<WorkerDb>,
    tenant: TenantId,
    items: &[Item],
) -> Verdict {
    let mut poison: Vec<(usize, String)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            Some((
                i,
                check_payload(&item.body, settings.max_message_bytes).err()?,
            ))
        })
        .collect();
    let good: Vec<usize> = (0..items.len())
        .filter(|i| !poison.iter().any(|(p, _)| p == i))
        .collect();
    if good.is_empty() {
        return Verdict {
            poison,
            stored: Ok(0),
        };
    }
    let db = match open_db(slot, &settings.db) {
        Ok(db) => db,
        Err(error) => {
            return Verdict {
                poison,
                stored: Err(error),
            }
        }
    };
    let stored = match insert(db, tenant, items, &good) {
        Ok(inserted) => Ok(inserted),
        // One message PostgreSQL refuses must not hold back the others: store one by one.
        Err(e) if is_content_error(&e) => insert_one_by_one(db, tenant, items, &good, &mut poison),
        Err(e) => Err(e),
    };
    if let Err(e) = &stored {
        debug!(tenant_id:% = tenant; "storing a batch failed: {e}");
        // The connection may be broken; the next batch opens a fresh one.
        *slot = None;
    }
    Verdict {
        poison,
        stored: stored.map_err(|e| describe(&e)),
    }
}

/// The error with PostgreSQL's own message, which `Display` leaves out ("db error").
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => e.to_string(),
    }
}

/// Records the batch's size and each message's delivery-to-commit latency.
fn observe(m: &Metrics, batch: &[Item]) {
    m.batch_messages.observe(batch.len() as f64);
    for item in batch {
        m.commit_seconds
            .observe(item.accepted.elapsed().as_secs_f64());
    }
}

fn open_db<'a>(
    slot: &'a mut Option<WorkerDb>,
    settings: &DbSettings,
) -> Result<&'a mut WorkerDb, String> {
    if slot.as_ref().is_some_and(|db| db.client.is_closed()) {
        *slot = None;
    }
    if slot.is_none() {
        let mut client =
            store::connect(settings, "tenantd worker").map_err(|e| format!("{e:#}"))?;
        let inserts = messages::prepare_inserts(&mut client).map_err(|e| describe(&e))?;
        debug!("worker connected to PostgreSQL");
        *slot = Some(WorkerDb { client, inserts });
    }
    Ok(slot.as_mut().expect("connection was just opened"))
}

fn check_payload(body: &[u8], max_bytes: usize) -> Result<(), String> {
    if body.len() > max_bytes {
        return Err(format!(
            "message is {} bytes, more than the {max_bytes} allowed",
            body.len()
        ));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(drop)
        .map_err(|e| format!("message is not JSON: {e}"))
}

/// Inserts the items at `which` in one statement; how many rows were new.
fn insert(
    db: &mut WorkerDb,
    tenant: TenantId,
    items: &[Item],
    which: &[usize],
) -> Result<u64, postgres::Error> {
    let ids: Vec<Uuid> = which.iter().map(|&i| items[i].id).collect();
    // check_payload proved these are UTF-8 (serde_json only accepts UTF-8).
    let payloads: Vec<&str> = which
        .iter()
        .map(|&i| std::str::from_utf8(&items[i].body).unwrap_or_default())
        .collect();
    messages::insert(&mut db.client, &db.inserts, tenant, &ids, &payloads)
}

/// Stores each item in its own statement; those PostgreSQL refuses become poison. On a
/// transient failure none counts as settled: they are all tried again, and those already
/// stored are skipped as duplicates (each keeps its id).
fn insert_one_by_one(
    db: &mut WorkerDb,
    tenant: TenantId,
    items: &[Item],
    good: &[usize],
    poison: &mut Vec<(usize, String)>,
) -> Result<u64, postgres::Error> {
    let mut inserted = 0;
    for &i in good {
        match insert(db, tenant, items, &[i]) {
            Ok(n) => inserted += n,
            Err(e) if is_content_error(&e) => poison.push((i, db_reason(&e))),
            Err(e) => return Err(e),
        }
    }
    Ok(inserted)
}

/// Class 22 (data exception): PostgreSQL refuses this content, e.g. `\u0000` in jsonb.
fn is_content_error(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22"))
}

fn db_reason(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("rejected by PostgreSQL: {}", db.message()),
        None => format!("rejected by PostgreSQL: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: u64) -> Vec<Item> {
        (0..n)
            .map(|tag| Item {
                tag,
                id: Uuid::now_v7(),
                body: b"{}".to_vec(),
                accepted: Instant::now(),
            })
            .collect()
    }

    fn tenant() -> TenantId {
        Uuid::new_v4().into()
    }

    #[test]
    fn a_panicking_worker_gives_the_whole_batch_back_to_be_retried() {
        let (done, panicked) = store_guarded(&Metrics::new(), tenant(), items(3), |_| {
            panic!("a bug while storing")
        });
        assert!(panicked);
        assert!(done.poison.is_empty());
        match done.outcome {
            Outcome::Transient { items, error } => {
                assert_eq!(items.iter().map(|i| i.tag).collect::<Vec<_>>(), [0, 1, 2]);
                assert!(error.contains("worker failed"), "{error}");
            }
            Outcome::Stored { .. } => panic!("a panicked batch is not stored"),
        }
    }

    #[test]
    fn a_verdict_splits_the_batch_into_poison_and_settled() {
        let verdict = |_: &[Item]| Verdict {
            poison: vec![(1, "not JSON".into())],
            stored: Ok(2),
        };
        let (done, panicked) = store_guarded(&Metrics::new(), tenant(), items(3), verdict);
        assert!(!panicked);
        assert_eq!(done.poison.len(), 1);
        assert_eq!(
            (done.poison[0].tag, done.poison[0].reason.as_str()),
            (1, "not JSON")
        );
        match done.outcome {
            Outcome::Stored { settled, inserted } => {
                assert_eq!((settled, inserted), (vec![0, 2], 2))
            }
            Outcome::Transient { .. } => panic!("stored"),
        }
    }
}
