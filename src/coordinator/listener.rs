//! The replica's ear: a thread holding its own connection that LISTENs on the tenantd channel
//! and passes every notification on, so the coordinator can wait on its channels alone.

use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;

use crate::backoff::Backoff;
use crate::store::{self, DbSettings, CHANNEL};

/// What the listener hears.
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// A notification's payload: a tenant id, or `replicas`.
    Changed(String),
    /// The listening connection was (re)opened: notifications may have been missed meanwhile.
    Resync,
}

pub struct Listener {
    /// Dropped to stop the thread.
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// How long one wait for notifications lasts before the thread checks whether to stop.
const POLL: Duration = Duration::from_millis(250);

impl Listener {
    pub fn start(db: DbSettings, notes: Sender<Note>) -> Result<Listener> {
        let (stop_tx, stop_rx) = bounded(0);
        let thread = std::thread::Builder::new()
            .name("listener".into())
            .spawn(move || run(&db, &notes, &stop_rx))
            .context("spawning the listener thread")?;
        Ok(Listener {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(db: &DbSettings, notes: &Sender<Note>, stop: &Receiver<()>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match listen(db) {
            Ok(mut client) => {
                backoff.reset();
                let _ = notes.send(Note::Resync);
                if forward(&mut client, notes, stop) {
                    return;
                }
            }
            Err(e) => warn!("listening for changes failed: {e:#}"),
        }
        match stop.recv_timeout(backoff.next()) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

fn listen(db: &DbSettings) -> Result<Client> {
    let mut client = store::connect(db, "tenantd listener")?;
    store::listen(&mut client)?;
    debug!("listening on channel {CHANNEL}");
    Ok(client)
}

/// Passes notifications on until told to stop (true) or the connection breaks (false).
fn forward(client: &mut Client, notes: &Sender<Note>, stop: &Receiver<()>) -> bool {
    loop {
        if let Err(e) = pass_on(client, notes) {
            warn!("listening for changes failed: {e}");
            return false;
        }
        if !matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Empty)) {
            return true;
        }
        if client.is_closed() {
            warn!("listening for changes: the connection closed");
            return false;
        }
    }
}

/// Passes on what arrives within one `POLL`.
fn pass_on(client: &mut Client, notes: &Sender<Note>) -> Result<(), postgres::Error> {
    let mut heard = client.notifications();
    let mut waiting = heard.timeout_iter(POLL);
    while let Some(n) = waiting.next()? {
        let _ = notes.send(Note::Changed(n.payload().to_string()));
    }
    Ok(())
}
