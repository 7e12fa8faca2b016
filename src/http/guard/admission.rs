//! Which client connections are open, which of them are idle (between requests), and room for
//! one more: below `HTTP_MAX_CONNECTIONS` and its address's fair share of them, or by closing
//! an idle one (its own when the address is past its share, else the busiest address's).

use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::debug;
use parking_lot::Mutex;
use socket2::SockRef;

use super::budget::{fair_share, ClientKey};

/// One open client connection, as the guard tracks it.
pub struct Conn {
    pub id: u64,
    pub client: ClientKey,
    /// A clone of the client socket, to close it from outside (eviction, shutdown).
    pub stream: TcpStream,
    pub activity: Arc<Activity>,
    pub thread: JoinHandle<()>,
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;
const CLAIMED: u8 = 2;

/// Whether a connection is between requests, answering one, or claimed to be closed for room.
/// Its thread and the acceptor change it only by compare-and-swap, so a request is either
/// started or the connection closed, never both.
pub struct Activity(AtomicU8);

impl Activity {
    /// A new connection: idle until its first request starts.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity(AtomicU8::new(IDLE)))
    }

    /// The connection thread waits for a next request. False: the connection was claimed.
    pub fn wait_between_requests(&self) -> bool {
        self.swap(BUSY, IDLE) || self.0.load(Ordering::SeqCst) == IDLE
    }

    /// The connection thread starts a request. False: the connection was claimed.
    pub fn start_request(&self) -> bool {
        self.swap(IDLE, BUSY) || self.0.load(Ordering::SeqCst) == BUSY
    }

    /// The acceptor takes an idle connection to close it; its thread will start nothing more.
    fn claim(&self) -> bool {
        self.swap(IDLE, CLAIMED)
    }

    fn is_claimed(&self) -> bool {
        self.0.load(Ordering::SeqCst) == CLAIMED
    }

    fn swap(&self, from: u8, to: u8) -> bool {
        let order = Ordering::SeqCst;
        self.0.compare_exchange(from, to, order, order).is_ok()
    }
}

impl Conn {
    /// Claims the connection to close it when it is between requests and nothing arrived that
    /// its thread has not read yet: a request that reached the socket is never cut, even
    /// before its thread has run.
    fn claim_if_idle(&self) -> bool {
        self.activity.0.load(Ordering::SeqCst) == IDLE
            && !has_unread_bytes(&self.stream)
            && self.activity.claim()
    }
}

/// Closes the first idle connection of `candidates`.
fn close_idle<'a>(mut candidates: impl Iterator<Item = &'a &'a Conn>) -> Option<()> {
    let conn = candidates.find(|c| c.claim_if_idle())?;
    debug!(
        "closing idle HTTP connection {} of {} to make room",
        conn.id, conn.client
    );
    let _ = conn.stream.shutdown(Shutdown::Both);
    Some(())
}

/// A look at the socket that neither waits nor takes anything (an error counts as none).
fn has_unread_bytes(stream: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::uninit(); 1];
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    matches!(SockRef::from(stream).recv_with_flags(&mut byte, flags), Ok(n) if n > 0)
}

/// Why a connection was not admitted.
pub enum Full {
    /// Every slot is busy.
    Everyone,
    /// The client's address holds its whole share, and none of it idle.
    ThisAddress,
}

pub struct Conns {
    open: Mutex<Vec<Conn>>,
    gauge: prometheus::IntGauge,
}

impl Conns {
    pub fn new(gauge: prometheus::IntGauge) -> Conns {
        Conns {
            open: Mutex::new(Vec::new()),
            gauge,
        }
    }

    /// Room for one more connection from `client`: below the limit and its share, or after
    /// closing an idle connection (oldest first): its own when it is past its share, else one
    /// of the address holding the most. Closed connections stay listed until their thread has
    /// ended, so every thread is joined, here or at shutdown.
    pub fn make_room(&self, client: ClientKey, max: usize) -> Result<(), Full> {
        let mut conns = self.open.lock();
        conns.retain(|c| !c.thread.is_finished());
        self.gauge.set(conns.len() as i64);
        let live: Vec<&Conn> = conns.iter().filter(|c| !c.activity.is_claimed()).collect();
        let mine = live.iter().filter(|c| c.client == client).count();
        // At least one, so that a newcomer can take an idle slot of a full house.
        let share = fair_share(max, live.len() - mine).max(1);
        if mine >= share {
            let own = live.iter().filter(|c| c.client == client);
            return close_idle(own).ok_or(Full::ThisAddress);
        }
        if live.len() < max {
            return Ok(());
        }
        let mut held: std::collections::HashMap<ClientKey, usize> = Default::default();
        for conn in &live {
            *held.entry(conn.client).or_default() += 1;
        }
        let mut busiest_first = live.clone();
        busiest_first.sort_by_key(|c| std::cmp::Reverse(held[&c.client]));
        close_idle(busiest_first.iter()).ok_or(Full::Everyone)
    }

    pub fn add(&self, conn: Conn) {
        let mut conns = self.open.lock();
        conns.push(conn);
        self.gauge.set(conns.len() as i64);
    }

    /// Ends every connection and joins its thread. First only the reading side is shut: a
    /// response still being written reaches its client, then the connection ends; a client
    /// still not done reading after `grace` is cut.
    pub fn close_all(&self, grace: std::time::Duration) {
        let conns: Vec<Conn> = std::mem::take(&mut *self.open.lock());
        for conn in &conns {
            let _ = conn.stream.shutdown(Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + grace;
        while conns.iter().any(|c| !c.thread.is_finished()) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for conn in conns {
            let _ = conn.stream.shutdown(Shutdown::Both);
            let _ = conn.thread.join();
        }
        self.gauge.set(0);
    }
}
