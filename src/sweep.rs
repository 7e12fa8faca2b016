//! The orphan sweeper: a thread that, every `EVERY`, removes the queues of creates that were
//! interrupted before their tenant's row existed (`service::orphans`), and forgets the records
//! of dead letters older than `LEDGER_KEEP`. Every replica runs one; an advisory lock lets one
//! sweep orphans at a time, and replicas forgetting records skip each other's rows.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::warn;

use crate::service::{Service, LEDGER_KEEP, ORPHAN_GRACE};

/// How often a replica looks: one indexed query on a table of creates under way.
const EVERY: Duration = Duration::from_secs(10);

pub struct Sweeper {
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sweeper {
    pub fn start(service: Arc<Service>) -> Result<Sweeper> {
        let (stop_tx, stop) = bounded(0);
        let thread = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || run(&service, &stop))
            .context("spawning the sweeper thread")?;
        Ok(Sweeper {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Sweeper {
    /// Tells the thread to stop, without waiting for a sweep under way (a database or broker
    /// slow to answer must not hold up a shutdown): that sweep ends on its own, and what it did
    /// not finish, a later one does.
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take().filter(|t| t.is_finished()) {
            let _ = thread.join();
        }
    }
}

fn run(service: &Service, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if let Err(e) = service.sweep_orphans(ORPHAN_GRACE) {
            warn!("sweeping orphan queues failed (tried again in {EVERY:?}): {e:#}");
        }
        if let Err(e) = service.forget_old_letters(LEDGER_KEEP) {
            warn!(
                "forgetting old records of dead letters failed (tried again in {EVERY:?}): {e:#}"
            );
        }
    }
}
