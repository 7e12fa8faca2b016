//! The shared worker pool: threads that each hold one PostgreSQL connection and store batches of
//! one tenant's messages, then report the outcome to that tenant's thread, which acks.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use log::{debug, warn};
use parking_lot::Mutex;
use postgres::{Client, Statement};
use threadpool::ThreadPool;
use uuid::Uuid;

use crate::ids::TenantId;
use crate::store;

/// One delivery, as a worker sees it: its tag (for the reply), its id and its body.
pub struct Item {
    pub tag: u64,
    pub id: Uuid,
    pub body: Vec<u8>,
}

/// Messages of one tenant, stored in one transaction.
pub struct Batch {
    pub tenant: TenantId,
    pub items: Vec<Item>,
    pub reply: Sender<BatchDone>,
}

pub struct BatchDone {
    pub result: BatchResult,
}

pub enum BatchResult {
    /// Committed: `settled` may be acked; `poison` can never be stored, with the reason.
    Done {
        settled: Vec<u64>,
        poison: Vec<(u64, String)>,
        inserted: u64,
    },
    /// Nothing was stored and nothing is wrong with the messages (the database is unreachable):
    /// the items come back to be tried again.
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
            let result = store_batch(&settings, &mut db, batch.tenant, batch.items);
            idle.lock().extend(db);
            // The tenant thread may have gone (stopped or reconnected): its deliveries are then
            // redelivered by the broker, and the message ids keep the rows single.
            let _ = reply.send(BatchDone { result });
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
) -> BatchResult {
    let (good, mut poison) = split_poison(&items, settings.max_message_bytes);
    if good.is_empty() {
        return done(Vec::new(), poison, 0);
    }
    let db = match open_db(slot, settings) {
        Ok(db) => db,
        Err(error) => return BatchResult::Transient { items, error },
    };
    match insert(db, tenant, &items, &good) {
        Ok(inserted) => done(tags(&items, &good), poison, inserted),
        Err(e) if is_content_error(&e) => {
            // One message PostgreSQL refuses must not hold back the others: store one by one.
            match insert_one_by_one(db, tenant, &items, &good, &mut poison) {
                Ok((settled, inserted)) => done(settled, poison, inserted),
                Err(e) => transient(slot, items, e),
            }
        }
        Err(e) => transient(slot, items, e),
    }
}

fn done(settled: Vec<u64>, poison: Vec<(u64, String)>, inserted: u64) -> BatchResult {
    BatchResult::Done {
        settled,
        poison,
        inserted,
    }
}

fn transient(slot: &mut Option<WorkerDb>, items: Vec<Item>, e: postgres::Error) -> BatchResult {
    warn!("storing a batch failed, will retry: {e}");
    // The connection may be broken; the next batch opens a fresh one.
    *slot = None;
    BatchResult::Transient {
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

/// Indices of the items that are storable JSON; the others with the reason they are not.
fn split_poison(items: &[Item], max_bytes: usize) -> (Vec<usize>, Vec<(u64, String)>) {
    let mut good = Vec::with_capacity(items.len());
    let mut poison = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match check_payload(&item.body, max_bytes) {
            Ok(()) => good.push(i),
            Err(reason) => poison.push((item.tag, reason)),
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

fn tags(items: &[Item], which: &[usize]) -> Vec<u64> {
    which.iter().map(|&i| items[i].tag).collect()
}

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
    store::insert_messages(&mut db.client, &db.insert, tenant, &ids, &payloads)
}

fn insert_one_by_one(
    db: &mut WorkerDb,
    tenant: TenantId,
    items: &[Item],
    good: &[usize],
    poison: &mut Vec<(u64, String)>,
) -> Result<(Vec<u64>, u64), postgres::Error> {
    let mut settled = Vec::with_capacity(good.len());
    let mut inserted = 0;
    for &i in good {
        match insert(db, tenant, items, &[i]) {
            Ok(n) => {
                inserted += n;
                settled.push(items[i].tag);
            }
            Err(e) if is_content_error(&e) => poison.push((items[i].tag, db_reason(&e))),
            Err(e) => return Err(e),
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
