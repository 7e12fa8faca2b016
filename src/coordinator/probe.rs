//! A replica cut off from the broker but not from PostgreSQL would keep its claims while its
//! consumers retry for ever. While any consumer here cannot connect, a thread of its own probes
//! the broker; once the probe has failed for half the failover timeout and another replica's
//! consumers run (or another replica runs none at all, and may try), the replica says
//! `broker_down` with its heartbeat: the plan then gives it no
//! tenant, so its consumers stop and their claims go to the others. It takes tenants again
//! once its probes have succeeded for half the failover timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::warn;
use parking_lot::Mutex;

use crate::manager::TenantManager;

/// How often the probe connects while it is wanted.
const EVERY: Duration = Duration::from_millis(500);

/// What the probe has seen since it was last wanted.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    /// Every probe since then failed.
    pub failing_since: Option<Instant>,
    /// Every probe since then succeeded.
    pub ok_since: Option<Instant>,
}

pub struct Probe {
    wanted: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    pub fn start(manager: Arc<TenantManager>) -> Result<Probe> {
        let wanted = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop_tx, stop) = bounded(0);
        let (w, s) = (wanted.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name("broker-probe".into())
            .spawn(move || run(&manager, &w, &s, &stop))
            .context("spawning the broker probe thread")?;
        Ok(Probe {
            wanted,
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub(super) fn want(&self, on: bool) {
        self.wanted.store(on, Ordering::Relaxed);
    }

    pub(super) fn seen(&self) -> Seen {
        *self.seen.lock()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(manager: &TenantManager, wanted: &AtomicBool, seen: &Mutex<Seen>, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        if !wanted.load(Ordering::Relaxed) {
            *seen.lock() = Seen::default();
            continue;
        }
        let result = manager.probe_broker();
        let now = Instant::now();
        let mut seen = seen.lock();
        match result {
            Ok(()) => {
                seen.failing_since = None;
                seen.ok_since.get_or_insert(now);
            }
            Err(e) => {
                if seen.failing_since.is_none() {
                    warn!("the broker probe failed: {e:#}");
                }
                seen.failing_since.get_or_insert(now);
                seen.ok_since = None;
            }
        }
    }
}
