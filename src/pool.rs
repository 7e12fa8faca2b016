//! The shared worker pool: threads that each hold one PostgreSQL connection and store batches of
//! one tenant's messages, then report the outcome to that tenant's thread, which acks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::debug;
use parking_lot::Mutex;
use postgres::{Client, Statement};
use threadpool::ThreadPool;
use uuid::Uuid;

use crate::ids::TenantId;
use crate::metrics::metrics;
use crate::store;

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
    pub body: Vec<u8>,
    pub reason: String,
}

pub enum Outcome {
    /// Committed: `settled` may be acked; `inserted` of them were new rows.
    Stored { settled: Vec<u64>, inserted: u64 },
    /// Nothing is wrong with these messages, but they are not stored (the database is
    /// unreachable): they come back to be tried again.
    Transient { items: Vec<Item>, error: String },
}

#[derive(Clone)]
struct WorkerSettings {
    database_url: Arc<str>,
    connect_timeout: Duration,
    max_message_bytes: usize,
}

pub struct WorkerPool {
    pool: ThreadPool,
    settings: WorkerSettings,
    /// Idle connections: as many as threads, each used by one thread at a time. They live here,
    /// not in thread-locals, so they close on a normal thread (the postgres client cannot be
    /// dropped from a thread-local destructor).
    idle: Arc<Mutex<Vec<WorkerDb>>>,
}

impl WorkerPool {
    pub fn new(
        size: usize,
        database_url: &str,
        connect_timeout: Duration,
        max_message_bytes: usize,
    ) -> WorkerPool {
        let pool = threadpool::Builder::new()
            .num_threads(size)
            .thread_name("worker".into())
            .build();
        let settings = WorkerSettings {
            database_url: database_url.into(),
            connect_timeout,
            max_message_bytes,
        };
        WorkerPool {
            pool,
            settings,
            idle: Arc::new(Mutex::new(Vec::with_capacity(size))),
        }
    }

    pub fn submit(&self, batch: Batch) {
        let settings = self.settings.clone();
        let idle = self.idle.clone();
        self.pool.execute(move || {
            let reply = batch.reply.clone();
            let mut db = idle.lock().pop();
            let done = store_batch(&settings, &mut db, batch.tenant, batch.items);
            idle.lock().extend(db);
            // The tenant thread may have gone (stopped or reconnected): its deliveries are then
            // redelivered by the broker, and the message ids keep the rows single.
            let _ = reply.send(done);
        });
    }

    /// Waits until every submitted batch has finished.
    pub fn join(&self) {
        self.pool.join();
    }
}

/// A worker's connection and prepared insert, opened on first use and after a failure.
struct WorkerDb {
    client: Client,
    insert: Statement,
}

fn store_batch(
    settings: &WorkerSettings,
    slot: &mut Option<WorkerDb>,
    tenant: TenantId,
    items: Vec<Item>,
) -> BatchDone {
    let (good, mut poison) = split_poison(items, settings.max_message_bytes);
    let outcome = store_good(slot, settings, tenant, good, &mut poison);
    BatchDone { poison, outcome }
}

fn store_good(
    slot: &mut Option<WorkerDb>,
    settings: &WorkerSettings,
    tenant: TenantId,
    good: Vec<Item>,
    poison: &mut Vec<Poison>,
) -> Outcome {
    if good.is_empty() {
        return stored(Vec::new(), 0);
    }
    let db = match open_db(slot, settings) {
        Ok(db) => db,
        Err(error) => return Outcome::Transient { items: good, error },
    };
    match insert(db, tenant, &good) {
        Ok(inserted) => {
            observe(&good);
            stored(good.iter().map(|i| i.tag).collect(), inserted)
        }
        // One message PostgreSQL refuses must not hold back the others: store one by one.
        Err(e) if is_content_error(&e) => match insert_one_by_one(db, tenant, good, poison) {
            Ok((settled, inserted)) => stored(settled, inserted),
            Err((items, e)) => transient(slot, items, e),
        },
        Err(e) => transient(slot, good, e),
    }
}

/// Records the batch's size and each message's delivery-to-commit latency.
fn observe(batch: &[Item]) {
    let m = metrics();
    m.batch_messages.observe(batch.len() as f64);
    for item in batch {
        m.commit_seconds
            .observe(item.accepted.elapsed().as_secs_f64());
    }
}

fn stored(settled: Vec<u64>, inserted: u64) -> Outcome {
    Outcome::Stored { settled, inserted }
}

fn transient(slot: &mut Option<WorkerDb>, items: Vec<Item>, e: postgres::Error) -> Outcome {
    // The connection may be broken; the next batch opens a fresh one.
    *slot = None;
    Outcome::Transient {
        items,
        error: e.to_string(),
    }
}

fn open_db<'a>(
    slot: &'a mut Option<WorkerDb>,
    settings: &WorkerSettings,
) -> Result<&'a mut WorkerDb, String> {
    if slot.as_ref().is_some_and(|db| db.client.is_closed()) {
        *slot = None;
    }
    if slot.is_none() {
        let mut client = store::connect(&settings.database_url, settings.connect_timeout)
            .map_err(|e| format!("{e:#}"))?;
        let insert = client
            .prepare(store::INSERT_MESSAGES)
            .map_err(|e| e.to_string())?;
        debug!("worker connected to PostgreSQL");
        *slot = Some(WorkerDb { client, insert });
    }
    Ok(slot.as_mut().expect("connection was just opened"))
}

/// Splits the items into storable JSON and the others, with the reason they are not.
fn split_poison(items: Vec<Item>, max_bytes: usize) -> (Vec<Item>, Vec<Poison>) {
    let mut good = Vec::with_capacity(items.len());
    let mut poison = Vec::new();
    for item in items {
        match check_payload(&item.body, max_bytes) {
            Ok(()) => good.push(item),
            Err(reason) => poison.push(Poison {
                tag: item.tag,
                body: item.body,
                reason,
            }),
        }
    }
    (good, poison)
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

fn insert(db: &mut WorkerDb, tenant: TenantId, items: &[Item]) -> Result<u64, postgres::Error> {
    let ids: Vec<Uuid> = items.iter().map(|i| i.id).collect();
    // check_payload proved these are UTF-8 (serde_json only accepts UTF-8).
    let payloads: Vec<&str> = items
        .iter()
        .map(|i| std::str::from_utf8(&i.body).unwrap_or_default())
        .collect();
    store::insert_messages(&mut db.client, &db.insert, tenant, &ids, &payloads)
}

/// Stores each item in its own statement; those PostgreSQL refuses become poison. On a
/// transient failure, every item that is not poison comes back (the stored ones are skipped as
/// duplicates when tried again: each item keeps its id).
fn insert_one_by_one(
    db: &mut WorkerDb,
    tenant: TenantId,
    good: Vec<Item>,
    poison: &mut Vec<Poison>,
) -> Result<(Vec<u64>, u64), (Vec<Item>, postgres::Error)> {
    let mut settled = Vec::with_capacity(good.len());
    let mut kept = Vec::with_capacity(good.len());
    let mut inserted = 0;
    let mut items = good.into_iter();
    while let Some(item) = items.next() {
        match insert(db, tenant, std::slice::from_ref(&item)) {
            Ok(n) => {
                inserted += n;
                settled.push(item.tag);
                kept.push(item);
            }
            Err(e) if is_content_error(&e) => poison.push(Poison {
                tag: item.tag,
                reason: db_reason(&e),
                body: item.body,
            }),
            Err(e) => {
                kept.push(item);
                kept.extend(items);
                return Err((kept, e));
            }
        }
    }
    Ok((settled, inserted))
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
