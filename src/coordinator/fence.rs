//! The fence: a thread that stops every consumer of the replica once it has gone half the
//! failover timeout without a heartbeat. It does not rely on the coordinator thread, which may be
//! stuck in a call to a database that went silent: by the time another replica may take these
//! tenants (`grace`), their consumers here have stopped, and what they held unacked is back in
//! the queues.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::warn;

use crate::health::Health;
use crate::manager::TenantManager;

/// How often the fence looks.
const EVERY: Duration = Duration::from_millis(250);

pub struct Fence {
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Fence {
    pub fn start(
        health: Arc<Health>,
        manager: Arc<TenantManager>,
        after: Duration,
    ) -> Result<Fence> {
        let (stop_tx, stop) = bounded(0);
        let thread = std::thread::Builder::new()
            .name("fence".into())
            .spawn(move || watch(&health, &manager, after, &stop))
            .context("spawning the fence thread")?;
        Ok(Fence {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(health: &Health, manager: &TenantManager, after: Duration, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let silent = health.heartbeat_age();
        // Every consumer not yet told to stop, also one started after an earlier look here (by
        // a coordinator call that began before the silence): none may run through it.
        if silent < after || !manager.any_running() {
            continue;
        }
        warn!("no heartbeat for {silent:?}: stopping every consumer of this replica (others may take its tenants)");
        manager.stop_all(Instant::now());
    }
}
